"""`python -m clip_jax.plan`: compile the real train step for a TPU slice that is not there.

    python -m clip_jax.plan --config configs/clip.py:vit_l14 --topology v5p:4x4x4 \\
        --config.batch_size=32768 [--config.mesh.fsdp=8 --config.model.remat=full] \\
        [--mfu=0.4] [--search] [--json=plan.json]

Builds the step exactly as `clip_jax.train` would (`clip_jax.train_setup`: same model, remat,
shardings, accumulation, loss, donation) from abstract shapes (no parameter is materialised),
compiles it with XLA:TPU for the slice's compile-only devices (`clip_jax.topology`; libtpu runs
on this CPU), compiles the evaluation embedder too, and reports per chip: HBM (arguments,
temporaries, total) against the chip's capacity, FLOPs per step, the step time at the chip's
peak bf16 rate and at an assumed utilisation (`--mfu`), and the input rate each host must feed.
`--search` tries fsdp sizes, remat policies and accumulation steps and reports the fastest
configuration that fits. A config with `stages` is planned stage by stage (`planned_configs`).

FLOPs: XLA's cost analysis counts a loop body once, whatever its trip count, so the compiled
step's count is wrong with `accumulation_steps > 1` (a `lax.scan` over micro-batches) or
`scan_layers`. The counts here come from the step lowered without loops (layers unrolled, no
accumulation) for the CPU, exactly as the trainer counts its model FLOPs: "model FLOPs" (no
remat), and "executed FLOPs" = the step with the config's remat, plus one more forward pass of
the whole batch when accumulating (GradCache embeds every micro-batch once without a tape).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging

from clip_jax import cli

_CONFIG = _TOPOLOGY = _MFU = _SEARCH = _HBM_GIB = _EVAL = _JSON = None

REMAT_POLICIES = ("none", "dots_with_no_batch_dims_saveable", "full")
GiB = 2**30


def define_flags() -> None:
    """Command-line flags (only when run as a program: `clip_jax.train` defines `--config`)."""
    global _CONFIG, _TOPOLOGY, _MFU, _SEARCH, _HBM_GIB, _EVAL, _JSON
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        None,
        "Training config, e.g. configs/clip.py:vit_l14 (overrides as for "
        "clip_jax.train: --config.batch_size=32768 --config.mesh.fsdp=8 ...).",
        lock_config=True,
    )
    _TOPOLOGY = flags.DEFINE_string(
        "topology",
        None,
        "TPU slice, GENERATION:AxB[xC]: v5e:4x4, "
        "v5p:4x4x4, v4:2x2x4, v6e:8x8; or NVIDIA hosts "
        "h100:[HOSTSx]GPUS, e.g. h100:8, h100:4x8 (needs the cuda "
        "extra, no GPU).",
    )
    _MFU = flags.DEFINE_float(
        "mfu",
        0.4,
        "Assumed fraction of the chips' peak bf16 FLOP/s at "
        "which the step's executed FLOPs run (equals MFU when nothing "
        "is recomputed); sets the estimated step time.",
    )
    _SEARCH = flags.DEFINE_bool(
        "search",
        False,
        "Try mesh.fsdp sizes, remat policies and "
        "accumulation steps; report the fastest configuration that "
        "fits (ties: less accumulation, then smaller fsdp).",
    )
    _HBM_GIB = flags.DEFINE_float(
        "hbm_gib",
        None,
        "Plan against this many GiB per chip "
        "instead of the chip's usable HBM (e.g. to keep headroom); "
        "at most the chip's.",
    )
    _EVAL = flags.DEFINE_bool("eval", True, "Also compile the evaluation embedder.")
    _JSON = flags.DEFINE_string("json", None, "Also write the JSON report to this file.")


class PlanError(ValueError):
    """A planning request that cannot be met (bad topology, config); reported in one line."""


def with_changes(config, **changes):
    """A copy of `config` with dotted keys replaced: with_changes(c, **{"mesh.fsdp": 4})."""
    out = config.copy_and_resolve_references()
    out.unlock()
    for key, value in changes.items():
        target = out
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    out.lock()
    return out


def planned_configs(config) -> list[tuple[str, Any]]:
    """[(label, config)] of the train steps a run of `config` compiles: `config` itself (label
    ""), or for a schedule of stages (`config.stages`, `clip_jax.stages`) each stage's config
    as the stage runs it ("stage 0 of 2", ...).

    Stage k > 0 starts from stage k-1's weights, which do not exist yet when planning: it is
    planned as `stages.stand_in` builds it (stage 0's architecture at stage k's input sizes:
    the same parameter shapes and positional-embedding resize).
    """
    from clip_jax import stages as stages_lib
    from clip_jax import train_setup

    if not config.get("stages"):
        return [("", config)]
    staged = stages_lib.stage_configs(config, "plan")
    out: list[tuple[str, Any]] = []
    for k, (_, stage) in enumerate(staged):
        if k > 0:
            train_setup.model_overrides(stage)  # a stage entry setting an architecture field
            stage = stages_lib.stand_in(staged, k)
        try:
            train_setup.load_model(stage, with_weights=False)
        except train_setup.ConfigError as e:
            raise train_setup.ConfigError(f"config.stages[{k}]: {e}") from None
        out.append((f"stage {k} of {len(staged)}", stage))
    return out


def _check_init_from(config) -> None:
    """Plans need the architecture of `init_from`'s weights (not the weights themselves): a
    one-line error naming the way out when it cannot be read here."""
    if not config.init_from:
        return
    from clip_jax import train_setup

    try:
        train_setup.load_model(config, with_weights=False)
    except train_setup.ConfigError as e:
        raise PlanError(
            f"{e} (plan reads only the architecture of these weights; --config.init_from= "
            f"plans model.name={config.model.name!r} from scratch instead)"
        ) from None


# ---------------------------------------------------------------------------------------------
# FLOPs


class FlopCounter:
    """Global FLOPs of one train step of `config`, whatever its mesh, remat or accumulation.

    Lowered (not compiled) for the CPU without loops, so shapes cost nothing: model FLOPs are
    the step without remat; executed FLOPs add remat's recomputation and, with accumulation,
    one more forward pass of the whole batch. `loaded`: `train_setup.load_model(config)`'s
    result when the caller has it (the trainer), so `init_from` is not read again.
    """

    def __init__(self, config, loaded: tuple | None = None):
        import jax

        from clip_jax import sharding

        self._base = with_changes(config, **{"model.scan_layers": False, "accumulation_steps": 1})
        self._mesh = sharding.create_mesh(1, 1, devices=jax.devices("cpu")[:1])
        self._loaded = loaded

    @functools.lru_cache(maxsize=None)  # one counter per plan, few remat values
    def step(self, remat: str) -> float:
        """FLOPs of the loop-free step with `remat`."""
        from clip_jax import metrics, train_setup

        setup = train_setup.build(
            with_changes(self._base, **{"model.remat": remat}),
            self._mesh,
            with_weights=False,
            loaded=self._loaded,
        )
        flops = metrics.model_flops(
            setup.train_step(mesh=None), setup.abstract_state, setup.abstract_batch(sharded=False)
        )
        if not flops:
            raise PlanError("XLA's cost analysis gave no FLOP count for the step")
        return flops

    @functools.lru_cache(maxsize=None)
    def forward(self) -> float:
        """FLOPs of one forward pass of both towers over the global batch."""
        from clip_jax import metrics, train_setup
        from clip_jax.data.transforms import normalize_images

        setup = train_setup.build(self._base, self._mesh, with_weights=False, loaded=self._loaded)
        model = setup.model

        def forward(params, batch_stats, batch):
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            images = normalize_images(batch["image"], model.dtype)
            return model.apply(variables, images, batch["text"], train=False)

        state = setup.abstract_state
        flops = metrics.model_flops(
            forward, state.params, state.batch_stats, setup.abstract_batch(sharded=False)
        )
        if not flops:
            raise PlanError("XLA's cost analysis gave no FLOP count for the forward pass")
        return flops

    def model(self) -> float:
        return self.step("none")

    def executed(self, remat: str, accumulation_steps: int) -> float:
        extra = self.forward() if accumulation_steps > 1 else 0.0
        return self.step(remat) + extra


# ---------------------------------------------------------------------------------------------
# Compilation and memory


def compile_memory(lowered, compiler_options: dict | None = None) -> dict[str, Any]:
    """Compiles `lowered`; per-chip bytes from XLA's memory analysis, or the compiler's
    out-of-memory message.

    Returns {"fits": bool, "compile_s", and either "arguments", "outputs", "aliased",
    "temporaries", "code", "program" (= arguments + outputs - aliased + temporaries + code),
    "compiled_flops" (loop bodies counted once), or "oom": the message}.
    """
    import jax

    from clip_jax import metrics

    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {
            "fits": False,
            "oom": cli.one_line(e, limit=400),
            "compile_s": round(time.perf_counter() - t0, 1),
        }
    m = compiled.memory_analysis()
    out = {
        "fits": True,
        "compile_s": round(time.perf_counter() - t0, 1),
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["program"] = (
        out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    )
    out["compiled_flops"] = metrics.compiled_flops(compiled)
    return out


def per_chip_bytes(abstract_tree) -> int:
    """Logical bytes one chip holds of a tree of ShapeDtypeStructs carrying shardings."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return int(total)


