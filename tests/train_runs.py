"""Shared helpers for the trainer tests (a helper module, not collected: no tests here): the
tiny training config with overrides, a smaller model for multi-device runs, metrics readers."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A smaller model than tiny-vit (width 64) keeps compiles short; 2 layers so scan has a loop.
SMALL_MODEL = {
    "embed_dim": 64,
    "vision": {"width": 64, "heads": 2},
    "text": {"width": 64, "heads": 2},
}
# The same as config keys (model.embed_dim, model.vision.width, ...) and command-line flags.
SMALL = {
    "model.embed_dim": SMALL_MODEL["embed_dim"],
    **{f"model.{t}.{k}": v for t in ("vision", "text") for k, v in SMALL_MODEL[t].items()},
}
SMALL_FLAGS = [f"--config.{key}={value}" for key, value in SMALL.items()]


def get_config(variant="tiny", **overrides):
    """configs/clip.py:`variant` with test defaults (log every step, no periodic checkpoints,
    2 warmup steps, shuffle buffer 64); `overrides` use dotted keys ("data.source")."""
    spec = importlib.util.spec_from_file_location("clip_config", REPO / "configs" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.unlock()
    config.log_every = 1
    config.checkpoint_every = 0
    config.optim.warmup_steps = 2
    config.data.shuffle_buffer = 64
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    config.lock()
    return config


def small_config(**overrides):
    """The SMALL model on synthetic data, batch 16, 5 steps (plus `overrides`)."""
    base = {
        "batch_size": 16,
        "total_steps": 5,
        "data.source": "synthetic",
        **SMALL,
    }
    base.update(overrides)
    return get_config(**base)


def read_metrics(workdir):
    """The rows of `workdir`/metrics.jsonl as dicts."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    """{step: loss} from `workdir`/metrics.jsonl."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def synthetic_batch(n=32, seed=0) -> dict:
    """A batch for the SMALL model: image uint8 [n, 64, 64, 3] and text int32 [n, 32]."""
    import jax.numpy as jnp

    from clip_jax.data.synthetic import make_pool

    images, tokens = make_pool(n, 64, 32, 49408, seed)
    return {"image": jnp.asarray(images), "text": jnp.asarray(tokens)}


def max_abs_diff(a, b) -> float:
    """The largest absolute difference between the leaves of two pytrees."""
    import jax
    import jax.numpy as jnp

    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def train_argv(*args) -> list[str]:
    """The command line `python -m clip_jax.train --config configs/clip.py:tiny *args`."""
    return [
        sys.executable,
        "-m",
        "clip_jax.train",
        "--config",
        f"{REPO}/configs/clip.py:tiny",
        *args,
    ]


def run_train_cli(*args, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    """`train_argv(*args)` run to the end, output captured."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        train_argv(*args),
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )


def cli_error(proc: subprocess.CompletedProcess) -> str:
    """The one `clip_jax.train: error: ...` line of a failed run (asserting there is exactly
    one, a non-zero exit status and no traceback)."""
    assert proc.returncode != 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "clip_jax.train: error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]
