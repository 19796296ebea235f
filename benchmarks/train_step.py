"""Times the full clip_jax training step (forward, loss, backward, AdamW) for a named model.

    python benchmarks/train_step.py --model ViT-B-32 --batch 256 --dtype bfloat16

Inputs are synthetic arrays already on the devices (no input pipeline), so this measures the
step alone. Prints one JSON line: step time (median), samples/s, FLOPs per step from XLA's cost
analysis, MFU against the chip's dense bf16 peak (GPU/TPU), peak device memory.
"""
from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import host_memory, metrics, models, optim, sharding, step as step_lib


def build_step(model_name: str, batch: int, dtype: str, attention_impl: str | None,
               seed: int = 0, remat: str = "none", scan_layers: bool = False,
               **model_overrides):
    """(jitted step, state, batch) on all devices: data-parallel mesh, explicit shardings."""
    mesh = sharding.create_mesh()
    config = models.get_model_config(model_name, **model_overrides)
    model = models.CLIP(config, dtype=jnp.dtype(dtype), attention_impl=attention_impl,
                        remat=remat, scan_layers=scan_layers)
    optim_config = types.SimpleNamespace(lr=1e-4, warmup_steps=10, end_lr_factor=0.0,
                                         weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                                         grad_clip_norm=0.0)
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
    data = {"image": jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                                    batch_shard),
            "text": jax.device_put(tokens, batch_shard)}
    train_step = step_lib.make_train_step(model, tx, schedule, mesh)
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_shard),
                     out_shardings=(state_shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            (jax.eval_shape(init), data))
    flops = metrics.model_flops(step_lib.make_train_step(model, tx, schedule, mesh=None),
                                *abstract)
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
    return {"compile_s": compile_s, "step_s": float(np.median(times)),
            "step_s_min": float(np.min(times)), "loss": float(out["loss"])}, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"])
    parser.add_argument("--remat", default="none",
                        help="none | full | a jax.checkpoint_policies name")
    parser.add_argument("--scan", action="store_true", help="nn.scan over layers")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    malloc_tuned = host_memory.tune_for_xla_cpu(default=True)  # before JAX starts; as RESULTS.md

    jitted, state, data, flops = build_step(args.model, args.batch, args.dtype,
                                            args.attention_impl, remat=args.remat,
                                            scan_layers=args.scan)
    result, compiled = time_step(jitted, state, data, args.steps, args.warmup)
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
        "benchmark": "train_step", "model": args.model, "batch": args.batch,
        "dtype": args.dtype, "attention_impl": args.attention_impl or "default",
        "remat": args.remat, "scan": args.scan, "malloc_tuned": malloc_tuned,
        "devices": jax.device_count(), "device_kind": device.device_kind,
        **result, "samples_per_s": args.batch / result["step_s"],
        "flops_per_step": flops,
        "flops_per_s": flops / result["step_s"] if flops else None,
        "mfu": flops / result["step_s"] / (peak * jax.device_count()) if flops and peak
        else None,
        **memory,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