def device_bytes(abstract_tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs in the device's layout.

    TPUs store arrays in tiles, so small or odd trailing dimensions take more than their
    logical size (measured on v5e: a [16] float32 shard 8x, an int32 [16, 77] batch 1.7x,
    uint8 [B, 224, 224, 3] images 1.14x). Read from the argument size of a trivial program
    over the tree, which the compiler lays out as the step's own arguments.
    """
    import jax
    import jax.numpy as jnp

    def touch(tree):  # uses every leaf, so jit keeps every argument
        return sum(jnp.ravel(x)[0].astype(jnp.float32) for x in jax.tree.leaves(tree))

    compiled = jax.jit(touch).lower(abstract_tree).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


def _levers(config, topo) -> list[str]:
    """What would lower per-chip memory, from the config's current values."""
    n = topo.num_chips
    levers = []
    if config.mesh.fsdp != -1 and config.mesh.fsdp < n:
        levers.append(
            f"--config.mesh.fsdp={min(n, max(2, 2 * config.mesh.fsdp))} (now "
            f"{config.mesh.fsdp}; shards parameters and optimizer state, up to {n})"
        )
    if config.model.remat != "full":
        levers.append(f"--config.model.remat=full (now {config.model.remat!r})")
    k = config.accumulation_steps
    if config.batch_size % (n * 2 * k) == 0:
        levers.append(f"--config.accumulation_steps={2 * k} (now {k}; same B x B loss)")
    levers.append("a smaller --config.batch_size, a larger slice, or --search")
    return levers


def _capacity(acc, hbm_gib: float | None) -> int:
    """Bytes per chip to plan against: the chip's usable HBM, or `hbm_gib` below it. On GPUs
    JAX's allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory."""
    usable = acc.usable_hbm_bytes
    if usable is None:
        usable = int(
            acc.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        )
    if hbm_gib is None:
        return usable
    if hbm_gib <= 0 or hbm_gib * GiB > usable:
        raise PlanError(
            f"--hbm_gib={hbm_gib} must be > 0 and at most the chip's usable {usable / GiB:.2f} GiB"
        )
    return int(hbm_gib * GiB)


def _compiler_options(acc, capacity: int) -> dict | None:
    """TPU: below the chip's usable HBM, the compiler's own limit is lowered too, so its fit
    decisions (scheduling, rematerialisation) are made against the smaller budget (it cannot
    be raised above the chip's). GPU: without a device XLA cannot autotune Triton GEMM tile
    sizes (it fails "Couldn't find output tile sizes"), so matmuls go to cuBLAS."""
    if acc.topology_prefix is None:
        return {"xla_gpu_enable_triton_gemm": False}
    if acc.usable_hbm_bytes is None or capacity >= acc.usable_hbm_bytes:
        return None
    return {"xla_tpu_max_hbm_size_mib": capacity // 2**20}


def plan_step(config, topo, *, capacity: int, with_eval: bool = True) -> dict[str, Any]:
    """Compiles the train step (and the evaluation embedder) of `config` for `topo`.

    Returns {"mesh", "train": compile_memory(...) + "prefetch", "total", "fits",
    "state_per_chip", "eval": {...} | None}.
    """
    from clip_jax import embedder, sharding, train_setup

    try:
        mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=topo.devices)
    except ValueError as e:
        raise train_setup.ConfigError(f"config.mesh: {e}") from None
    train_setup.validate_step_config(config, mesh, topo.num_hosts)
    setup = train_setup.build(config, mesh, with_weights=False)
    options = _compiler_options(topo.accelerator, capacity)
    state = setup.sharded_abstract_state()
    batch = setup.abstract_batch()
    logging.info(
        "compiling the train step for %s (%d chips, mesh %s)",
        topo.name,
        topo.num_chips,
        dict(mesh.shape),
    )
    train = compile_memory(setup.jit_step().lower(state, batch), options)
    state_bytes = device_bytes(state)
    batch_bytes = device_bytes(batch)
    # The trainer keeps `data.device_prefetch` more batches on the devices (device.py).
    train["prefetch"] = int(config.data.device_prefetch) * batch_bytes
    train["state"] = state_bytes
    if train["fits"]:
        train["total"] = train["program"] + train["prefetch"]
        train["fits"] = train["total"] <= capacity
    result = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "train": train, "eval": None}
    if with_eval and train["fits"]:
        result["eval"] = _plan_eval(
            config, setup, embedder, state_bytes + train["prefetch"], capacity, options
        )
    return result


