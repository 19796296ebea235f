"""Linear probe: L2-regularised multinomial logistic regression on frozen image embeddings.

As the CLIP paper (Appendix A.3): the regularisation strength is chosen on a validation split
carved from the training features (a log-spaced sweep, all strengths fitted at once with
`vmap`), then the classifier is refitted on all training features and scored on the test
features. The solver is full-batch accelerated gradient descent on standardised features (a
smooth convex problem; see `_fit`).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clip_jax.embedder import Embedder
from clip_jax.evaluation import data as data_lib
from clip_jax.evaluation.result import EvalResult, get_option

DEFAULT_L2_GRID = tuple(float(v) for v in np.logspace(-6, 2, 9))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _fit(x, y, l2s, num_classes: int, max_iters: int):
    """Minimises mean cross-entropy + l2/2 * ||W||^2 (bias not penalised) for every l2.

    x float32 [N, D], y int [N], l2s float32 [S] -> (W [S, D, C], b [S, C]).
    Accelerated gradient descent (FISTA momentum) with step 1/L, L the gradient's Lipschitz
    constant: 0.5 * sigma_max([x, 1])^2 / N + l2 (softmax cross-entropy has curvature <= 1/2).
    A fixed iteration count keeps the whole sweep a single compiled loop of small matmuls,
    much faster on CPU than a line-searching L-BFGS for these problem sizes.
    """
    n = x.shape[0]
    xb = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)  # [N, D+1]
    y_onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    lipschitz = 0.5 * jnp.linalg.norm(xb, ord=2) ** 2 / n
    penalised = jnp.ones((xb.shape[1], 1), x.dtype).at[-1].set(0.0)  # no bias penalty

    def fit_one(l2):
        step_size = 1.0 / (lipschitz + l2)

        def grad(w):
            probs = jax.nn.softmax(xb @ w, axis=-1)
            return xb.T @ (probs - y_onehot) / n + l2 * penalised * w

        def body(k, carry):
            w, w_prev = carry
            z = w + (k / (k + 3.0)) * (w - w_prev)  # FISTA momentum
            return z - step_size * grad(z), w

        w0 = jnp.zeros((xb.shape[1], num_classes), x.dtype)
        w, _ = jax.lax.fori_loop(0, max_iters, body, (w0, w0))
        return w[:-1], w[-1]

    return jax.vmap(fit_one)(l2s)


class LogisticRegression:
    """Multinomial logistic regression with an L2 penalty `l2` on the mean loss.

    Fitted by `_fit` (accelerated gradient descent, FISTA, `max_iters` iterations). Features
    are standardised with the training mean/std, which keeps the problem well conditioned for
    a fixed iteration count and makes `l2` comparable across models.
    """

    def __init__(self, l2: float = 1e-4, max_iters: int = 1000):
        self.l2 = float(l2)
        self.max_iters = int(max_iters)

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> "LogisticRegression":
        """x float [N, D], y int [N] in [0, num_classes)."""
        self._set_scaler(x)
        w, b = _fit(
            self._scale(x),
            jnp.asarray(y),
            jnp.asarray([self.l2], jnp.float32),
            num_classes,
            self.max_iters,
        )
        self.w, self.b = np.asarray(w[0]), np.asarray(b[0])
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, C] logits."""
        return np.asarray(self._scale(x)) @ self.w + self.b

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def _set_scaler(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self.mean = x.mean(axis=0)
        self.std = np.maximum(x.std(axis=0), 1e-6)

    def _scale(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray((np.asarray(x, np.float32) - self.mean) / self.std)


def sweep_l2(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iters: int = 1000,
) -> tuple[float, dict[float, float]]:
    """Fits every strength in `l2_grid` on the train features and returns (best l2, {l2:
    validation accuracy}); among equally accurate strengths the largest (simplest) wins."""
    probe = LogisticRegression(max_iters=max_iters)
    probe._set_scaler(x_train)
    grid = sorted(float(v) for v in l2_grid)
    w, b = _fit(
        probe._scale(x_train),
        jnp.asarray(y_train),
        jnp.asarray(grid, jnp.float32),
        num_classes,
        int(max_iters),
    )
    xv = np.asarray(probe._scale(x_val))
    logits = np.einsum("nd,sdc->snc", xv, np.asarray(w)) + np.asarray(b)[:, None, :]
    accs = (logits.argmax(axis=2) == np.asarray(y_val)[None, :]).mean(axis=1)
    scores = {l2: float(a) for l2, a in zip(grid, accs)}
    best = max(grid, key=lambda l2: (scores[l2], l2))
    return best, scores


def hash_fraction(keys: Sequence[str], salt: str) -> np.ndarray:
    """float [N] in [0, 1): a stable pseudo-random number per key (BLAKE2b of salt + key), used
    to split data reproducibly whatever the reading order. (Not CRC32: it is affine, so splits
    with different salts would be correlated, e.g. the validation split could come out empty.)
    """

    def one(key: str) -> float:
        digest = hashlib.blake2b(f"{salt}:{key}".encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    return np.asarray([one(k) for k in keys], np.float64)


def few_shot_indices(labels: np.ndarray, keys: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Indices of the first k samples of every class in a key-hash order (all if fewer)."""
    order = np.argsort(hash_fraction(keys, f"fewshot{seed}"), kind="stable")
    taken: dict[int, int] = {}
    chosen = []
    for i in order:
        label = int(labels[i])
        if taken.get(label, 0) < k:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(i)
    return np.sort(np.asarray(chosen, np.int64))


def linear_probe_metrics(
    x_train: np.ndarray,
    y_train: np.ndarray,
    keys_train: Sequence[str],
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    val_fraction: float = 0.2,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iters: int = 1000,
    few_shot: int = 0,
    seed: int = 0,
) -> EvalResult:
    """Probe accuracy: sweep l2 on a validation split of the train features (by key hash),
    refit on all train features with the best l2, score the test features.

    x_*: float [N, D] features; y_*: int [N] labels in [0, num_classes).
    Metrics: top1, mean_per_class, l2 (chosen strength), num_train, num_test.
    """
    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    keys_train = list(keys_train)
    if few_shot:
        idx = few_shot_indices(y_train, keys_train, int(few_shot), seed)
        x_train, y_train, keys_train = x_train[idx], y_train[idx], [keys_train[i] for i in idx]
    if len(y_train) < 2 or len(y_test) == 0:
        raise ValueError(
            f"linear probe needs training and test samples; got {len(y_train)} "
            f"train, {len(y_test)} test"
        )
    is_val = hash_fraction(keys_train, f"val{seed}") < val_fraction
    if is_val.all() or not is_val.any():
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training or validation samples "
            f"among {len(y_train)}"
        )
    best, scores = sweep_l2(
        x_train[~is_val],
        y_train[~is_val],
        x_train[is_val],
        y_train[is_val],
        num_classes,
        l2_grid,
        max_iters,
    )
    probe = LogisticRegression(best, max_iters).fit(x_train, y_train, num_classes)
    correct = probe.predict(x_test) == y_test
    counts = np.bincount(y_test, minlength=num_classes)
    hits = np.bincount(y_test, weights=correct, minlength=num_classes)
    present = counts > 0
    metrics = {
        "top1": float(correct.mean()),
        "mean_per_class": float(np.mean(hits[present] / counts[present])),
        "l2": best,
        "num_train": float(len(y_train)),
        "num_test": float(len(y_test)),
    }
    details = {
        "val_top1_by_l2": {f"{k:.3g}": v for k, v in scores.items()},
        "chance_top1": 1.0 / num_classes,
        "majority_baseline_top1": float(counts.max() / len(y_test)),
        "num_val": int(is_val.sum()),
    }
    return EvalResult(metrics, details)


def _labelled(data: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    keep = data["label"] >= 0
    if not keep.any():
        raise ValueError(f"linear probe: the {what} data has no labelled samples")
    if not keep.all():
        logging.warning(
            "linear probe: %d %s samples without a label are skipped", int((~keep).sum()), what
        )
    return {k: v[keep] for k, v in data.items()}


def evaluate_linear_probe(
    model, variables: dict[str, Any], tokenizer, mesh, config, embedder: Embedder | None = None
) -> EvalResult:
    """Linear probe on image embeddings of `config.data` (train) and `config.test_data` (test;
    when its `source` is empty the `data` samples are split by key hash with `test_fraction`).
    Options: data, test_data, test_fraction, val_fraction, few_shot, l2_grid, max_iters, seed,
    batch_size, resize_method.
    """
    del tokenizer  # images only
    spec = data_lib.source_spec(get_option(config, "data", {}), "linear_probe.data")
    embedder = embedder or Embedder(model, variables, mesh, get_option(config, "batch_size", 256))
    resize = get_option(config, "resize_method", "bicubic")
    seed = int(get_option(config, "seed", 0))

    def embed(s):
        return embedder.embed_dataset(
            data_lib.eval_batches(
                s,
                image_size=model.config.image_size,
                tokenizer=None,
                context_length=model.config.context_length,
                batch_size=embedder.batch_size,
                resize_method=resize,
                with_text=False,
            ),
            with_text=False,
        )

    train = _labelled(embed(spec), "train")
    test_cfg = get_option(config, "test_data", None)
    if test_cfg is not None and get_option(test_cfg, "source", ""):
        test = _labelled(embed(data_lib.source_spec(test_cfg, "linear_probe.test_data")), "test")
    else:
        fraction = float(get_option(config, "test_fraction", 0.3))
        if not 0 < fraction < 1:
            raise ValueError(f"linear_probe.test_fraction={fraction} must lie in (0, 1)")
        is_test = hash_fraction(train["key"], f"test{seed}") < fraction
        test = {k: v[is_test] for k, v in train.items()}
        train = {k: v[~is_test] for k, v in train.items()}
    num_classes = int(max(train["label"].max(), test["label"].max())) + 1
    return linear_probe_metrics(
        train["image"],
        train["label"],
        train["key"],
        test["image"],
        test["label"],
        num_classes,
        val_fraction=float(get_option(config, "val_fraction", 0.2)),
        l2_grid=tuple(get_option(config, "l2_grid", DEFAULT_L2_GRID)),
        max_iters=int(get_option(config, "max_iters", 1000)),
        few_shot=int(get_option(config, "few_shot", 0)),
        seed=seed,
    )
