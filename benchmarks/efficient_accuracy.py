"""Accuracy at equal training time, with and without FLIP patch dropout, on the demo data.

    PYTHONPATH=. python benchmarks/efficient_accuracy.py --steps 600 --batch 128

Two runs of the same model (default tiny-vit) on the shipped demo data, same seed, same data
order, trained in one process with their steps interleaved, so a shared machine slows both
alike:

- baseline: `--steps` steps, every patch;
- FLIP: patch dropout `--rate` for most steps, then an unmasked final phase of
  `--unmasked-fraction` of its steps, one warmup-cosine schedule over all of them. Its step
  count is set from step times measured at the start (interleaved) so that its total step time
  matches the baseline's.

The budget counted is the train-step time (forward, loss, backward, AdamW), not the input
pipeline's. Both models are then evaluated with the default evaluators (zero-shot on the demo
classify split, retrieval on the 800 held-out pairs). Prints JSON lines: the calibration, one
line per run (steps, measured step time, metrics), then a summary.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from efficient_training import optimizer  # this folder is on sys.path when run as a script

from clip_jax import evaluation, host_memory, models, sharding, tokenizers
from clip_jax import step as step_lib
from clip_jax.data import config as data_config_lib
from clip_jax.data import pipeline
from clip_jax.evaluation import config as eval_config_lib


class Run:
    """One training run: its model(s), state, data iterator and the time its steps took."""

    def __init__(self, name, model_config, rates, total_steps, batch, lr, seed, tokenizer):
        self.name = name
        self.total_steps = total_steps
        self.models = {r: models.CLIP(model_config, patch_dropout=r) for r in set(rates)}
        self.rates = rates  # patch dropout of each step
        model = self.models[rates[0]]
        abstract = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
        tx, schedule = optimizer(abstract, total_steps, lr, max(1, total_steps // 10))
        self.state = jax.jit(lambda: step_lib.init_train_state(model, tx, seed))()
        size, length = model_config.image_size, model_config.context_length
        batch_shape = {
            "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
            "text": jax.ShapeDtypeStruct((batch, length), np.int32),
        }
        # Compiled up front, so no step's time includes a compile.
        self.steps = {
            r: jax.jit(step_lib.make_train_step(m, tx, schedule, mesh=None), donate_argnums=0)
            .lower(self.state, batch_shape)
            .compile()
            for r, m in self.models.items()
        }
        data = data_config_lib.get_default_config()
        data.source, data.split = "demo", "train"
        self.data = pipeline.build_train_dataset(
            data,
            image_size=model_config.image_size,
            tokenizer=tokenizer,
            context_length=model_config.context_length,
            local_batch_size=batch,
            seed=seed,
        ).as_numpy_iterator()
        self.step = 0
        self.step_time = 0.0
        self.losses = []

    def done(self) -> bool:
        return self.step >= self.total_steps

    def advance(self) -> float:
        batch = next(self.data)
        batch = {"image": batch["image"], "text": batch["text"]}
        batch = jax.device_put(batch)
        jax.block_until_ready(batch)
        fn = self.steps[self.rates[self.step]]
        t0 = time.perf_counter()
        self.state, metrics = fn(self.state, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - t0
        self.step_time += elapsed
        self.losses.append(float(metrics["loss"]))
        self.step += 1
        return elapsed


def calibrate(config, rate, batch, tokenizer, steps=30) -> float:
    """Median masked / unmasked step-time ratio, steps interleaved after one warm-up step."""
    runs = [
        Run(f"cal{r}", config, [r] * (steps + 1), steps + 1, batch, 1e-4, 0, tokenizer)
        for r in (0.0, rate)
    ]
    times = {0.0: [], rate: []}
    for i in range(steps + 1):
        for run in runs if i % 2 == 0 else runs[::-1]:
            t = run.advance()
            if i >= 1:
                times[run.rates[0]].append(t)
    return float(np.median(times[rate]) / np.median(times[0.0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--steps", type=int, default=600, help="baseline steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rate", type=float, default=0.5, help="patch dropout of FLIP's run")
    parser.add_argument("--unmasked-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    host_memory.tune_for_xla_cpu(default=True)

    config = models.get_model_config(args.model)
    tokenizer = tokenizers.get("clip-bpe")
    ratio = calibrate(config, args.rate, args.batch, tokenizer)
    # Masked steps M and unmasked steps U with M * ratio + U = steps and U = f * (M + U).
    f = args.unmasked_fraction
    total = int(round(args.steps / ((1 - f) * ratio + f)))
    unmasked = int(round(f * total))
    print(json.dumps({"calibration": {"masked_over_unmasked_step_time": ratio}}), flush=True)

    common = dict(batch=args.batch, lr=args.lr, seed=args.seed, tokenizer=tokenizer)
    flip_rates = [args.rate] * (total - unmasked) + [0.0] * unmasked
    runs = [
        Run("baseline", config, [0.0] * args.steps, args.steps, **common),
        Run("flip", config, flip_rates, total, **common),
    ]
    t0 = time.perf_counter()
    while not all(r.done() for r in runs):
        # Advance the run that has used less step time: both progress side by side.
        pending = [r for r in runs if not r.done()]
        min(pending, key=lambda r: (r.step_time, r.name)).advance()
    wall = time.perf_counter() - t0

    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    eval_config = eval_config_lib.get_default_config()
    del eval_config.evaluators["linear_probe"]
    results = {}
    for run in runs:
        plain = models.CLIP(config)
        metrics = evaluation.run_evaluators(
            eval_config, plain, {"params": run.state.params}, tokenizer, mesh, run.step
        )
        row = {
            "run": run.name,
            "steps": run.step,
            "masked_steps": sum(1 for r in run.rates if r > 0),
            "step_time_s": run.step_time,
            "samples_seen": run.step * args.batch,
            "final_loss_mean10": float(np.mean(run.losses[-10:])),
            **{k: float(v) for k, v in metrics.items()},
        }
        results[run.name] = row
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "summary": "equal step time, demo data",
                "model": args.model,
                "batch": args.batch,
                "rate": args.rate,
                "wall_s_both_runs": wall,
                "step_time_ratio_flip_over_baseline": results["flip"]["step_time_s"]
                / results["baseline"]["step_time_s"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