def _plan_eval(config, setup, embedder, resident: int, capacity: int, options) -> dict[str, Any]:
    """The embedder's two programs (images, texts) as `clip_jax.evaluation` runs them during
    training: the train state and prefetched batches stay resident meanwhile, and the
    embedder reads the state's own (FSDP-sharded) parameters, gathering them in the program.

    A program's arguments besides its batch are those resident parameters, and only the ones
    its tower reads (jit drops unused arguments: the image program of ViT-L/14 takes the image
    tower's 1.1 GiB, not all 1.6 GiB of parameters), so each adds its program size minus
    those arguments."""
    import jax
    import jax.numpy as jnp

    mesh = setup.mesh
    image_fn, text_fn = embedder.jitted_towers(setup.model, mesh)  # the evaluators' programs
    state = setup.sharded_abstract_state()
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    b = embedder.round_batch_size(int(config.eval.batch_size), mesh)
    s, length = setup.model_config.image_size, setup.model_config.context_length
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=setup.batch_sharding)
    tokens = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=setup.batch_sharding)
    logging.info("compiling the evaluation embedder (batch %d)", b)
    progs = {
        "image": compile_memory(image_fn.lower(variables, images), options),
        "text": compile_memory(text_fn.lower(variables, tokens), options),
    }
    inputs = {"image": device_bytes(images), "text": device_bytes(tokens)}
    out: dict[str, Any] = {"batch_size": b, "programs": progs, "resident": resident}
    if all(p["fits"] for p in progs.values()):
        extra = max(p["program"] - (p["arguments"] - inputs[k]) for k, p in progs.items())
        out["total"] = resident + extra
        out["fits"] = out["total"] <= capacity
    else:
        out["fits"] = False
    return out


