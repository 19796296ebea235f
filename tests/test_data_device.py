"""Device-side global batches and prefetch (the transforms are in test_transforms.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.data import device


def _sharding():
    devices = np.array(jax.devices())
    assert devices.size == 8, "conftest forces 8 CPU devices"
    return NamedSharding(Mesh(devices, ("data",)), P("data"))


def test_make_global_batch():
    sharding = _sharding()
    batch = {
        "image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
        "text": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
        "position": np.array([32, 32]),
        "caption": np.array([b"x"] * 16),
    }
    out = device.make_global_batch(batch, sharding)
    assert isinstance(out["image"], jax.Array) and out["image"].sharding == sharding
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[1].data.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(np.asarray(out["text"]), batch["text"])
    assert isinstance(out["position"], np.ndarray) and isinstance(out["caption"], np.ndarray)


def test_prefetch_to_device_order_and_lookahead():
    sharding = _sharding()
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"image": np.full((8, 2, 2, 3), i, np.uint8), "position": np.array([i, i])}

    it = device.prefetch_to_device(source(), 2, sharding)
    first = next(it)
    assert int(first["image"][0, 0, 0, 0]) == 0 and first["position"].tolist() == [0, 0]
    assert pulled == [0, 1, 2]  # two batches already on the devices
    rest = list(it)
    assert [int(b["position"][0]) for b in rest] == [1, 2, 3, 4]
    assert [int(b["image"][3, 0, 0, 0]) for b in rest] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        next(device.prefetch_to_device(source(), -1, sharding))
