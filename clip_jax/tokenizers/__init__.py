"""Text tokenizers for clip_jax, behind one entry point: `get(name_or_path)`.

    tok = clip_jax.tokenizers.get("clip-bpe")      # OpenAI CLIP BPE, == open_clip.tokenize
    tok = clip_jax.tokenizers.get("captions.model")  # a SentencePiece model
    ids = tok(["a photo of a cat", b"utf-8 bytes work too"], context_length=77)
    # -> np.ndarray int32 [2, 77]: [sot] + ids + [eot], padded with 0, cut rows end with eot
    clip_jax.tokenizers.check_name("openai")  # ValueError (one line) where get() would fail

Every tokenizer has `__call__(texts, context_length)`, `encode(text)` (no special tokens),
`decode(ids)`, `vocab_size`, `eot_id`, `sot_id` (None when no start token is used) and
`pad_id` (0); see `base.Tokenizer`.

tf.data: tokenizers run on batches of Python strings; wrap them with `tf.numpy_function`
(strings arrive as a numpy object array of `bytes`, which is accepted). They are picklable and
cheap to construct.

Train a SentencePiece model on captions (one per line) from the shell:

    python -m clip_jax.tokenizers train --input captions.txt --vocab-size 32000 --output spm.model
    python -m clip_jax.tokenizers encode --tokenizer clip-bpe "a photo of a cat"
"""

from __future__ import annotations

import os
from typing import Union

from clip_jax.tokenizers.base import DEFAULT_CONTEXT_LENGTH, Tokenizer
from clip_jax.tokenizers.bpe import ClipBPETokenizer
from clip_jax.tokenizers.spm import SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "get",
    "check_name",
    "Tokenizer",
    "ClipBPETokenizer",
    "SentencePieceTokenizer",
    "train_sentencepiece",
    "DEFAULT_CONTEXT_LENGTH",
    "CLIP_BPE_NAMES",
]

#: Names accepted by `get` for the OpenAI CLIP BPE tokenizer (case-insensitive).
CLIP_BPE_NAMES = ("clip-bpe", "openai")


def get(
    name_or_path: Union[str, os.PathLike, Tokenizer], context_length: int = DEFAULT_CONTEXT_LENGTH
) -> Tokenizer:
    """Returns the tokenizer for `name_or_path`.

    - "clip-bpe" or "openai" (any case): OpenAI CLIP's BPE (`ClipBPETokenizer`);
    - a path ending in ".model": that SentencePiece model (`SentencePieceTokenizer`);
      FileNotFoundError when the file does not exist;
    - a `Tokenizer` instance is returned as is.

    `context_length` is the default row length of the tokenizer's `__call__`.
    Raises ValueError for anything else.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"tokenizer name or path must be a str or path, got {name_or_path!r}")
    spec = os.fspath(name_or_path)
    if spec.strip().lower() in CLIP_BPE_NAMES:
        return ClipBPETokenizer(context_length=context_length)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec, context_length=context_length)
    raise ValueError(
        f"unknown tokenizer {spec!r}; accepted: {' or '.join(map(repr, CLIP_BPE_NAMES))} (OpenAI"
        " CLIP BPE), or a path to a SentencePiece '.model' file (train one with"
        " `python -m clip_jax.tokenizers train`)"
    )


def check_name(name: Union[str, os.PathLike]) -> None:
    """Raises a one-line ValueError unless `get(name)` accepts `name`; returns None otherwise.

    For validating configs early: the check is `get` itself (a SentencePiece model is loaded,
    a few ms; the CLIP BPE vocabulary is not), so the two cannot disagree. A missing `.model`
    file, which `get` reports as FileNotFoundError, is a ValueError here too.
    """
    try:
        get(name)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(" ".join(str(e).split())) from None