# ---------------------------------------------------------------------------------------------
# The report


def estimate(config, topo, counter: FlopCounter, mfu: float) -> dict[str, Any]:
    """FLOPs per step and chip, step time and input rates at peak and at `mfu`."""
    n, acc = topo.num_chips, topo.accelerator
    model = counter.model()
    executed = counter.executed(config.model.remat, config.accumulation_steps)
    peak = acc.peak_bf16_flops
    step_peak = executed / n / peak
    step = step_peak / mfu
    b = config.batch_size
    return {
        "model_flops": model,
        "executed_flops": executed,
        "model_flops_per_chip": model / n,
        "executed_flops_per_chip": executed / n,
        "recompute_factor": executed / model,
        "peak_flops_per_chip": peak,
        "assumed_utilisation": mfu,
        "step_s_at_peak": step_peak,
        "step_s": step,
        "samples_per_s_at_peak": b / step_peak,
        "samples_per_s": b / step,
        "mfu": mfu * model / executed,
        "hosts": topo.num_hosts,
        "chips_per_host": topo.chips_per_host,
        "samples_per_s_per_host": b / step / topo.num_hosts,
        "samples_per_s_per_host_at_peak": b / step_peak / topo.num_hosts,
    }


def describe(config, topo) -> dict[str, Any]:
    return {
        "model": config.model.name,
        "init_from": config.init_from,
        "dtype": config.dtype,
        "batch_size": int(config.batch_size),
        "loss": config.loss,
        "remat": config.model.remat,
        "scan_layers": bool(config.model.scan_layers),
        "accumulation_steps": int(config.accumulation_steps),
        "mesh": {"data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp)},
        "topology": topo.name,
        "accelerator": topo.accelerator.name,
        "chips": topo.num_chips,
        "hosts": topo.num_hosts,
    }


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _flop(x: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.3g} FLOP"


def _secs(x: float) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.3g} ms"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a `plan` report."""
    c, t, cap = report["config"], report["train"], report["capacity"]
    acc = report["accelerator"]
    lines = [
        f"{c['model']} {c['dtype']}, batch {c['batch_size']}, loss {c['loss']}, remat "
        f"{c['remat']}, accumulation {c['accumulation_steps']} on {c['topology']} "
        f"({c['chips']} chips, {c['hosts']} host(s)), mesh data {report['mesh']['data']} x "
        f"fsdp {report['mesh']['fsdp']}",
        f"{'per chip':<34}{'':>12}",
    ]
    if "oom" in t:
        lines.append(f"{'train step':<34}does not fit: {t['oom']}")
    else:
        for key, label in (
            ("arguments", "arguments (state + batch)"),
            ("temporaries", "temporaries"),
            ("outputs", "outputs"),
            ("aliased", "  of which donated"),
            ("code", "program code"),
            ("prefetch", "prefetched input batches"),
        ):
            lines.append(f"{label:<34}{_gib(t[key]):>12}")
        lines.append(
            f"{'total':<34}{_gib(t['total']):>12}  of {_gib(cap)} usable "
            f"({acc['name']}: {acc['hbm_bytes'] / 1e9:.0f} GB)  "
            f"{'fits' if t['fits'] else 'DOES NOT FIT'}"
        )
    e = report.get("eval")
    if e is not None:
        if "total" in e:
            lines.append(
                f"{'eval embedder (+ resident state)':<34}{_gib(e['total']):>12}  "
                f"{'fits' if e['fits'] else 'DOES NOT FIT'} (batch {e['batch_size']})"
            )
        else:
            lines.append(
                f"{'eval embedder':<34}does not fit: "
                f"{next(p['oom'] for p in e['programs'].values() if 'oom' in p)}"
            )
    s = report["speed"]
    lines += [
        f"{'model FLOPs / step':<34}{_flop(s['model_flops_per_chip']):>12} per chip "
        f"({_flop(s['model_flops'])} in all)",
        f"{'executed FLOPs / step':<34}{_flop(s['executed_flops_per_chip']):>12} per chip "
        f"(x{s['recompute_factor']:.2f}: remat, accumulation)",
        f"{'step time at peak':<34}{_secs(s['step_s_at_peak']):>12}  "
        f"{s['samples_per_s_at_peak']:,.0f} samples/s ({acc['peak_bf16_flops'] / 1e12:.0f} "
        f"TFLOP/s per chip)",
        f"{'step time at ' + format(s['assumed_utilisation'], '.0%') + ' of peak':<34}"
        f"{_secs(s['step_s']):>12}  {s['samples_per_s']:,.0f} samples/s (MFU {s['mfu']:.0%})",
        f"{'input per host':<34}{s['samples_per_s_per_host']:>12,.0f}  samples/s "
        f"({s['hosts']} host(s) x {s['chips_per_host']} chips; "
        f"{s['samples_per_s_per_host_at_peak']:,.0f} at peak)",
    ]
    if not report["fits"]:
        lines.append(report["verdict"])
    return "\n".join(lines)


