"""Runs zero-shot benchmarks (`clip_jax.evaluation.benchmarks`) on prepared TFDS data.

    record = run_benchmarks(resolve("all"), model, variables, tokenizer, mesh,
                            tfds_data_dir="~/tensorflow_datasets", paper_model="ViT-B-32")
    print(format_benchmark_table(record))

Nothing is downloaded: a benchmark whose TFDS data is not prepared in `tfds_data_dir` is
listed under "skipped" with the `tfds build` command that prepares it. All benchmarks share one
`Embedder` (one compiled program per tower) and one class-embedding cache, so ImageNet-V2,
-Sketch, -A and -R reuse ImageNet's 1,000 x 80 prompt embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from absl import logging

from clip_jax.embedder import Embedder
from clip_jax.evaluation.benchmarks import PAPER_MODELS, Benchmark
from clip_jax.evaluation.zeroshot import evaluate_zeroshot


def _builder(bench: Benchmark, tfds_data_dir: str):
    import tensorflow_datasets as tfds  # slow import; only paid when benchmarks run

    return tfds.builder(bench.tfds_name, data_dir=tfds_data_dir)


def is_prepared(bench: Benchmark, tfds_data_dir: str) -> bool:
    """Whether `tfds build` has written this benchmark's dataset into `tfds_data_dir`."""
    import tensorflow as tf

    builder = _builder(bench, tfds_data_dir)
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def prepare_hint(bench: Benchmark, tfds_data_dir: str) -> str:
    """The command that prepares `bench`'s data, plus TFDS's manual-download note if any."""
    import tensorflow_datasets as tfds

    command = bench.build_command(tfds_data_dir)
    manual = getattr(
        tfds.builder_cls(bench.tfds_name.split("/")[0]), "MANUAL_DOWNLOAD_INSTRUCTIONS", None
    )
    if manual:
        command += " --manual_dir DIR (TFDS cannot download it: " + " ".join(manual.split()) + ")"
    return command


def paper_model_for(config, source: str | None) -> str | None:
    """The paper's name of an OpenAI model ("ViT-B-32"), or None.

    `config` (CLIPConfig) must have exactly the architecture of one of `PAPER_MODELS` (the
    activation is not compared: open_clip's names mean GELU, OpenAI's weights use QuickGELU),
    and `source` (model.json's record of the converted file) must mention "openai".
    """
    from clip_jax.models.registry import get_model_config, set_activation

    if not source or "openai" not in source.lower():
        return None

    def canonical(c):
        return dataclasses.replace(
            set_activation(c, "quick_gelu"), init_logit_scale=0.0, init_logit_bias=None
        )

    mine = canonical(config)
    for name in PAPER_MODELS:
        if canonical(get_model_config(name)) == mine:
            return name
    return None


