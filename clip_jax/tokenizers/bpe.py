"""OpenAI CLIP's byte-level BPE tokenizer, id for id identical to `open_clip.tokenize`.

Same vocabulary (OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped next to this file, see
NOTICE), same text cleaning as open_clip's default ("lower": ftfy.fix_text, html.unescape twice,
whitespace collapsed, lower-cased), same pre-tokenising regex, same merge loop and the same
truncation rule (see `clip_jax.tokenizers.base.pack`). Nothing is downloaded.

The vocabulary is read at first use and shared by every instance in the process; the BPE of
each pre-token is cached (LRU), so the cost per text is mostly cleaning and the regex.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Optional

import ftfy
import numpy as np
import regex

from clip_jax.tokenizers.base import DEFAULT_CONTEXT_LENGTH, Text, Tokenizer, as_str

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "bpe_simple_vocab_16e6.txt.gz")
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# Number of merges CLIP uses: 49152 tokens minus 256 bytes minus the 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
# Distinct pre-tokens whose BPE stays cached (a few hundred bytes each).
BPE_CACHE_SIZE = 1 << 18

# Text made only of these characters (printable ASCII without '&', plus tab and newline) is
# returned unchanged by ftfy.fix_text and by html.unescape: ftfy only rewrites non-ASCII text,
# HTML entities (which need '&'), ANSI escapes (ESC) and control characters (CR, VT, ...).
# Such text skips both calls; tests check the claim against ftfy itself.
_NEEDS_FULL_CLEAN = regex.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """open_clip's default ("lower") cleaning: ftfy, html unescape x2, whitespace, lower case."""
    if _NEEDS_FULL_CLEAN.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class _Vocab:
    """Everything loaded from one merges file, shared by all tokenizers using that file."""

    def __init__(self, path: str):
        with gzip.open(path) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:NUM_MERGES + 1]]
        byte_encoder = bytes_to_unicode()
        vocab = list(byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self.byte_decoder = {c: b for b, c in byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        # bytes -> CLIP's unicode alphabet in one C call: latin-1 maps byte b to chr(b).
        self.byte_table = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        self.special = {t: self.encoder[t] for t in SPECIAL_TOKENS}
        self.sot_id, self.eot_id = (self.encoder[t] for t in SPECIAL_TOKENS)
        self.pattern = regex.compile(
            "|".join(SPECIAL_TOKENS)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.token_ids = functools.lru_cache(maxsize=BPE_CACHE_SIZE)(self._token_ids)

    def _token_ids(self, token: str) -> tuple[int, ...]:
        """Ids of one pre-token (a match of `pattern`)."""
        special = self.special.get(token)
        if special is not None:
            return (special,)
        token = token.encode("utf-8").decode("latin-1").translate(self.byte_table)
        return tuple(self.encoder[piece] for piece in self._bpe(token))

    def _bpe(self, token: str) -> tuple[str, ...]:
        """The merge loop of CLIP's simple_tokenizer, unchanged in behaviour."""
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return word
        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            n = len(word)
            while i < n:
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < n - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(first)
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
        return word


@functools.lru_cache(maxsize=None)
def _load_vocab(path: str) -> _Vocab:
    return _Vocab(path)


class ClipBPETokenizer(Tokenizer):
    """OpenAI CLIP BPE: vocab 49408, sot 49406, eot 49407 (the largest id), pad 0.

    Pad 0 is also the id of the token "!" (without end-of-word), which occurs inside rows: e.g.
    "wow!(really)" -> [sot, 2781, 0, 263, 1414, 264, eot, 0, ...]. So the end of text is NOT at
    `count_nonzero(row) - 1`; find it as open_clip does, `argmax(row)` (eot is the largest id),
    or as the first `row == eot_id`, or as the last non-zero position.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 bpe_path: Optional[str] = None):
        super().__init__(context_length)
        self.bpe_path = os.fspath(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        if not os.path.isfile(self.bpe_path):
            raise FileNotFoundError(f"BPE merges file not found: {self.bpe_path}")

    def __getstate__(self):
        # Pickles stay tiny and portable: the default vocabulary is found again where the
        # unpickling process has clip_jax installed.
        path = None if self.bpe_path == DEFAULT_BPE_PATH else self.bpe_path
        return {"context_length": self.context_length, "bpe_path": path}

    def __setstate__(self, state):
        self.context_length = state["context_length"]
        self.bpe_path = state["bpe_path"] or DEFAULT_BPE_PATH

    @property
    def _vocab(self) -> _Vocab:
        return _load_vocab(self.bpe_path)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.decoder)

    @property
    def sot_id(self) -> int:
        return self._vocab.sot_id

    @property
    def eot_id(self) -> int:
        return self._vocab.eot_id

    def encode(self, text: Text) -> list[int]:
        v = self._vocab
        token_ids = v.token_ids
        ids: list[int] = []
        for token in v.pattern.findall(clean_text(as_str(text))):
            ids.extend(token_ids(token))
        return ids

    def encode_batch(self, texts):
        v = self._vocab
        token_ids, findall = v.token_ids, v.pattern.findall
        out = []
        for text in texts:
            ids: list[int] = []
            for token in findall(clean_text(text)):
                ids.extend(token_ids(token))
            out.append(ids)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. With `skip_special_tokens=False` this is exactly open_clip's decode
        (special tokens spelled out, each word followed by a space); by default it stops at the
        first eot (so padded rows decode cleanly), drops sot and strips surrounding spaces."""
        v = self._vocab
        ids = [int(i) for i in np.asarray(ids).reshape(-1).tolist()]
        if skip_special_tokens:
            if v.eot_id in ids:
                ids = ids[: ids.index(v.eot_id)]
            ids = [i for i in ids if i != v.sot_id]
        bad = [i for i in ids if not 0 <= i < len(v.decoder)]
        if bad:
            raise ValueError(f"ids out of range [0, {len(v.decoder)}): {bad[:10]}")
        text = "".join([v.decoder[i] for i in ids])
        text = (bytearray(v.byte_decoder[c] for c in text)
                .decode("utf-8", errors="replace").replace("</w>", " "))
        return text.strip() if skip_special_tokens else text

    def __repr__(self) -> str:
        path = "" if self.bpe_path == DEFAULT_BPE_PATH else f", bpe_path={self.bpe_path!r}"
        return f"ClipBPETokenizer(context_length={self.context_length}{path})"
