"""A few plain lines that put evaluation results next to what guessing would score.

`summarize(metrics, details)` takes `evaluate_all`'s two results and returns one line per
evaluator, e.g.

    zeroshot: top-1 38.1% vs chance 5.6% and majority class 9.3% (6.9x chance); top-5 71.0%
    retrieval: image->text R@1/5/10 12.0/31.5/44.1% vs chance 0.1/0.6/1.3%; text->image ...
    linear_probe: top-1 45.3% vs chance 5.6% and majority class 9.3%

The trainer logs it after its final evaluation and `python -m clip_jax.evaluate` prints it
under its table: the first thing a user wants to know is whether the model learned anything.
"""

from __future__ import annotations

from typing import Any


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _accuracy_line(name: str, metrics: dict[str, float], details: dict[str, Any]) -> str:
    top1 = metrics[f"{name}/top1"]
    chance = details.get("chance_top1")
    majority = details.get("majority_baseline_top1")
    line = f"{name}: top-1 {_pct(top1)}%"
    if chance is not None and majority is not None:
        line += f" vs chance {_pct(chance)}% and majority class {_pct(majority)}%"
        line += f" ({top1 / chance:.1f}x chance)"
    if f"{name}/top5" in metrics:
        line += f"; top-5 {_pct(metrics[f'{name}/top5'])}%"
    return line


def _retrieval_line(name: str, metrics: dict[str, float], details: dict[str, Any]) -> str:
    chance = details.get("chance", {})
    parts = []
    for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        ks = sorted(
            int(key.rsplit("@", 1)[1])
            for key in metrics
            if key.startswith(f"{name}/{direction}_R@")
        )
        if not ks:
            continue
        got = "/".join(_pct(metrics[f"{name}/{direction}_R@{k}"]) for k in ks)
        part = f"{label} R@{'/'.join(map(str, ks))} {got}%"
        if all(f"{direction}_R@{k}" in chance for k in ks):
            part += " vs chance " + "/".join(_pct(chance[f"{direction}_R@{k}"]) for k in ks) + "%"
        parts.append(part)
    return f"{name}: " + "; ".join(parts)


def summarize(metrics: dict[str, float], details: dict[str, Any]) -> list[str]:
    """One line per evaluator of `details` (`evaluate_all`'s results), in their order."""
    lines = []
    for name, info in details.items():
        kind = info.get("type")
        if kind in ("zeroshot", "linear_probe") and f"{name}/top1" in metrics:
            lines.append(_accuracy_line(name, metrics, info))
        elif kind == "retrieval":
            lines.append(_retrieval_line(name, metrics, info))
    return lines