def run_benchmarks(
    benchmarks: Sequence[Benchmark],
    model,
    variables: dict[str, Any],
    tokenizer,
    mesh,
    tfds_data_dir: str,
    *,
    batch_size: int = 256,
    resize_method: str = "bicubic",
    paper_model: str | None = None,
    embedder: Embedder | None = None,
    class_cache: dict | None = None,
) -> dict[str, Any]:
    """Evaluates every prepared benchmark; returns a JSON-ready record.

    record["results"][name]: metric, score (fraction), paper_score (fraction or None), metrics
    (top1, top5, mean_per_class, num_examples), num_classes, num_templates, seconds, details
    (per-class accuracy and counts). record["skipped"][name]: reason and the `tfds build`
    command. record["summary"]: mean score over the evaluated benchmarks, and over those with a
    paper number next to the paper's mean on the same ones. Errors other than "not prepared"
    propagate: a broken dataset must not look like a bad model.
    """
    if paper_model is not None and paper_model not in PAPER_MODELS:
        raise ValueError(
            f"paper_model={paper_model!r}; the paper has numbers for {', '.join(PAPER_MODELS)}"
        )
    embedder = embedder or Embedder(model, variables, mesh, batch_size)
    class_cache = {} if class_cache is None else class_cache
    results: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for bench in benchmarks:
        if not is_prepared(bench, tfds_data_dir):
            hint = prepare_hint(bench, tfds_data_dir)
            skipped[bench.name] = {
                "reason": f"{bench.tfds_name} is not prepared in {tfds_data_dir}",
                "command": hint,
            }
            logging.warning(
                "benchmark %s skipped: %s is not prepared; run: %s",
                bench.name,
                bench.tfds_name,
                hint,
            )
            continue
        start = time.perf_counter()
        block = bench.zeroshot_block(tfds_data_dir)
        block.batch_size, block.resize_method = batch_size, resize_method
        result = evaluate_zeroshot(
            model, variables, tokenizer, mesh, block, embedder=embedder, class_cache=class_cache
        )
        seconds = time.perf_counter() - start
        paper = bench.paper.get(paper_model) if paper_model else None
        results[bench.name] = {
            "title": bench.title,
            "tfds_name": bench.tfds_name,
            "split": bench.split,
            "metric": bench.metric,
            "score": float(result.metrics[bench.metric]),
            "paper_score": None if paper is None else round(paper / 100.0, 6),
            "metrics": dict(result.metrics),
            "num_classes": bench.num_classes,
            "num_templates": len(bench.templates),
            "seconds": seconds,
            "details": result.details,
        }
        logging.info(
            "benchmark %s: %s %.4f (%d images, %.1f s)",
            bench.name,
            bench.metric,
            results[bench.name]["score"],
            int(result.metrics["num_examples"]),
            seconds,
        )
    return {
        "tfds_data_dir": tfds_data_dir,
        "paper_model": paper_model,
        "results": results,
        "skipped": skipped,
        "summary": _summary(results),
    }


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    scores = [r["score"] for r in results.values()]
    with_paper = [r for r in results.values() if r["paper_score"] is not None]
    summary: dict[str, Any] = {
        "num_evaluated": len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
    }
    if with_paper:
        summary["num_with_paper"] = len(with_paper)
        summary["mean_score_with_paper"] = sum(r["score"] for r in with_paper) / len(with_paper)
        summary["mean_paper_score"] = sum(r["paper_score"] for r in with_paper) / len(with_paper)
    return summary


def format_benchmark_table(record: dict[str, Any]) -> str:
    """An aligned text table of `run_benchmarks`' record (percentages), then the skipped ones."""
    paper_model = record.get("paper_model")
    header = ["benchmark", "dataset", "metric", "classes", "images", "score"]
    if paper_model:
        header += [f"paper {paper_model}", "diff"]
    rows = []
    for name, r in record["results"].items():
        row = [
            name,
            f"{r['tfds_name']} {r['split']}",
            r["metric"],
            str(r["num_classes"]),
            str(int(r["metrics"]["num_examples"])),
            f"{100 * r['score']:.2f}",
        ]
        if paper_model:
            row += _paper_cells(r["score"], r["paper_score"])
        rows.append(row)
    summary = record.get("summary", {})
    evaluated, with_paper = summary.get("num_evaluated", 0), summary.get("num_with_paper", 0)
    if evaluated:
        row = ["mean", f"{evaluated} benchmarks", "", "", "", f"{100 * summary['mean_score']:.2f}"]
        if paper_model:
            row += _paper_cells(
                summary["mean_score"],
                summary.get("mean_paper_score") if with_paper == evaluated else None,
            )
        rows.append(row)
    if paper_model and 0 < with_paper < evaluated:
        ours = summary["mean_score_with_paper"]
        rows.append(
            [
                "mean w/ paper",
                f"{with_paper} benchmarks",
                "",
                "",
                "",
                f"{100 * ours:.2f}",
                *_paper_cells(ours, summary["mean_paper_score"]),
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [
        "  ".join(f"{c:<{w}}" for c, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    if not rows:
        lines.append("(no benchmark evaluated)")
    for name, s in record.get("skipped", {}).items():
        lines.append(f"skipped {name}: {s['reason']}; prepare it with: {s['command']}")
    return "\n".join(lines)


def _paper_cells(score: float, paper: float | None) -> list[str]:
    """[paper %, measured - paper in points], or dashes without a paper number."""
    if paper is None:
        return ["-", "-"]
    return [f"{100 * paper:.1f}", f"{100 * (score - paper):+.2f}"]
