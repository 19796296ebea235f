"""Evaluation: zero-shot classification, image-text retrieval and linear probes.

    from clip_jax import evaluation
    metrics = evaluation.run_evaluators(evaluation.get_default_config(), model, variables,
                                        tokenizer, mesh, step)   # {"zeroshot/top1": ..., ...}

The CLIP paper's zero-shot benchmarks (class names, templates, TFDS sources, published numbers):
`evaluation.benchmark("imagenet1k")`, `evaluation.list_benchmarks()`.

The command line is `python -m clip_jax.evaluate`; the inference API is `clip_jax.load`.
Importing this package is cheap (configs import `clip_jax.evaluation.config`): the names
below and the submodules load on first use.
"""

import importlib

_LAZY = {
    "Benchmark": "clip_jax.evaluation.benchmarks",
    "benchmark": "clip_jax.evaluation.benchmarks",
    "list_benchmarks": "clip_jax.evaluation.benchmarks",
    "format_benchmark_table": "clip_jax.evaluation.benchmark_runner",
    "run_benchmarks": "clip_jax.evaluation.benchmark_runner",
    "get_default_config": "clip_jax.evaluation.config",
    "Embedder": "clip_jax.embedder",
    "LogisticRegression": "clip_jax.evaluation.linear_probe",
    "evaluate_linear_probe": "clip_jax.evaluation.linear_probe",
    "linear_probe_metrics": "clip_jax.evaluation.linear_probe",
    "EvalResult": "clip_jax.evaluation.result",
    "evaluate_retrieval": "clip_jax.evaluation.retrieval",
    "retrieval_metrics": "clip_jax.evaluation.retrieval",
    "EVALUATORS": "clip_jax.evaluation.runner",
    "evaluate_all": "clip_jax.evaluation.runner",
    "run_evaluators": "clip_jax.evaluation.runner",
    "summarize": "clip_jax.evaluation.summary",
    "TEMPLATE_SETS": "clip_jax.evaluation.templates",
    "get_templates": "clip_jax.evaluation.templates",
    "class_embeddings": "clip_jax.evaluation.zeroshot",
    "evaluate_zeroshot": "clip_jax.evaluation.zeroshot",
    "remap_labels": "clip_jax.evaluation.zeroshot",
    "zeroshot_metrics": "clip_jax.evaluation.zeroshot",
}
_SUBMODULES = (
    "benchmark_runner",
    "benchmarks",
    "config",
    "data",
    "linear_probe",
    "result",
    "retrieval",
    "runner",
    "summary",
    "templates",
    "zeroshot",
)

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'clip_jax.evaluation' has no attribute {name!r}")
    globals()[name] = value
    return value