def plan(
    config,
    topo_name: str,
    *,
    mfu: float = 0.4,
    hbm_gib: float | None = None,
    with_eval: bool = True,
    counter: FlopCounter | None = None,
) -> dict[str, Any]:
    """The full report for `config` on slice `topo_name` (see the module docstring)."""
    from clip_jax import topology

    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu={mfu} must be in (0, 1]")
    topo = topology.get(topo_name)
    _check_init_from(config)
    capacity = _capacity(topo.accelerator, hbm_gib)
    counter = counter or FlopCounter(config)
    result = plan_step(config, topo, capacity=capacity, with_eval=with_eval)
    report = {
        "config": describe(config, topo),
        "mesh": result["mesh"],
        "accelerator": dataclasses.asdict(topo.accelerator),
        "capacity": capacity,
        "train": result["train"],
        "eval": result["eval"],
        "speed": estimate(config, topo, counter, mfu),
    }
    report["fits"] = bool(
        result["train"]["fits"] and (result["eval"] is None or result["eval"]["fits"])
    )
    t, e = result["train"], result["eval"]
    if report["fits"]:
        report["verdict"] = "fits"
    else:
        what, prog = ("the train step", t) if not t["fits"] else ("the evaluation embedder", e)
        if "total" in prog:
            need = f"needs {_gib(prog['total'])} per chip (of {_gib(capacity)})"
        else:  # the compiler's own message says how much it needed
            oom = prog.get("oom") or next(p["oom"] for p in prog["programs"].values() if "oom" in p)
            oom = oom.removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")
            need = f"does not compile in {_gib(capacity)}: {oom}"
        report["verdict"] = (
            f"does not fit: {what} {need}; levers: {'; '.join(_levers(config, topo))}"
        )
    return report


