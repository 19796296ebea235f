"""Reading TorchScript archives without running them (clip_jax.torchscript).

Each malicious archive is paired with a control: `torch.jit.load` (or plain pickle) of the same
construction does write its marker file, so "the marker is absent" proves the reader skipped code
that would have run.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from unsafe_checkpoints import EvilModule, HoldsEvilObject, Opener, save_scripted  # noqa: E402

from clip_jax import torchscript  # noqa: E402


class _Plain(torch.nn.Module):
    """Parameters, a transposed (non-contiguous) buffer, an int buffer, float16 and bfloat16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 4)
        self.register_buffer("transposed", torch.randn(3, 5).t())
        self.register_buffer("steps", torch.arange(6, dtype=torch.int64).reshape(2, 3))
        self.half_w = torch.nn.Parameter(torch.randn(2, 2).half())
        self.bf16_w = torch.nn.Parameter(torch.randn(3).bfloat16())
        self.blocks = torch.nn.ModuleList([torch.nn.LayerNorm(4) for _ in range(2)])

    def forward(self, x):
        y = self.lin(x)
        for block in self.blocks:
            y = block(y)
        return (
            y.sum()
            + self.transposed.sum()
            + self.steps.sum()
            + self.half_w.float().sum()
            + self.bf16_w.float().sum()
        )


@pytest.mark.parametrize("how", ["trace", "script"])
def test_tensors_equal_torch_jit_state_dict(tmp_path, how):
    module = _Plain().eval()
    compiled = (
        torch.jit.trace(module, torch.randn(1, 3)) if how == "trace" else torch.jit.script(module)
    )
    torch.jit.save(compiled, str(tmp_path / "m.pt"))
    tensors = torchscript.read_tensors(tmp_path / "m.pt")
    reference = torch.jit.load(str(tmp_path / "m.pt")).state_dict()
    assert sorted(tensors) == sorted(reference)
    for name, value in reference.items():
        ours = tensors[name]
        if value.dtype == torch.bfloat16:
            assert ours.dtype.name == "bfloat16"
            value, ours = value.float(), ours.astype(np.float32)
        assert ours.shape == tuple(value.shape), name
        np.testing.assert_array_equal(ours, value.numpy(), err_msg=name)
    assert tensors["half_w"].dtype == np.float16 and tensors["steps"].dtype == np.int64
    assert not reference["transposed"].is_contiguous()  # the strided rebuild is exercised


@pytest.mark.parametrize("kind", ["module", "object"])
def test_scripted_setstate_never_runs(tmp_path, kind):
    def build(marker: Path) -> torch.nn.Module:
        return EvilModule(str(marker)) if kind == "module" else HoldsEvilObject(str(marker))

    control_marker, marker = tmp_path / "control-marker", tmp_path / "marker"
    control = save_scripted(build(control_marker), tmp_path / "control.pt")
    torch.jit.load(str(control))
    assert control_marker.exists(), "control: torch.jit.load should run the archive's code"

    archive = save_scripted(build(marker), tmp_path / "evil.pt")
    with pytest.raises(torchscript.UnsafeArchiveError) as info:
        torchscript.read_tensors(archive)
    message = str(info.value)
    assert "\n" not in message and "custom pickled state" in message
    assert str(archive) in message
    assert not marker.exists()


def _archive_with_data_pkl(path: Path, data_pkl: bytes) -> Path:
    """A zip shaped like a TorchScript archive (constants.pkl, code/) around `data_pkl`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", data_pkl)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "")
        archive.writestr("evil/version", "3\n")
    return path


def test_pickled_callables_are_refused(tmp_path):
    control_marker, marker = tmp_path / "control-marker", tmp_path / "marker"
    pickle.loads(pickle.dumps(Opener(str(control_marker)))).close()
    assert control_marker.exists(), "control: plain unpickling should call open()"

    archive = _archive_with_data_pkl(tmp_path / "evil.pt", pickle.dumps(Opener(str(marker))))
    with pytest.raises(
        torchscript.UnsafeArchiveError, match=r"refers to (io|builtins)\.open"
    ) as info:
        torchscript.read_tensors(archive)
    assert "\n" not in str(info.value) and str(archive) in str(info.value)
    assert not marker.exists()


class _FakeStorageRecord:
    """Pickles as a tensor whose size runs past the end of its 4-element storage."""

    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (_Persistent(), 0, self.size, (1,) * len(self.size), False, {}),
        )


class _Persistent:
    pass


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Persistent):
            return ("storage", torch.FloatStorage, "0", "cpu", 4)
        return None


def _tensor_archive(path: Path, size: tuple[int, ...]) -> Path:
    buffer = io.BytesIO()
    _ArchivePickler(buffer, protocol=2).dump(_FakeStorageRecord(size))
    _archive_with_data_pkl(path, buffer.getvalue())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("evil/data/0", np.arange(4, dtype=np.float32).tobytes())
    return path


def test_tensor_layout_is_bounds_checked(tmp_path):
    # In bounds, the record rebuilds; the top-level object is not a module, which is refused.
    with pytest.raises(torchscript.UnsafeArchiveError, match="holds a ndarray, not a TorchScript"):
        torchscript.read_tensors(_tensor_archive(tmp_path / "ok.pt", (4,)))
    # Out of bounds: refused before any memory outside the storage is read.
    with pytest.raises(torchscript.UnsafeArchiveError, match="reaches element 4 of a storage of 4"):
        torchscript.read_tensors(_tensor_archive(tmp_path / "oob.pt", (5,)))
    storage = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(
        torchscript._rebuild_tensor_v2(storage, 1, (2, 2), (1, 1)), [[1, 2], [2, 3]]
    )
    with pytest.raises(torchscript.UnsafeArchiveError, match="invalid layout"):
        torchscript._rebuild_tensor_v2(storage, 0, (2,), (-1,))
