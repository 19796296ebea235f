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

from clip_jax import accelerators, platforms

_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_NAME = re.compile(r"^(h100|h200):(?:(\d+)x)?(\d+)$")
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
    """'v5e:4x4' -> (the v5e entry, (4, 4)); 'h100:4x8' -> (the h100 entry, (4 hosts, 8 GPUs));
    ValueError naming the expected form."""
    g = _GPU_NAME.match(name.strip().lower())
    if g:
        hosts, per_host = int(g.group(2) or 1), int(g.group(3))
        if hosts < 1 or not 1 <= per_host <= 8:
            raise ValueError(
                f"topology {name!r}: expected {g.group(1)}:[HOSTSx]GPUS with 1 to 8 GPUs per host"
            )
        return accelerators.by_name(g.group(1)), (hosts, per_host)
    m = _NAME.match(name.strip().lower())
    if not m:
        raise ValueError(
            f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
            f"v4, v5e, v5p, v6e, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x4; or "
            f"h100:[HOSTSx]GPUS, h200:[HOSTSx]GPUS, e.g. h100:8, h100:4x8"
        )
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


# CUDA device properties of the SXM parts, for XLA's GPU compiler (GpuTargetConfigProto text):
# NVIDIA's H100/H200 data sheets and the Hopper tuning guide (docs.nvidia.com/cuda/
# hopper-tuning-guide): 132 SMs, compute capability 9.0, 228 KB shared memory per SM (227 KB
# per block opt-in, 48 KB default), 64K 32-bit registers per SM, 50 MB L2, 1.98 GHz boost,
# 3.35 TB/s (H100) / 4.8 TB/s (H200) HBM bandwidth.
_GPU_SPECS = {
    "h100": ("NVIDIA H100 80GB HBM3", 3.35e12),
    "h200": ("NVIDIA H200", 4.8e12),
}


def _gpu_target_config(acc: accelerators.Accelerator) -> str:
    description, bandwidth = _GPU_SPECS[acc.name]
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": 228 * 1024,
        "threads_per_core_limit": 2048,
        "core_count": 132,
        "fpus_per_core": 128,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(bandwidth),
        "l2_cache_size": 50 * 2**20,
        "clock_rate_ghz": 1.98,
        "device_memory_size": int(acc.hbm_bytes),
        "shared_memory_per_block_optin": 227 * 1024,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (
        f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 }}\n}}\n"
        f'platform_name: "CUDA"\ndevice_description_str: "{description}"\n'
    )


def _get_gpu(name: str, acc: accelerators.Accelerator, dims: tuple[int, ...]) -> Topology:
    """Compile-only CUDA devices (needs the CUDA PJRT plugin, `jax[cuda13]`; no GPU)."""
    import jax
    from jax.experimental import topologies

    hosts, per_host = dims
    try:
        desc = topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=_gpu_target_config(acc)
        )
    except (RuntimeError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
        raise RuntimeError(
            f"topology {name!r}: compiling for NVIDIA GPUs without one needs "
            f"JAX's CUDA plugin: pip install 'clip-jax-framework[cuda]' "
            f"({_one_line(e)})"
        ) from None
    devices = tuple(desc.devices)
    return Topology(name=name, accelerator=acc, dims=dims, devices=devices, num_hosts=hosts)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200]


def get(name: str) -> Topology:
    """The compile-only devices of slice `name` ("v5e:4x4", "v5p:4x4x4", "v4:2x2x4", "v6e:8x8";
    or NVIDIA hosts "h100:8", "h100:4x8", "h200:8").

    Needs libtpu (`pip install "clip-jax-framework[tpu]"`, also part of the `test` extra);
    raises RuntimeError saying so when it is missing, ValueError for a shape libtpu rejects.
    """
    acc, dims = parse(name)
    if acc.topology_prefix is None:
        return _get_gpu(name, acc, dims)
    import jax
    from jax._src import xla_bridge  # what jax's own TPU set-up consults
    from jax.experimental import topologies

    if platforms.tpu_chips_attached() == 0:
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
        raise RuntimeError(
            "compiling for TPU topologies needs libtpu: pip install "
            "'clip-jax-framework[tpu]' (or jax[tpu])"
        )
    topo_name = f"{_LIBTPU_PREFIX[acc.name]}:{'x'.join(str(d) for d in dims)}"
    try:
        desc = topologies.get_topology_desc(
            topology_name=topo_name, platform="tpu", **_topology_kwargs(acc, dims)
        )
    except jax.errors.JaxRuntimeError as e:  # INVALID_ARGUMENT for shapes libtpu rejects
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"topology {name!r}: libtpu rejects it: {first}") from None
    devices = tuple(desc.devices)
    hosts = len({d.process_index for d in devices})
    return Topology(name=name, accelerator=acc, dims=dims, devices=devices, num_hosts=hosts)
