"""The value every evaluator returns."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class EvalResult:
    """`metrics`: flat {name: float} for logging (e.g. {"top1": 0.41}); `details`: anything
    JSON-serialisable for the results file (per-class accuracy, baselines, counts, sweeps)."""

    metrics: dict[str, float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def get_option(config: Any, key: str, default: Any) -> Any:
    """`config[key]` for a ConfigDict/dict evaluator block, `default` when absent."""
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value
