"""Short-text training (CLIPA): captions cut to a shorter context than the model's.

CLIPA (Li et al. 2023, "An Inverse Scaling Law for CLIP Training") trains most steps with
short text (e.g. 8-32 tokens instead of 77) and low-resolution images, then continues briefly
at full size. The text tower's cost is linear-to-quadratic in the context length, and its
positional embedding needs no change: a [B, L'] batch uses the first L' positions.

Ways to cut a caption to `length` tokens, keeping the start-of-text token (when the tokenizer
has one) and the end-of-text token, so `length - 2` content tokens remain (`length - 1`
without a start token):

- "truncate": the first ones (what tokenizing at `length` gives; the default).
- "random_subset": a random subset, in their original order (CLIPA's "random" masking,
  open_clip's `random_mask_tokenize`).
- "random_block": a random run of consecutive tokens (open_clip's `simple_mask_tokenize`).

Captions that already fit are kept whole. The random choices are seeded by (seed, process,
batch position), so a resumed run cuts its captions exactly as the uninterrupted one.

Sentence dropout (`data.sentence_dropout`, `drop_sentences`) works on the caption strings
before tokenisation: each sentence is dropped with a probability, at least one kept. On
captions made of a title, a description and keywords it teaches the text tower that each part
alone names the image, as a zero-shot prompt ("a drawing of a bird.") does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from clip_jax.data import exit_guard

if TYPE_CHECKING:
    import tensorflow as tf

MODES = ("truncate", "random_subset", "random_block")
_SALT = 5  # beside pipeline.py's per-purpose salts (1-4)
_SALT_SENTENCES = 6
# A sentence ends at ".", "!" or "?" followed by white space ("3.5 cm" stays whole).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _batch_rng(seed: int, process_index: int, salt: int, position: np.ndarray):
    """The random choices of one batch: seeded by (seed, process, purpose, the position's last
    entry: records consumed, unique per batch), so a resumed run repeats them."""
    records = int(np.asarray(position).reshape(-1)[-1])
    return np.random.default_rng([seed & 0xFFFFFFFF, process_index, salt, records])


def check(mode: str, length: int) -> None:
    """Raises ValueError naming the data key for an unknown mode or an impossible length."""
    if mode not in MODES:
        raise ValueError(f"data.text_shorten={mode!r}; choose one of {MODES}")
    if isinstance(length, bool) or not isinstance(length, int) or (0 < length < 3) or length < 0:
        raise ValueError(
            f"data.context_length={length!r} must be 0 (the model's context) or >= 3 "
            f"(start, end and at least one content token)"
        )


def shorten(
    tokens: np.ndarray,
    length: int,
    mode: str,
    rng: np.random.Generator,
    has_sot: bool = True,
    pad_id: int = 0,
) -> np.ndarray:
    """int32 [B, L] token rows (`[sot] + ids + [eot]`, right-padded) -> int32 [B, length].

    The end-of-text token is each row's last non-pad token (pad id 0 is also a real BPE token,
    so non-pad tokens are not counted). `rng` draws the random modes' choices.
    """
    check(mode, length)
    tokens = np.asarray(tokens)
    batch, full = tokens.shape
    head = 1 if has_sot else 0
    keep = length - head - 1  # content tokens that fit
    non_pad = tokens != pad_id
    eot = full - 1 - np.argmax(non_pad[:, ::-1], axis=1)  # [B]
    out = np.full((batch, length), pad_id, dtype=np.int32)
    for i in range(batch):
        e = int(eot[i])
        content = tokens[i, head:e]
        n = content.shape[0]
        if n > keep:
            if mode == "truncate":
                content = content[:keep]
            elif mode == "random_subset":
                content = content[np.sort(rng.permutation(n)[:keep])]
            else:  # random_block
                start = int(rng.integers(0, n - keep + 1))
                content = content[start : start + keep]
        row = np.concatenate([tokens[i, :head], content, tokens[i, e : e + 1]])
        out[i, : row.shape[0]] = row
    return out


def shorten_dataset(
    ds: "tf.data.Dataset",
    *,
    length: int,
    mode: str,
    seed: int,
    process_index: int,
    has_sot: bool,
) -> "tf.data.Dataset":
    """Maps batches {"text": int32 [B, L], "position": int64 [...], ...} to text int32
    [B, length]. The position's last entry (records consumed, unique per batch) seeds the
    random choices with (seed, process_index)."""
    import tensorflow as tf  # lazily: `check` serves config validation without TensorFlow

    check(mode, length)

    def body(tokens: np.ndarray, position: np.ndarray) -> np.ndarray:
        rng = _batch_rng(seed, process_index, _SALT, position)
        return shorten(tokens, length, mode, rng, has_sot=has_sot)

    guarded_body = exit_guard.guarded(body)  # here, not in the traced `apply` (see exit_guard)

    def apply(batch):
        text = tf.numpy_function(
            guarded_body, [batch["text"], batch["position"]], tf.int32, stateful=False
        )
        text.set_shape([batch["text"].shape[0], length])
        return dict(batch, text=text)

    return ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def drop_sentences(texts: list[str], probability: float, rng: np.random.Generator) -> list[str]:
    """Drops each sentence of each caption with `probability`, keeping at least one (drawn at
    random when all were dropped); the kept ones stay in order, joined by a space. Captions
    of one sentence are unchanged."""
    out = []
    for text in texts:
        sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
        if len(sentences) < 2 or probability <= 0:
            out.append(text)
            continue
        keep = rng.random(len(sentences)) >= probability
        if not keep.any():
            keep[rng.integers(len(sentences))] = True
        out.append(" ".join(s for s, k in zip(sentences, keep) if k))
    return out


def drop_sentences_in_batch(
    texts: "tf.Tensor",
    position: "tf.Tensor",
    *,
    probability: float,
    seed: int,
    process_index: int,
) -> "tf.Tensor":
    """`drop_sentences` on a batch of utf-8 strings `[B]`; `position` (the batch's resume
    point, unique per batch) seeds it with (seed, process_index), so a resumed run drops the
    same sentences."""
    import tensorflow as tf

    def body(strings: np.ndarray, position: np.ndarray) -> np.ndarray:
        rng = _batch_rng(seed, process_index, _SALT_SENTENCES, position)
        decoded = [s.decode("utf-8", errors="replace") for s in strings.tolist()]
        kept = drop_sentences(decoded, probability, rng)
        return np.asarray([s.encode("utf-8") for s in kept], dtype=object)

    guarded_body = exit_guard.guarded(body)  # here, not in a traced function (see exit_guard)
    out = tf.numpy_function(guarded_body, [texts, position], tf.string, stateful=False)
    out.set_shape(texts.shape)
    return out