# ---------------------------------------------------------------------------------------------
# Search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    config,
    topo_name: str,
    *,
    mfu: float = 0.4,
    hbm_gib: float | None = None,
    remats: tuple[str, ...] = REMAT_POLICIES,
    compile_fits: Callable | None = None,
    counter: FlopCounter | None = None,
    with_eval: bool = True,
) -> dict[str, Any]:
    """The fastest (fsdp, remat, accumulation) for `config` on `topo_name` that fits.

    Speed is estimated from executed FLOPs (remat recompute and accumulation's extra forward
    included), which fsdp does not change. Candidates (remat, K) are tried fastest first, ties
    broken towards less accumulation; for each, the largest fsdp is compiled first (the least
    memory): if it does not fit, neither does a smaller one, else bisection finds the smallest
    fsdp that fits (fewest parameter gathers). The first candidate that fits wins.
    Returns {"best": plan report or None, "tried": [{fsdp, remat, accumulation_steps, fits,
    total}]}. `compile_fits(config) -> (fits, total_bytes|None)` replaces compilation (tests).
    """
    from clip_jax import topology

    topo = topology.get(topo_name)
    _check_init_from(config)
    capacity = _capacity(topo.accelerator, hbm_gib)
    counter = counter or FlopCounter(config)
    n, b = topo.num_chips, config.batch_size
    ks = [k for k in (2**i for i in range(0, 16)) if k <= b // n and b % (n * k) == 0]
    if not ks:
        raise PlanError(f"config.batch_size={b} is not divisible by the {n} chips of {topo_name}")
    fsdps = _divisors(n)
    candidates = sorted(
        ((r, k) for r in remats for k in ks),
        key=lambda rk: (round(counter.executed(*rk) / counter.model(), 3), rk[1]),
    )
    tried: list[dict] = []

    def fits(fsdp: int, remat: str, k: int) -> bool:
        variant = with_changes(
            config,
            **{
                "mesh.data": n // fsdp,
                "mesh.fsdp": fsdp,
                "model.remat": remat,
                "accumulation_steps": k,
            },
        )
        if compile_fits is not None:
            ok, total = compile_fits(variant)
        else:
            train = plan_step(variant, topo, capacity=capacity, with_eval=False)["train"]
            ok, total = train["fits"], train.get("total")
        tried.append(
            {"fsdp": fsdp, "remat": remat, "accumulation_steps": k, "fits": ok, "total": total}
        )
        logging.info(
            "fsdp %d, remat %s, accumulation %d: %s",
            fsdp,
            remat,
            k,
            f"fits ({_gib(total)})" if ok else "does not fit",
        )
        return ok

    for remat, k in candidates:
        if not fits(fsdps[-1], remat, k):
            continue
        lo, hi = 0, len(fsdps) - 1  # fsdps[hi] fits; find the smallest index that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(fsdps[mid], remat, k):
                hi = mid
            else:
                lo = mid + 1
        best = with_changes(
            config,
            **{
                "mesh.data": n // fsdps[hi],
                "mesh.fsdp": fsdps[hi],
                "model.remat": remat,
                "accumulation_steps": k,
            },
        )
        if compile_fits is not None:
            return {"best": best, "tried": tried}
        return {
            "best": plan(
                best, topo_name, mfu=mfu, hbm_gib=hbm_gib, with_eval=with_eval, counter=counter
            ),
            "tried": tried,
        }
    return {"best": None, "tried": tried}


def format_search(result: dict[str, Any]) -> str:
    lines = [f"{'fsdp':>5} {'remat':<34} {'accum':>5}  result"]
    for t in result["tried"]:
        verdict = (
            f"fits, {_gib(t['total'])}"
            if t["fits"]
            else (f"over, {_gib(t['total'])}" if t["total"] else "over (compiler out of memory)")
        )
        lines.append(f"{t['fsdp']:>5} {t['remat']:<34} {t['accumulation_steps']:>5}  {verdict}")
    if result["best"] is None:
        lines.append(
            "no configuration fits: use a larger slice, a chip with more HBM or a "
            "smaller batch_size"
        )
    else:
        c = result["best"]["config"]
        lines += [
            "",
            f"fastest that fits: --config.mesh.data={result['best']['mesh']['data']} "
            f"--config.mesh.fsdp={result['best']['mesh']['fsdp']} "
            f"--config.model.remat={c['remat']} "
            f"--config.accumulation_steps={c['accumulation_steps']}",
            "",
            format_report(result["best"]),
        ]
    return "\n".join(lines)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required")
    from clip_jax import metrics, train_setup

    metrics.quiet_library_logs()
    results, texts = [], []
    try:
        configs = planned_configs(_CONFIG.value)  # one per stage of a schedule of stages
        for label, config in configs:
            if label:
                logging.info("planning %s", label)
            run, report = (search, format_search) if _SEARCH.value else (plan, format_report)
            result = run(
                config,
                _TOPOLOGY.value,
                mfu=_MFU.value,
                hbm_gib=_HBM_GIB.value,
                with_eval=_EVAL.value,
            )
            text = report(result)
            results.append(result)
            texts.append(f"{label}:\n{text}" if label else text)
    except (PlanError, train_setup.ConfigError, RuntimeError, ValueError) as e:
        sys.exit(f"clip_jax.plan: error: {cli.one_line(e, limit=400)}")
    if len(results) == 1:
        payload = json.dumps(results[0], default=_json_default)
    else:
        stages = [dict(r, stage=k) for k, r in enumerate(results)]
        payload = json.dumps({"stages": stages}, default=_json_default)
    print("\n\n".join(texts))
    print(payload)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(payload + "\n")


if __name__ == "__main__":
    # Nothing here runs on an accelerator: keep JAX on the CPU (no TPU/GPU runtime start-up,
    # no metadata-server queries), and TensorFlow quiet.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Executables compiled for compile-only devices cannot be loaded back from JAX's persistent
    # cache (jax 0.10: "PjRtCompiler must be constructed with a Client"): do not write them.
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
    define_flags()
    app.run(main, flags_parser=cli.flags_parser("clip_jax.plan"))
