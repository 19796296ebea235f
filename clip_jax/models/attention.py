"""Scaled dot-product attention for the Transformer blocks, with cuDNN's fused kernel where it
accepts the shapes and a padded sequence where it refuses the length.

`model.attention_impl` (and `dot_product_attention(..., implementation=)`) takes:
  "" / None   `jax.nn.dot_product_attention` chooses (XLA today).
  "xla"       XLA's attention: materialises the [B, N, T, T] scores.
  "cudnn"     cuDNN fused (flash) attention on the sequence as it is; if cuDNN refuses that
              length, on the sequence zero-padded to an even length, then to a multiple of 64;
              if it refuses those too (or there is no cuDNN / NVIDIA GPU), XLA. The choice is
              made once per shape at trace time and logged.
  "cudnn_padded"  cuDNN on the sequence padded to a multiple of 64 (then XLA).
  "cudnn_padN", "xla_padN"  padded to a multiple of N (benchmarks; "xla_padN" runs the padded
              code path on any backend, which is how the CPU tests check it).

Why padding: on an H100 with jax 0.11.2, `implementation="cudnn"` refused both towers at train
time ("Unsupported sequence length Q 197, KV 197" for ViT-B/16's 196 patches + class token,
"Q 77, KV 77" for the text). JAX raises that message (`check_is_flash_attention` in
jax/_src/cudnn/fused_attention_stablehlo.py) for odd lengths in training; jax 0.10.2 applies
it only with a bias, older releases to every training call, and releases before that wanted
multiples of 64 for the non-flash kernel. Even lengths and multiples of 64 pass every version
read. Padding never changes the result:
- non-causal (image tower): padded keys are masked with `key_value_seq_lengths` (and padded
  queries with `query_seq_lengths`): a padding mask, not a bias, so cuDNN keeps its flash
  kernel and the bias-only length rules do not apply;
- causal (text tower): no sequence lengths at all. Padding goes at the end, so causality
  already hides every padded key from every real query; padded queries produce rows that are
  sliced off, their output cotangent is zero, so they add exactly nothing to any gradient.
  This keeps cuDNN's plain CAUSAL mask (no fully-masked rows, no extra operands).
The padded rows and columns cost FLOPs (197 -> 198 is +1%, 197 -> 256 is +69% of the
attention matmuls); `benchmarks/attention_variants.py` times each choice.

Not verified without a GPU: cuDNN under a multi-device batch-sharded jit with sequence lengths
(the image tower's padded path): JAX's custom partitioning passes the seq-length operands with
their own sharding.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

DEFAULT_PAD_MULTIPLE = 64
# "cudnn" retries a refused length at these multiples, in order.
CUDNN_RETRY_MULTIPLES = (2, DEFAULT_PAD_MULTIPLE)
_NAME = re.compile(r"(xla|cudnn)(?:_pad(\d+)|_padded)?$")
_PLANS: dict[tuple, int | None] = {}  # what cudnn_plan decided, for reports


class Implementation(NamedTuple):
    """A parsed `attention_impl`: backend (None: JAX's default, "xla" or "cudnn") and the
    multiple the sequence is padded to (None: not padded, or for "cudnn" only if refused)."""

    backend: str | None
    pad_multiple: int | None


def parse_implementation(name: str | None) -> Implementation:
    """`attention_impl` string -> Implementation; ValueError (one line) for unknown names."""
    if not name:
        return Implementation(None, None)
    match = _NAME.match(name)
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"attention_impl={name!r}: expected '', 'xla', 'cudnn', "
            f"'cudnn_padded', 'cudnn_padN' or 'xla_padN' (N >= 1)"
        )
    backend, multiple = match.group(1), match.group(2)
    if multiple is not None:
        return Implementation(backend, int(multiple))
    if name.endswith("_padded"):
        return Implementation(backend, DEFAULT_PAD_MULTIPLE)
    return Implementation(backend, None)


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


def padded_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool,
    length: int,
    implementation: str | None,
) -> jax.Array:
    """Attention over the sequence zero-padded to `length`, padding masked; same result as
    unpadded attention.

    Args:
      query, key, value: [B, T, N, H] (self-attention: the same T for all three).
      causal: each query attends to itself and earlier positions only.
      length: padded sequence length, >= T.
      implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn" or None).
    Returns:
      [B, T, N, H], the rows of the real positions.
    """
    batch, seq, _, _ = query.shape
    if key.shape[1] != seq or value.shape[1] != seq:
        raise ValueError(
            f"padded_attention is self-attention: query length {seq}, key "
            f"{key.shape[1]}, value {value.shape[1]}"
        )
    if length < seq:
        raise ValueError(f"padded length {length} is shorter than the sequence ({seq})")
    if length == seq:  # nothing to mask: cuDNN's plain NO_MASK / CAUSAL kernels
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=causal, implementation=implementation
        )
    pad = ((0, 0), (0, length - seq), (0, 0), (0, 0))
    query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
    lengths = None if causal else jnp.full((batch,), seq, jnp.int32)
    out = jax.nn.dot_product_attention(
        query,
        key,
        value,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :seq]


def _cudnn_candidates(seq: int, pad_multiple: int | None) -> list[int]:
    if pad_multiple is not None:
        return [padded_length(seq, pad_multiple)]
    lengths = [seq] + [padded_length(seq, m) for m in CUDNN_RETRY_MULTIPLES]
    return list(dict.fromkeys(lengths))  # unique, in order


@functools.lru_cache(maxsize=None)
def cudnn_plan(
    shape: tuple[int, ...], dtype: str, causal: bool, pad_multiple: int | None
) -> int | None:
    """The sequence length cuDNN attention will run at for q/k/v of `shape` [B, T, N, H], or
    None if cuDNN refuses every candidate (use XLA). Decided by compiling cuDNN attention's
    gradient for one example of that shape: JAX's shape checks run when the backward is
    traced (under remat or scan that would be after the model's own forward, outside any
    try), and cuDNN's own refusals come at compile time. Cached: one decision (and one log
    line) per shape; the probe costs one small compile per shape on the GPU."""
    backend = jax.default_backend()
    if backend != "gpu":
        logger.warning(
            "attention_impl=cudnn needs an NVIDIA GPU (JAX backend is %r): "
            "using XLA attention for %s",
            backend,
            shape,
        )
        return None
    probe = jax.ShapeDtypeStruct((1, *shape[1:]), jnp.dtype(dtype))
    refusals = []
    for length in _cudnn_candidates(shape[1], pad_multiple):

        def loss(q, k, v, length=length):
            out = padded_attention(q, k, v, causal=causal, length=length, implementation="cudnn")
            return jnp.sum(out.astype(jnp.float32))

        try:
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(probe, probe, probe).compile()
        except (NotImplementedError, RuntimeError) as e:
            # NotImplementedError: JAX's shape checks; RuntimeError: "cuDNN is not detected"
            # and XLA's compile errors (jax.errors.JaxRuntimeError is a RuntimeError).
            refusals.append(f"length {length}: {e}")
            continue
        _PLANS[(shape, dtype, causal, pad_multiple)] = length
        if refusals or length != shape[1]:
            logger.info(
                "cuDNN attention for %s (causal=%s) at sequence length %d%s",
                shape,
                causal,
                length,
                f" (refused: {'; '.join(refusals)})" if refusals else "",
            )
        return length
    logger.warning(
        "cuDNN refused attention for %s (causal=%s), using XLA: %s",
        shape,
        causal,
        "; ".join(refusals),
    )
    _PLANS[(shape, dtype, causal, pad_multiple)] = None
    return None


def cudnn_plans() -> list[dict]:
    """The decisions `cudnn_plan` made in this process on a GPU: shape [B, T, N, H], causal,
    and the length cuDNN runs at (None: XLA), e.g. for a benchmark's report."""
    return [
        {
            "shape": list(shape),
            "dtype": dtype,
            "causal": causal,
            "pad_multiple": multiple,
            "length": length,
        }
        for (shape, dtype, causal, multiple), length in _PLANS.items()
    ]


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool, implementation: str | None
) -> jax.Array:
    """Multi-head self-attention, softmax(q k^T / sqrt(H)) v per head.

    Args:
      query, key, value: [B, T, N, H].
      causal: mask attention to earlier positions (text tower).
      implementation: an `attention_impl` string (see the module docstring).
    Returns:
      [B, T, N, H].
    """
    impl = parse_implementation(implementation)
    seq = query.shape[1]
    if impl.backend == "cudnn":
        length = cudnn_plan(tuple(query.shape), str(query.dtype), causal, impl.pad_multiple)
        if length is None:
            return jax.nn.dot_product_attention(
                query, key, value, is_causal=causal, implementation="xla"
            )
        return padded_attention(
            query, key, value, causal=causal, length=length, implementation="cudnn"
        )
    if impl.pad_multiple is not None:
        return padded_attention(
            query,
            key,
            value,
            causal=causal,
            length=padded_length(seq, impl.pad_multiple),
            implementation=impl.backend,
        )
    return jax.nn.dot_product_attention(
        query, key, value, is_causal=causal, implementation=impl.backend
    )
