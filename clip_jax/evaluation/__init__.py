"""Evaluation: zero-shot classification, image-text retrieval and linear probes.

    from clip_jax import evaluation
    metrics = evaluation.run_evaluators(evaluation.get_default_config(), model, variables,
                                        tokenizer, mesh, step)   # {"zeroshot/top1": ..., ...}

The command line is `python -m clip_jax.evaluate`; the inference API is `clip_jax.load`.
"""
from clip_jax.evaluation.config import get_default_config
from clip_jax.evaluation.embed import Embedder
from clip_jax.evaluation.linear_probe import (LogisticRegression, evaluate_linear_probe,
                                              linear_probe_metrics)
from clip_jax.evaluation.result import EvalResult
from clip_jax.evaluation.retrieval import evaluate_retrieval, retrieval_metrics
from clip_jax.evaluation.runner import EVALUATORS, evaluate_all, run_evaluators
from clip_jax.evaluation.templates import TEMPLATE_SETS, get_templates
from clip_jax.evaluation.zeroshot import class_embeddings, evaluate_zeroshot, zeroshot_metrics

__all__ = ["EVALUATORS", "Embedder", "EvalResult", "LogisticRegression", "TEMPLATE_SETS",
           "class_embeddings", "evaluate_all", "evaluate_linear_probe", "evaluate_retrieval",
           "evaluate_zeroshot", "get_default_config", "get_templates", "linear_probe_metrics",
           "retrieval_metrics", "run_evaluators", "zeroshot_metrics"]
