"""`python -m clip_jax.evaluate --config configs/clip.py:tiny --workdir runs/tiny [--step N]`.

Restores the model of a training run (latest or `--step` checkpoint) onto the devices present
now, whatever device count wrote it, or converted weights with `--init_from DIR`; runs the
evaluators of `config.eval` (default: `clip_jax.evaluation.get_default_config()`), prints a
results table and writes `<workdir>/eval_<step>.json` (`eval_converted.json` with
`--init_from`). Bad checkpoints and configs end with a one-line error and exit status 1.

`--benchmarks imagenet1k,cifar10 --tfds_data_dir DIR` (or `--benchmarks all`) runs the CLIP
paper's zero-shot benchmarks on prepared TFDS data instead (never downloads; unprepared ones are
listed with the `tfds build` command that prepares them), prints a table beside the paper's
numbers for OpenAI's models and writes `<workdir>/benchmarks_<step>.json`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# TensorFlow (tf.data) is loud by default; keep its C++ logs to warnings and up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = _WORKDIR = _STEP = _INIT_FROM = _DTYPE = None
_BENCHMARKS = _TFDS_DATA_DIR = _PAPER_MODEL = None


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program, so that this module can be
    imported next to `clip_jax.train`, which defines a `--config` flag of its own)."""
    global _CONFIG, _WORKDIR, _STEP, _INIT_FROM, _DTYPE
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file with an `eval` section (e.g. configs/clip.py:tiny); without "
        "one the default evaluators of clip_jax.evaluation run.",
        lock_config=False,
    )
    _WORKDIR = flags.DEFINE_string(
        "workdir",
        None,
        "Training workdir: checkpoints are read from it and eval_<step>.json is written to it.",
    )
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
    _INIT_FROM = flags.DEFINE_string(
        "init_from",
        None,
        "Evaluate converted weights (a directory "
        "written by python -m clip_jax.convert, or a Hub reference "
        "hf-hub:ORG/NAME[@REV] / pretrained:ARCH/TAG) instead of a "
        "checkpoint of --workdir.",
    )
    _DTYPE = flags.DEFINE_string(
        "dtype", None, "Compute dtype (default: the training run's, float32 for converted weights)."
    )
    define_benchmark_flags()


def define_benchmark_flags() -> None:
    """The flags of the zero-shot benchmark suite (`--benchmarks`)."""
    global _BENCHMARKS, _TFDS_DATA_DIR, _PAPER_MODEL
    _BENCHMARKS = flags.DEFINE_string(
        "benchmarks",
        None,
        "Run zero-shot benchmarks instead of the config's evaluators: 'all' "
        "or a comma-separated list (clip_jax.evaluation.list_benchmarks(), e.g. "
        "imagenet1k,cifar10); writes benchmarks_<step>.json.",
    )
    _TFDS_DATA_DIR = flags.DEFINE_string(
        "tfds_data_dir",
        None,
        "TFDS data_dir holding the prepared benchmark datasets (nothing is "
        "downloaded; unprepared ones are skipped with the command that prepares them).",
    )
    _PAPER_MODEL = flags.DEFINE_string(
        "paper_model",
        None,
        "Show the CLIP paper's zero-shot numbers of this OpenAI model "
        "(RN50, ViT-B-32, ViT-B-16, ViT-L-14) beside the measured ones; default: detected for "
        "converted OpenAI weights (model.json 'source' mentions openai and the architecture "
        "matches).",
    )


class EvalError(RuntimeError):
    """A problem the user can fix (bad path, step, config); reported in one line."""


def eval_config_of(config) -> Any:
    """`config.eval` when present, else the evaluation defaults."""
    from clip_jax.evaluation import get_default_config

    if config is not None and "eval" in config:
        return config.eval
    return get_default_config()


def evaluate(
    config,
    workdir: str,
    step: int | None = None,
    init_from: str | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, float], str]:
    """Restores, evaluates and writes the JSON; returns (metrics, path of the JSON)."""
    metrics, _, path = evaluate_with_details(config, workdir, step, init_from, dtype)
    return metrics, path


