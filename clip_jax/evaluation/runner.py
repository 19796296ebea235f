"""Runs every configured evaluator with one shared embedder."""

from __future__ import annotations

import time
from typing import Any, Callable

import ml_collections
from absl import logging

from clip_jax.embedder import Embedder
from clip_jax.evaluation import config as config_lib
from clip_jax.evaluation.linear_probe import evaluate_linear_probe
from clip_jax.evaluation.result import EvalResult
from clip_jax.evaluation.retrieval import evaluate_retrieval
from clip_jax.evaluation.zeroshot import evaluate_zeroshot

EVALUATORS: dict[str, Callable[..., EvalResult]] = {
    "zeroshot": evaluate_zeroshot,
    "retrieval": evaluate_retrieval,
    "linear_probe": evaluate_linear_probe,
}


def evaluate_all(
    eval_config, model, variables: dict[str, Any], tokenizer, mesh, step: int | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Runs `eval_config.evaluators` in order.

    Returns (metrics, details): metrics flat {"<name>/<metric>": float} (plus
    "<name>/seconds"); details {"<name>": {...}} JSON-ready extras (per-class accuracy,
    baselines, the evaluator's config). Errors propagate: a broken evaluator must not look
    like a bad model.
    """
    config_lib.validate(eval_config)
    embedder = Embedder(model, variables, mesh, int(eval_config.batch_size))
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    for name, block in eval_config.evaluators.items():
        block = _with_globals(block, eval_config)
        start = time.perf_counter()
        result = EVALUATORS[block.type](model, variables, tokenizer, mesh, block, embedder=embedder)
        seconds = time.perf_counter() - start
        for key, value in result.metrics.items():
            metrics[f"{name}/{key}"] = float(value)
        metrics[f"{name}/seconds"] = seconds
        details[name] = dict(result.details, type=block.type, config=block.to_dict())
        logging.info(
            "eval %s (step %s): %s (%.1f s)",
            name,
            step,
            ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()),
            seconds,
        )
    return metrics, details


def run_evaluators(
    eval_config, model, variables: dict[str, Any], tokenizer, mesh, step: int | None = None
) -> dict[str, float]:
    """The flat metrics of `evaluate_all`, keys like "zeroshot/top1" (for the trainer's log)."""
    return evaluate_all(eval_config, model, variables, tokenizer, mesh, step)[0]


def _with_globals(block, eval_config) -> ml_collections.ConfigDict:
    """The evaluator block plus the global options every evaluator reads."""
    block = ml_collections.ConfigDict(block.to_dict())
    block.batch_size = int(eval_config.batch_size)
    block.resize_method = eval_config.resize_method
    return block
