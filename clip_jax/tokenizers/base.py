"""The interface every clip_jax tokenizer implements, and the batching rule they share."""

from __future__ import annotations

import abc
from typing import Iterable, Optional, Sequence, Union

import numpy as np

DEFAULT_CONTEXT_LENGTH = 77

# What `__call__` accepts: one text or a batch of texts; each text is `str` or UTF-8 `bytes`
# (tf.numpy_function hands tf.string tensors over as numpy object arrays of `bytes`).
Text = Union[str, bytes, bytearray, np.str_, np.bytes_]
Texts = Union[Text, Iterable[Text], np.ndarray]


def as_str(text) -> str:
    """One text as `str`; `bytes` are decoded as UTF-8 (invalid bytes become U+FFFD)."""
    if isinstance(text, str):  # also np.str_
        return str(text)
    if isinstance(text, (bytes, bytearray)):  # also np.bytes_
        return bytes(text).decode("utf-8", errors="replace")
    raise TypeError(f"expected str or UTF-8 bytes, got {type(text).__name__}: {text!r:.80}")


def as_str_list(texts: Texts) -> list[str]:
    """One text or a batch of texts (list, tuple, 0-d or 1-d numpy array) as a list of `str`."""
    if isinstance(texts, (str, bytes, bytearray)):
        return [as_str(texts)]
    if isinstance(texts, np.ndarray):
        if texts.ndim == 0:
            return [as_str(texts.item())]
        if texts.ndim != 1:
            raise ValueError(f"expected a 1-d batch of texts, got an array of shape {texts.shape}")
        return [as_str(t) for t in texts.tolist()]
    return [as_str(t) for t in texts]


def check_context_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(f"context_length must be an int, got {context_length!r}")
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    return int(context_length)


def pack(
    rows: Sequence[Sequence[int]],
    context_length: int,
    *,
    sot_id: Optional[int],
    eot_id: int,
    pad_id: int = 0,
) -> np.ndarray:
    """Builds the int32 [N, context_length] batch from per-text ids without special tokens.

    Each row is `[sot_id] + ids + [eot_id]` (no sot when `sot_id` is None). A row longer than
    `context_length` is cut to `context_length` and its last token is set to `eot_id`, so every
    row holds exactly one end-of-text token (open_clip's rule); shorter rows are right-padded
    with `pad_id`.
    """
    out = np.full((len(rows), context_length), pad_id, dtype=np.int32)
    head = [] if sot_id is None else [sot_id]
    for i, ids in enumerate(rows):
        row = head + list(ids)
        if len(row) >= context_length:  # no room for eot after the text: cut, end with eot
            row = row[: context_length - 1]
        row.append(eot_id)
        out[i, : len(row)] = row
    return out


class Tokenizer(abc.ABC):
    """A text tokenizer producing fixed-length int32 id rows for CLIP text towers.

    Rows are `[sot_id] + encode(text) + [eot_id]`, right-padded with `pad_id` (always 0); a
    row too long for `context_length` is cut and ends with `eot_id` (see `pack`).

    Use from tf.data: tokenizers work on batches of Python strings, so the data pipeline wraps
    them with `tf.numpy_function`, which hands a tf.string batch over as a numpy object array
    of `bytes` (accepted here and decoded as UTF-8)::

        tok = clip_jax.tokenizers.get("clip-bpe")
        encode = exit_guard.guarded(lambda t: tok(t, context_length=77))
        ds = ds.map(lambda img, txt: (img, tf.numpy_function(
            encode, [txt], tf.int32, stateful=False)))

    (`clip_jax.data.exit_guard.guarded`: without it, a process that exits while such a map is
    busy can hang in the iterator's destructor.)

    Instances are cheap to construct (vocabularies load on first use and are shared within a
    process) and picklable, so worker processes may receive them or build their own.
    """

    #: Id used to pad rows; always 0.
    pad_id: int = 0

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.context_length = check_context_length(context_length)

    # --- what each tokenizer provides -------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (embedding rows the text tower needs)."""

    @property
    @abc.abstractmethod
    def eot_id(self) -> int:
        """End-of-text id; each row of `__call__` holds it exactly once."""

    @property
    @abc.abstractmethod
    def sot_id(self) -> Optional[int]:
        """Start-of-text id prepended to each row, or None when no start token is added."""

    @abc.abstractmethod
    def encode(self, text: Text) -> list[int]:
        """Ids of one text, without start/end tokens, untruncated."""

    @abc.abstractmethod
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a list/array of ids; by default cut at the first eot and skipping sot/pad."""

    # --- shared -----------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __call__(self, texts: Texts, context_length: Optional[int] = None) -> np.ndarray:
        """Tokenizes one text or a batch into an int32 array of shape [N, context_length].

        A single text gives N = 1. `context_length` defaults to the one given at construction.
        """
        context_length = check_context_length(
            self.context_length if context_length is None else context_length
        )
        rows = self.encode_batch(as_str_list(texts))
        return pack(
            rows, context_length, sot_id=self.sot_id, eot_id=self.eot_id, pad_id=self.pad_id
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(context_length={self.context_length})"
