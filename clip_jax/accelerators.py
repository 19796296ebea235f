"""Accelerator facts: peak bf16 FLOP/s, HBM per chip, chips per host; one table for all users.

Used by the trainer's MFU (`clip_jax.metrics.peak_flops`) and by `clip_jax.plan` (memory fit,
step-time estimates, input rate per host). Numbers are the vendors' public specifications:
  TPU v4:  cloud.google.com/tpu/docs/v4  - 275 TFLOP/s bf16, 32 GiB HBM2, 4 chips per host.
  TPU v5e: cloud.google.com/tpu/docs/v5e - 197 TFLOP/s bf16, 16 GB HBM2; 8 chips per host,
           split into two 4-chip VMs (one JAX process each) in multi-host slices.
  TPU v5p: cloud.google.com/tpu/docs/v5p - 459 TFLOP/s bf16, 95 GB HBM2e, 4 chips per host.
  TPU v6e: cloud.google.com/tpu/docs/v6e - 918 TFLOP/s bf16, 32 GB HBM; 8 chips per host,
           4-chip VMs (ct6e-standard-4t) in multi-host slices.
  H100 SXM: nvidia.com/en-us/data-center/h100 - 1,979 TFLOP/s bf16 *with 2:4 sparsity*, i.e.
           989 dense; 80 GB HBM3; 8 GPUs per HGX/DGX host.
  H200 SXM: nvidia.com/en-us/data-center/h200 - same compute as H100, 141 GB HBM3e; 8 per host.
  H100 PCIe 756 dense (80 GB), A100 SXM 312 (40 or 80 GB: read from the device kind), L40S 362
  (48 GB), L4 121 (24 GB), A10 125 (24 GB): the nvidia.com data sheets (dense = sparse / 2).
Peaks are dense (no sparsity): MFU against a sparse peak would halve every number.

`usable_hbm_bytes` is what XLA:TPU (libtpu 0.0.42.1) lets one program use, read from its
out-of-memory messages when compiling for each topology ("... exceeds available HBM
(15.75G)"): the runtime keeps the rest. None where not measured (GPUs: XLA's GPU client
reserves 25% unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip generation.

    name: short name used on the command line ("v5e", "h100").
    device_kinds: lower-case substrings of `jax.Device.device_kind` that identify it.
    peak_bf16_flops: dense peak per chip, FLOP/s.
    hbm_bytes: memory per chip as specified (GB = 1e9 where the vendor says GB).
    usable_hbm_bytes: what one XLA program may use (see module docstring), or None.
    chips_per_host: chips per JAX process (TPU VM / GPU host) in multi-host slices.
    topology_prefix: generation name for `jax.experimental.topologies` ("v5e", "v5p"), None
      for GPUs.
    megacore: one JAX device per chip spanning both TensorCores (v4, v5p); the topology API
      must be asked for it explicitly.
    """

    name: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float
    hbm_bytes: int
    usable_hbm_bytes: int | None
    chips_per_host: int
    topology_prefix: str | None = None
    megacore: bool = False


def _gib(x: float) -> int:
    return int(round(x * GiB))


# Order matters for device-kind matching: more specific substrings first ("tpu v5 lite" before
# "tpu v5", "h100" is not a substring of any other entry).
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("v4", ("tpu v4",), 275e12, 32 * GiB, _gib(30.75), 4, "v4", megacore=True),
    Accelerator("v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 16 * GB, _gib(15.75), 4, "v5e"),
    Accelerator(
        "v5p", ("tpu v5p", "tpu v5"), 459e12, 95 * GB, _gib(95.74), 4, "v5p", megacore=True
    ),
    Accelerator("v6e", ("tpu v6 lite", "tpu v6e"), 918e12, 32 * GB, _gib(31.25), 4, "v6e"),
    Accelerator("h100-pcie", ("h100 pcie",), 756e12, 80 * GB, None, 8),
    Accelerator("h100", ("h100",), 989e12, 80 * GB, None, 8),
    Accelerator("h200", ("h200",), 989e12, 141 * GB, None, 8),
    Accelerator(
        "a100-80gb", ("a100-sxm4-80gb", "a100 80gb", "a100-80gb"), 312e12, 80 * GB, None, 8
    ),
    Accelerator("a100", ("a100",), 312e12, 40 * GB, None, 8),
    Accelerator("l40s", ("l40s",), 362e12, 48 * GB, None, 8),
    Accelerator("l4", ("l4",), 121e12, 24 * GB, None, 8),
    Accelerator("a10", ("a10",), 125e12, 24 * GB, None, 8),
)

_BY_NAME = {a.name: a for a in ACCELERATORS}


def by_name(name: str) -> Accelerator:
    """The accelerator called `name` ("v5e", "v5p", "h100", ...); ValueError names the choices."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown accelerator {name!r}; known: {', '.join(sorted(_BY_NAME))}"
        ) from None


def for_device(device) -> Accelerator | None:
    """The table entry for a `jax.Device` (None for CPUs and chips not in the table)."""
    kind = getattr(device, "device_kind", "").lower()
    if not kind:
        return None
    for acc in ACCELERATORS:
        if any(k in kind for k in acc.device_kinds):
            return acc
    return None
