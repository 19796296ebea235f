"""Times the full clip_jax training step (forward, loss, backward, AdamW) for a named model.

    python benchmarks/train_step.py --model ViT-B-32 --batch 256 --dtype bfloat16

Inputs are synthetic arrays already on the devices (no input pipeline), so this measures the
step alone. Prints one JSON line: step time (median), samples/s, FLOPs per step from XLA's cost
analysis, MFU against the chip's dense bf16 peak (GPU/TPU), peak device memory.

Model FLOPs are those of the same step with XLA attention on the unpadded sequence, whatever
`--attention-impl` runs: padding and fused kernels change the work done, not the model's
FLOPs. `--flops-per-sample` skips the count (it lowers the step for the CPU backend, which
takes a while for the large models). `--profile DIR` traces a few more steps with
`jax.profiler` (perfetto trace json included; `benchmarks/profile_summary.py` reads it).
"""

from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import host_memory, metrics, models, optim, sharding
from clip_jax import step as step_lib
from clip_jax.models import attention


def build_step(
    model_name: str,
    batch: int,
    dtype: str,
    attention_impl: str | None,
    seed: int = 0,
    remat: str = "none",
    scan_layers: bool = False,
    count_flops: bool = True,
    **model_overrides,
):
    """(jitted step, state, batch, model FLOPs per step or None) on all devices: data-parallel
    mesh, explicit shardings."""
    mesh = sharding.create_mesh()
    config = models.get_model_config(model_name, **model_overrides)
    model = models.CLIP(
        config,
        dtype=jnp.dtype(dtype),
        attention_impl=attention_impl,
        remat=remat,
        scan_layers=scan_layers,
    )
    # The model's FLOPs: XLA attention, unpadded (see the module docstring).
    flops_model = models.CLIP(
        config, dtype=jnp.dtype(dtype), attention_impl=None, remat=remat, scan_layers=scan_layers
    )
    optim_config = types.SimpleNamespace(
        lr=1e-4,
        warmup_steps=10,
        end_lr_factor=0.0,
        weight_decay=0.2,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        grad_clip_norm=0.0,
    )
    abstract_params = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
    tx, schedule = optim.create_optimizer(optim_config, 1000, abstract_params)
    init = lambda: step_lib.init_train_state(model, tx, seed)
    state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init))
    state = jax.jit(init, out_shardings=state_shardings)()
    batch_shard = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(seed)
    size, length = config.image_size, config.context_length
    tokens = rng.integers(1, config.text.vocab_size - 1, (batch, length)).astype(np.int32)
    tokens[:, -1] = config.text.vocab_size - 1
    data = {
        "image": jax.device_put(
            rng.integers(0, 256, (batch, size, size, 3), np.uint8), batch_shard
        ),
        "text": jax.device_put(tokens, batch_shard),
    }
    train_step = step_lib.make_train_step(model, tx, schedule, mesh)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (jax.eval_shape(init), data)
    )
    flops = (
        metrics.model_flops(
            step_lib.make_train_step(flops_model, tx, schedule, mesh=None), *abstract
        )
        if count_flops
        else None
    )
    return jitted, state, data, flops


def time_step(jitted, state, data, steps: int, warmup: int) -> tuple[dict, object]:
    t0 = time.perf_counter()
    compiled = jitted.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, out = compiled(state, data)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = compiled(state, data)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return (
        {
            "compile_s": compile_s,
            "step_s": float(np.median(times)),
            "step_s_min": float(np.min(times)),
            "loss": float(out["loss"]),
        },
        compiled,
        state,
    )


def profile_steps(compiled, state, data, steps: int, logdir: str) -> None:
    """Runs `steps` more steps under `jax.profiler.trace` (xplane.pb plus a perfetto trace
    json that `benchmarks/profile_summary.py` reads without TensorBoard)."""
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, out = compiled(state, data)
            jax.block_until_ready(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--attention-impl",
        default=None,
        help="xla | cudnn | cudnn_padded | cudnn_padN | xla_padN "
        "(clip_jax.models.attention); default: JAX chooses",
    )
    parser.add_argument(
        "--remat", default="none", help="none | full | a jax.checkpoint_policies name"
    )
    parser.add_argument("--scan", action="store_true", help="nn.scan over layers")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--flops-per-sample",
        type=float,
        default=None,
        help="model GFLOP per sample: skip the FLOP count (see the docstring)",
    )
    parser.add_argument(
        "--overrides",
        default="",
        help="JSON object of model config overrides, e.g. "
        '\'{"vision": {"layers": 1}, "text": {"layers": 1}}\'',
    )
    parser.add_argument("--profile", default=None, help="trace --profile-steps steps here")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args()
    try:
        attention.parse_implementation(args.attention_impl)
    except ValueError as e:
        parser.error(str(e))
    malloc_tuned = host_memory.tune_for_xla_cpu(default=True)  # before JAX starts; as RESULTS.md

    jitted, state, data, flops = build_step(
        args.model,
        args.batch,
        args.dtype,
        args.attention_impl,
        remat=args.remat,
        scan_layers=args.scan,
        count_flops=args.flops_per_sample is None,
        **(json.loads(args.overrides) if args.overrides else {}),
    )
    flops_source = "xla_cpu_cost_analysis" if flops else None
    if args.flops_per_sample is not None:
        flops, flops_source = args.flops_per_sample * 1e9 * args.batch, "--flops-per-sample"
    result, compiled, state = time_step(jitted, state, data, args.steps, args.warmup)
    if args.profile:
        profile_steps(compiled, state, data, args.profile_steps, args.profile)
    device = jax.devices()[0]
    peak = metrics.peak_flops(device)
    memory = {}
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        memory["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    analysis = compiled.memory_analysis()
    if analysis is not None:
        memory["compiled_temp_gib"] = analysis.temp_size_in_bytes / 2**30
    row = {
        "benchmark": "train_step",
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "attention_impl": args.attention_impl or "default",
        "remat": args.remat,
        "scan": args.scan,
        "malloc_tuned": malloc_tuned,
        "devices": jax.device_count(),
        "device_kind": device.device_kind,
        **result,
        "samples_per_s": args.batch / result["step_s"],
        "flops_per_step": flops,
        "flops_source": flops_source,
        "attention_plans": attention.cudnn_plans(),
        "flops_per_s": flops / result["step_s"] if flops else None,
        "mfu": flops / result["step_s"] / (peak * jax.device_count()) if flops and peak else None,
        **memory,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