def evaluate_with_details(
    config,
    workdir: str,
    step: int | None = None,
    init_from: str | None = None,
    dtype: str | None = None,
) -> tuple[dict[str, float], dict[str, Any], str]:
    """`evaluate`, also returning `evaluate_all`'s details (chance levels, per-class accuracy):
    (metrics, details, path of the JSON)."""
    from clip_jax import evaluation, models, sharding, tokenizers

    eval_config = eval_config_of(config)
    try:
        evaluation.config.validate(eval_config)
    except ValueError as e:
        raise EvalError(str(e)) from None
    mesh = sharding.create_mesh()
    source = init_from or workdir
    restored = _load(workdir, step, init_from, sharding.replicated(mesh))
    model = models.create_model(restored.config, dtype=dtype or restored.dtype)
    tokenizer = tokenizers.get(restored.tokenizer)
    logging.info("evaluating %s (step %s) on %d devices", source, restored.step, jax.device_count())
    metrics, details = evaluation.evaluate_all(
        eval_config, model, restored.variables, tokenizer, mesh, restored.step
    )
    name = "eval_converted.json" if init_from else f"eval_{restored.step}.json"
    path = os.path.join(workdir, name)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        record = {
            "step": restored.step,
            "checkpoint": source if restored.kind == "hub" else os.path.abspath(source),
            "kind": restored.kind,
            "num_devices": jax.device_count(),
            "metrics": metrics,
            "details": details,
            "eval_config": eval_config.to_dict(),
        }
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)  # never leaves a half-written results file
    return metrics, details, path


