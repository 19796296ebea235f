"""Compile-only devices for a named TPU slice ("v5p:4x4x4"), without any TPU present.

`jax.experimental.topologies.get_topology_desc` asks libtpu (the `tpu` extra) for the devices of
a slice; arrays and meshes can be built on them and programs lowered and compiled for them
(XLA:TPU runs on the CPU), but nothing can run. The arguments follow the public slice
descriptions (cloud.google.com/tpu/docs, and the same table in MaxText's
accelerator_to_spec_map.py): v4 and v5p chips are "megacore" (one JAX device spanning both
TensorCores, as on real hardware; without it libtpu returns one device per core), hosts hold
2x2x1 chips (4 per JAX process) in multi-host slices, and slices with every dimension a
multiple of 4 (v4, v5p) or a dimension of 16 (v5e, v6e) have wrap-around links (a torus).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from clip_jax import accelerators

_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
# libtpu's generation names in topology strings ("v5:4x4x4" is the v5p).
_LIBTPU_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its chips as compile-only jax devices, and what they are.

    name: as given ("v5p:4x4x4"); dims: chips along each axis; devices: one per chip.
    num_hosts: JAX processes of the slice (each runs its own input pipeline).
    """

    name: str
    accelerator: accelerators.Accelerator
    dims: tuple[int, ...]
    devices: tuple
    num_hosts: int

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    @property
    def chips_per_host(self) -> int:
        return self.num_chips // self.num_hosts


def parse(name: str) -> tuple[accelerators.Accelerator, tuple[int, ...]]:
    """'v5e:4x4' -> (the v5e entry, (4, 4)); ValueError naming the expected form."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise ValueError(f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                         f"v4, v5e, v5p, v6e, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x4")
    gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if gen in ("v4", "v5p") and len(dims) != 3:
        raise ValueError(f"topology {name!r}: {gen} slices are 3-D (AxBxC), e.g. {gen}:2x2x1")
    if gen in ("v5e", "v6e") and len(dims) != 2:
        raise ValueError(f"topology {name!r}: {gen} slices are 2-D (AxB), e.g. {gen}:4x4")
    if min(dims) < 1:
        raise ValueError(f"topology {name!r}: every dimension must be >= 1")
    return accelerators.by_name(gen), dims


def _topology_kwargs(acc: accelerators.Accelerator, dims: tuple[int, ...]) -> dict:
    dims3 = tuple(dims) + (1,) * (3 - len(dims))
    chips = math.prod(dims3)
    kwargs: dict = {}
    if acc.megacore:
        kwargs["chip_config_name"] = "megacore"
    if chips <= 4 or (acc.name in ("v5e", "v6e") and dims3 == (2, 4, 1)):
        # Sub-host and single-host slices (v5e/v6e 2x4: one 8-chip VM).
        kwargs["chips_per_host_bounds"] = dims3
    else:
        kwargs["chips_per_host_bounds"] = (2, 2, 1)
    if acc.name in ("v4", "v5p"):
        torus = all(d % 4 == 0 for d in dims3)
        kwargs["wrap"] = (torus,) * 3
    else:
        kwargs["wrap"] = tuple(d == 16 for d in dims3[:2]) + (False,)
    return kwargs


def get(name: str) -> Topology:
    """The compile-only devices of slice `name` ("v5e:4x4", "v5p:4x4x4", "v4:2x2x4", "v6e:8x8").

    Needs libtpu (`pip install "clip-jax-framework[tpu]"`, also part of the `test` extra);
    raises RuntimeError saying so when it is missing, ValueError for a shape libtpu rejects.
    """
    acc, dims = parse(name)
    import jax
    from jax._src import hardware_utils, xla_bridge  # what jax's own TPU set-up consults
    from jax.experimental import topologies
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        # No TPU attached: libtpu would query the GCE metadata server for the (absent) TPU's
        # description, then log three multi-line errors about unknown worker hostnames and
        # accelerator type. These values only describe the local host, not the compile target
        # (same compiled programs with and without them). libtpu also takes a machine-wide
        # lock (/tmp/libtpu_lockfile) that would fail a second compiling process (pytest -n 2).
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    if xla_bridge.get_tpu_library_path() is None:
        raise RuntimeError("compiling for TPU topologies needs libtpu: pip install "
                           "'clip-jax-framework[tpu]' (or jax[tpu])")
    topo_name = f"{_LIBTPU_PREFIX[acc.name]}:{'x'.join(str(d) for d in dims)}"
    try:
        desc = topologies.get_topology_desc(topology_name=topo_name, platform="tpu",
                                            **_topology_kwargs(acc, dims))
    except jax.errors.JaxRuntimeError as e:  # INVALID_ARGUMENT for shapes libtpu rejects
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"topology {name!r}: libtpu rejects it: {first}") from None
    devices = tuple(desc.devices)
    hosts = len({d.process_index for d in devices})
    return Topology(name=name, accelerator=acc, dims=dims, devices=devices, num_hosts=hosts)
