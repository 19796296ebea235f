"""Training-step speed of the efficient recipes: FLIP patch dropout and CLIPA low resolution /
short text, side by side in one process.

    PYTHONPATH=. python benchmarks/efficient_training.py --model ViT-B-16 --batch 8 --rounds 5

Every configuration is compiled first; then `--rounds` rounds each run `--steps` timed steps of
every configuration in turn (the order alternates between rounds), so a shared, noisy machine
slows them alike. Prints one JSON line per configuration (median step time over all its timed
steps, min / max, samples/s, the ratio to the first configuration and XLA's FLOP count of the
compiled step), then a summary line. Inputs are synthetic arrays already on the device; the
step is the trainer's (`step.make_train_step`: forward, loss, backward, AdamW), float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import host_memory, models, optim
from clip_jax import step as step_lib

# name -> (patch_dropout, image size as a fraction of the model's, text tokens or None for the
# model's context). Half of 224 px is CLIPA's 112 px (49 instead of 196 patches at patch 16).
CONFIGS = {
    "base": (0.0, 1.0, None),
    "patch_dropout_0.5": (0.5, 1.0, None),
    "patch_dropout_0.75": (0.75, 1.0, None),
    "half_res": (0.0, 0.5, None),
    "half_res_16_tokens": (0.0, 0.5, 16),
}


def optimizer(abstract_params, total_steps: int = 1000, lr: float = 1e-4, warmup: int = 10):
    """The trainer's AdamW + warmup-cosine schedule with configs/clip.py's other defaults."""
    optim_config = types.SimpleNamespace(
        lr=lr,
        warmup_steps=warmup,
        end_lr_factor=0.0,
        weight_decay=0.2,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        grad_clip_norm=0.0,
    )
    return optim.create_optimizer(optim_config, total_steps, abstract_params)


def build(model_name: str, batch: int, names: list[str], seed: int = 0) -> dict:
    """{name: (compiled step, state, batch, flops)}; configurations with the same parameter
    shapes share one train state (steps are not donated, so it stays valid)."""
    base = models.get_model_config(model_name)
    rng = np.random.default_rng(seed)
    states: dict[int, tuple] = {}
    out = {}
    for name in names:
        rate, scale, tokens = CONFIGS[name]
        config = models.get_model_config(
            model_name, vision={"image_size": int(base.image_size * scale)}
        )
        model = models.CLIP(config, patch_dropout=rate)
        size = config.image_size
        if size not in states:
            abstract = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
            tx, schedule = optimizer(abstract)
            state = jax.jit(lambda: step_lib.init_train_state(model, tx, seed))()
            states[size] = (tx, schedule, state)
        tx, schedule, state = states[size]
        length = tokens or config.context_length
        text = rng.integers(1, config.text.vocab_size - 1, (batch, length)).astype(np.int32)
        text[:, -1] = config.text.vocab_size - 1
        data = {
            "image": jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), np.uint8)),
            "text": jnp.asarray(text),
        }
        t0 = time.perf_counter()
        step = jax.jit(step_lib.make_train_step(model, tx, schedule, mesh=None))
        compiled = step.lower(state, data).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        print(
            json.dumps(
                {"event": "compiled", "config": name, "compile_s": time.perf_counter() - t0}
            ),
            flush=True,
        )
        out[name] = (compiled, state, data, flops)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    host_memory.tune_for_xla_cpu(default=True)  # before JAX starts, as benchmarks/train_step.py

    steps = build(args.model, args.batch, names)
    for compiled, state, data, _ in steps.values():  # one untimed warm-up step each
        jax.block_until_ready(compiled(state, data))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            compiled, state, data, _ = steps[name]
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(state, data))
                times[name].append(time.perf_counter() - t0)
    ref = float(np.median(times[names[0]]))
    ref_flops = steps[names[0]][3]
    summary = {}
    for name in names:
        t = np.asarray(times[name])
        rate, scale, tokens = CONFIGS[name]
        median = float(np.median(t))
        row = {
            "config": name,
            "model": args.model,
            "batch": args.batch,
            "patch_dropout": rate,
            "image_size": int(models.get_model_config(args.model).image_size * scale),
            "text_tokens": tokens or models.get_model_config(args.model).context_length,
            "step_s_median": median,
            "step_s_min": float(t.min()),
            "step_s_max": float(t.max()),
            "timed_steps": int(t.size),
            "samples_per_s": args.batch / median,
            "time_ratio": median / ref,
            "flops_ratio": steps[name][3] / ref_flops if ref_flops else None,
        }
        summary[name] = round(row["time_ratio"], 3)
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "summary": "step time relative to " + names[0],
                "ratios": summary,
                "cpu": platform.processor() or platform.machine(),
                "devices": str(jax.devices()[0]),
                "jax": jax.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
