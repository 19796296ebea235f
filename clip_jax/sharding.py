"""Device mesh and the shardings of batches and parameters.

We build meshes with `AxisType.Auto` axes (the classic GSPMD mode), not jax 0.10's default
Explicit axes: the model code stays free of sharding annotations and XLA propagates shardings
from the explicit `in_shardings`/`out_shardings` of the jitted step. The only place that needs
per-device control, the global-batch contrastive loss, uses `jax.shard_map` explicitly.

Mesh axes: `data` (pure data parallel) and `fsdp` (data parallel whose devices also shard the
parameters). The batch is always sharded over both axes together.

Parameters (and the optimizer state that mirrors them) are sharded over `fsdp` (ZeRO-3 /
FSDP): by default along their largest dimension divisible by the fsdp size; `rules`, pairs of
(regex over the parameter path, partition spec tuple), override that per parameter. Under jit
XLA all-gathers each weight where it is used and reduce-scatters its gradient.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D (`data`, `fsdp`) mesh over `devices` (default: every device of every process).

    One of `data` / `fsdp` may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    for name, size, other in (("fsdp", fsdp, data), ("data", data, fsdp)):
        if other == -1 and (size <= 0 or n % size):
            raise ValueError(f"mesh.{name}={size} does not divide the {n} available devices")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} available devices")
    try:
        # Topology-aware device order on TPU/GPU slices; falls back below on odd device sets.
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(
        grid,
        (DATA_AXIS, FSDP_AXIS),
        axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto),
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (those of BATCH_AXES the mesh has)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every data-parallel axis, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


Rule = tuple[str, tuple]  # (regex over 'image/transformer/.../kernel', spec per dimension)


def path_str(path: tuple) -> str:
    """A pytree key path as 'image/transformer/resblocks_0/attn/in_proj/kernel'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _spec_from_rule(spec: Sequence, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
    """Validates one rule's spec tuple against a parameter's shape and the mesh."""
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(
            f"sharding rule spec {spec} has {len(spec)} entries but parameter "
            f"{path} has shape {shape}"
        )
    for dim, axes in zip(shape, spec):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        for name in names:
            if name not in mesh.axis_names:
                raise ValueError(
                    f"sharding rule for {path} names mesh axis {name!r}; the mesh "
                    f"has {mesh.axis_names}"
                )
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if dim % size:
            raise ValueError(
                f"sharding rule spec {spec} splits dimension {dim} of {path} "
                f"{shape} over {size} devices: not divisible"
            )
    return P(*spec)


def default_param_spec(shape: tuple[int, ...], fsdp: int, skip_leading: bool = False) -> P:
    """FSDP default: split the largest dimension divisible by `fsdp` over the fsdp axis
    (ties: the earliest dimension); replicated if none divides or fsdp == 1.

    `skip_leading` never splits dimension 0: it is the layer axis of nn.scan-stacked params,
    which the scan slices one layer at a time (splitting it would gather whole layers).
    """
    if fsdp <= 1 or not shape:
        return P()
    candidates = [
        (dim, -i)
        for i, dim in enumerate(shape)
        if dim % fsdp == 0 and not (skip_leading and i == 0)
    ]
    if not candidates:
        return P()
    _, neg_index = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_index] = FSDP_AXIS
    return P(*spec)


def param_specs(mesh: Mesh, params: Any, rules: Sequence[Rule] = ()) -> Any:
    """PartitionSpec for every parameter (abstract or concrete leaves with `.shape`).

    The first rule whose regex matches the path (re.fullmatch) wins; otherwise
    `default_param_spec`. Raises ValueError naming the rule for a bad regex or spec.
    """
    compiled = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule {rule!r} is not a (regex, spec) pair")
        try:
            compiled.append((re.compile(rule[0]), tuple(rule[1])))
        except re.error as e:
            raise ValueError(f"sharding rule regex {rule[0]!r} is invalid: {e}") from None
    fsdp = mesh.shape.get(FSDP_AXIS, 1)

    def spec(path, leaf):
        name = path_str(path)
        shape = tuple(leaf.shape)
        for pattern, rule_spec in compiled:
            if pattern.fullmatch(name):
                return _spec_from_rule(rule_spec, shape, mesh, name)
        return default_param_spec(shape, fsdp, skip_leading="/resblocks/" in f"/{name}/")

    return jax.tree_util.tree_map_with_path(spec, params)


def state_shardings(mesh: Mesh, abstract_state, rules: Sequence[Rule] = ()):
    """Sharding of every train-state leaf.

    `params` follow `param_specs`; optimizer-state leaves that mirror a parameter (Adam's mu
    and nu: a key path ending in that parameter's path, same shape) get the parameter's
    sharding; a moving average of the params (`ema_params`) is laid out as they are;
    `batch_stats` follow the default rule; everything else (step, rng, counts) is
    replicated. With mesh.fsdp == 1 and no rules everything is replicated (pure data
    parallelism).
    """
    params = abstract_state.params
    specs = param_specs(mesh, params, rules)
    by_path = {}
    for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
    ):
        by_path[path_str(path)] = (tuple(leaf.shape), spec)
    fsdp = mesh.shape.get(FSDP_AXIS, 1)

    def opt_spec(path, leaf):
        name = path_str(path)
        parts = name.split("/")
        # The longest suffix of the optimizer-state path that is a parameter path.
        for start in range(len(parts)):
            hit = by_path.get("/".join(parts[start:]))
            if hit is not None and hit[0] == tuple(leaf.shape):
                return NamedSharding(mesh, hit[1])
        return replicated(mesh)

    def stats_spec(leaf):
        return NamedSharding(mesh, default_param_spec(tuple(leaf.shape), fsdp))

    param_shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    ema = getattr(abstract_state, "ema_params", None)
    return abstract_state.replace(
        step=replicated(mesh),
        params=param_shardings,
        ema_params=None if ema is None else param_shardings,
        batch_stats=jax.tree.map(stats_spec, abstract_state.batch_stats),
        opt_state=jax.tree_util.tree_map_with_path(opt_spec, abstract_state.opt_state),
        rng=replicated(mesh),
    )


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by one device (its first addressable shard of each)."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))