def _load(workdir: str, step: int | None, init_from: str | None, sharding):
    """The model to evaluate: checkpoint `step` of `workdir`, or the converted / Hub weights
    `init_from`, as a `clip_jax.model_store.LoadedModel`; EvalError (one line) when bad."""
    from clip_jax import hub, model_store
    from clip_jax.checkpoint import CheckpointError

    if init_from and step is not None:
        raise EvalError("--step applies to workdir checkpoints, not to --init_from weights")
    if init_from:
        try:
            kind = model_store.locate(init_from)[0]
        except CheckpointError:
            kind = None
        if kind is None and hub.name_hint(init_from):
            raise EvalError(f"--init_from {init_from} does not exist{hub.name_hint(init_from)}")
        if kind not in ("converted", "hub"):
            raise EvalError(
                f"--init_from {init_from} is not a converted checkpoint (expected "
                f"{model_store.MODEL_JSON} and {model_store.VARIABLES_ITEM}/ in it) nor a Hub "
                f"reference (hf-hub:ORG/NAME or pretrained:ARCH/TAG); evaluate a training run "
                f"with --workdir (and --step)"
            )
    try:
        return model_store.load_model(init_from or workdir, step, sharding)
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_table(metrics: dict[str, float]) -> str:
    """Two aligned columns, `<evaluator>/<metric>` and its value (percent for accuracies)."""
    width = max(len(k) for k in metrics) if metrics else 0
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for key, value in metrics.items():
        metric = key.split("/", 1)[-1]
        is_fraction = metric.startswith(
            ("top", "mean_per_class", "image_to_text", "text_to_image", "mean_recall")
        )
        text = f"{100 * value:6.2f}%" if is_fraction else f"{value:.4g}"
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def evaluate_benchmarks(
    config,
    workdir: str,
    benchmarks: str,
    tfds_data_dir: str | None,
    step: int | None = None,
    init_from: str | None = None,
    dtype: str | None = None,
    paper_model: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Restores the model, runs the zero-shot `benchmarks` ("all" or "a,b") on the prepared
    TFDS data in `tfds_data_dir` and writes the JSON; returns (record, path of the JSON).

    The eval config (`config.eval` or the defaults) gives batch_size and resize_method.
    """
    from clip_jax import models, sharding, tokenizers
    from clip_jax.evaluation import benchmark_runner
    from clip_jax.evaluation import benchmarks as benchmarks_lib

    try:
        selected = benchmarks_lib.resolve(benchmarks)
    except ValueError as e:
        raise EvalError(f"--benchmarks: {e}") from None
    if not tfds_data_dir:
        raise EvalError(
            "--benchmarks needs --tfds_data_dir, the TFDS data_dir holding the "
            "prepared datasets (nothing is downloaded)"
        )
    tfds_data_dir = os.path.expanduser(tfds_data_dir)
    if not os.path.isdir(tfds_data_dir) and "://" not in tfds_data_dir:
        raise EvalError(f"--tfds_data_dir {tfds_data_dir} does not exist")
    if paper_model is not None and paper_model not in benchmarks_lib.PAPER_MODELS:
        raise EvalError(
            f"--paper_model {paper_model!r}: the paper has numbers for "
            f"{', '.join(benchmarks_lib.PAPER_MODELS)}"
        )
    eval_config = eval_config_of(config)
    mesh = sharding.create_mesh()
    source = init_from or workdir
    restored = _load(workdir, step, init_from, sharding.replicated(mesh))
    if paper_model is None and restored.origin:
        paper_model = benchmark_runner.paper_model_for(restored.config, restored.origin)
        if paper_model:
            logging.info("%s holds OpenAI's %s: showing the paper's numbers", source, paper_model)
    model = models.create_model(restored.config, dtype=dtype or restored.dtype)
    record = benchmark_runner.run_benchmarks(
        selected,
        model,
        restored.variables,
        tokenizers.get(restored.tokenizer),
        mesh,
        tfds_data_dir,
        batch_size=int(eval_config.batch_size),
        resize_method=eval_config.resize_method,
        paper_model=paper_model,
    )
    record.update(
        step=restored.step,
        checkpoint=source if restored.kind == "hub" else os.path.abspath(source),
        kind=restored.kind,
        num_devices=jax.device_count(),
    )
    name = "benchmarks_converted.json" if init_from else f"benchmarks_{restored.step}.json"
    path = os.path.join(workdir, name)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)  # never leaves a half-written results file
    return record, path


def _benchmarks_main() -> None:
    """`main` for `--benchmarks`: one-line errors, the table, the JSON path."""
    from clip_jax.checkpoint import CheckpointError
    from clip_jax.cli import one_line
    from clip_jax.evaluation.benchmark_runner import format_benchmark_table

    try:
        record, path = evaluate_benchmarks(
            _CONFIG.value,
            _WORKDIR.value,
            _BENCHMARKS.value,
            _TFDS_DATA_DIR.value,
            _STEP.value,
            _INIT_FROM.value,
            _DTYPE.value,
            _PAPER_MODEL.value,
        )
    except (EvalError, CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"clip_jax.evaluate: error: {one_line(e)}")
    print(format_benchmark_table(record))
    print(f"wrote {path}")


def main(argv) -> None:
    from clip_jax import platforms
    from clip_jax.host_memory import tune_for_xla_cpu
    from clip_jax.metrics import quiet_library_logs

    quiet_library_logs()
    platforms.avoid_absent_tpu()  # libtpu without a TPU: stay on the CPU, no TPU runtime start
    tune_for_xla_cpu()  # before the first JAX computation starts XLA's threads
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError(
            "--workdir is required (checkpoints are read from it and results written to it)"
        )
    if _BENCHMARKS.value:
        _benchmarks_main()
        return
    from clip_jax.checkpoint import CheckpointError
    from clip_jax.cli import one_line
    from clip_jax.evaluation.summary import summarize

    try:
        metrics, details, path = evaluate_with_details(
            _CONFIG.value, _WORKDIR.value, _STEP.value, _INIT_FROM.value, _DTYPE.value
        )
    except (EvalError, CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"clip_jax.evaluate: error: {one_line(e)}")
    print(format_table(metrics))
    print("\n".join(summarize(metrics, details)))
    print(f"wrote {path}")


if __name__ == "__main__":
    from clip_jax.cli import flags_parser

    define_flags()
    app.run(main, flags_parser=flags_parser("clip_jax.evaluate"))
