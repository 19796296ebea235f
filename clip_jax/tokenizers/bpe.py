"""OpenAI CLIP's byte-level BPE tokenizer, id for id identical to `open_clip.tokenize`.

Same vocabulary (OpenAI's `bpe_simple_vocab_16e6.txt.gz`, shipped next to this file, see
NOTICE), same text cleaning as open_clip's default ("lower": ftfy.fix_text, html.unescape twice,
whitespace collapsed, lower-cased), same pre-tokenising regex, same merges and the same
truncation rule (see `clip_jax.tokenizers.base.pack`). Nothing is downloaded.

The BPE runs in Rust (Hugging Face `tokenizers`, built in-process from the merges file) on a
whole batch at once: `encode_batch_fast` releases the GIL and spreads the texts over its rayon
threads (`RAYON_NUM_THREADS`, default one per core; `TOKENIZERS_PARALLELISM=false` for one).
Per text, Python only does what needs Python to stay exact:

1. Cleaning. ASCII text without '&' and without control characters other than tab and newline
   is left unchanged by ftfy.fix_text and html.unescape (ftfy only rewrites non-ASCII text,
   HTML entities, ANSI escapes and control characters; tests check the claim against ftfy), so
   it is only lower-cased; whitespace need not be collapsed, the pre-tokeniser drops it. Other
   text gets open_clip's full cleaning (`clean_text`): ~60 us per text instead of <1 us.
2. Routing. Cleaned text that is ASCII (printable, or tab and newline) without a literal
   special token goes to the Rust tokenizer as a string: there CLIP's regex is written for
   ASCII (`[a-z]` for `\\p{L}`, `[0-9]` for `\\p{N}`, the same on lower-case ASCII) and the
   byte-level map is skipped (CLIP maps the printable ASCII bytes to themselves). Any other
   text is split in Python with CLIP's own regex (the `regex` module, as open_clip: Rust's
   Oniguruma disagrees with it on ~17k code points, e.g. letters added in recent Unicode
   versions) and the pieces go, pre-tokenised, to a second Rust tokenizer that applies the
   byte-level map and the same BPE model, with `<start_of_text>` and `<end_of_text>` as added
   tokens (a piece can only contain them whole).
3. Reading the ids back and packing them into the `[B, context_length]` array (`base.pack`).
On the benchmark's ASCII captions this Python part is ~13% of the CPU time (3.6 of 28 us/text).

The Rust tokenizers are built at first use (~0.2 s) and shared by every instance in the process.
A process forked after using them gets them without threads (`tokenizers` warns about it).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Optional, Sequence

import ftfy
import numpy as np
import regex
import tokenizers as hf

from clip_jax.tokenizers.base import DEFAULT_CONTEXT_LENGTH, Text, Tokenizer, as_str

DEFAULT_BPE_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz"
)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# Number of merges CLIP uses: 49152 tokens minus 256 bytes minus the 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
# Distinct words whose BPE the Rust model caches (it stops adding when full, it does not
# evict). Its default, 10k, is too small for caption vocabularies: 10k -> 256k took the
# benchmark's captions (20k distinct words) from 25 to 20 us/text. 300k words of 5-12 random
# letters filled the 128k entries with +60 MB of memory.
BPE_CACHE_SIZE = 1 << 17

# CLIP's pre-tokenising regex (open_clip's SimpleTokenizer.pat), for the Python side.
CLIP_PATTERN = (
    r"<start_of_text>|<end_of_text>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# The same on lower-case ASCII text, for the Rust side (no special tokens: texts holding one
# take the Python path).
ASCII_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"

# Text with none of these characters (i.e. printable ASCII without '&', plus tab and newline)
# is returned unchanged by ftfy.fix_text and html.unescape.
_NEEDS_FULL_CLEAN = regex.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def needs_full_clean(text: str) -> bool:
    """False when ftfy.fix_text and html.unescape leave `text` unchanged for sure (see top).

    `isascii` is O(1) in CPython and `isprintable` a C loop; the regex only runs for ASCII
    text holding tabs, newlines or other control characters."""
    return not (
        text.isascii()
        and "&" not in text
        and (text.isprintable() or _NEEDS_FULL_CLEAN.search(text) is None)
    )


def clean_text(text: str) -> str:
    """open_clip's default ("lower") cleaning: ftfy, html unescape x2, whitespace, lower case."""
    if needs_full_clean(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class _Vocab:
    """Everything built from one merges file, shared by all tokenizers using that file."""

    def __init__(self, path: str):
        with gzip.open(path) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1 : NUM_MERGES + 1]]
        byte_encoder = bytes_to_unicode()
        vocab = list(byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        self.decoder = vocab
        self.byte_decoder = {c: b for b, c in byte_encoder.items()}
        encoder = {tok: i for i, tok in enumerate(vocab)}
        self.sot_id, self.eot_id = (encoder[t] for t in SPECIAL_TOKENS)
        self.pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)

        # One BPE model (and its word cache) shared by both Rust tokenizers.
        model = hf.models.BPE(
            vocab=encoder,
            merges=merges,
            end_of_word_suffix="</w>",
            cache_capacity=BPE_CACHE_SIZE,
            fuse_unk=False,
        )
        self.ascii = hf.Tokenizer(model)
        self.ascii.pre_tokenizer = hf.pre_tokenizers.Split(
            hf.Regex(ASCII_PATTERN), behavior="removed", invert=True
        )
        self.pieces = hf.Tokenizer(model)
        self.pieces.pre_tokenizer = hf.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=False
        )
        self.pieces.add_special_tokens(
            [hf.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )

    def route(
        self, texts: Sequence[str]
    ) -> tuple[list[int], list[str], list[int], list[list[str]]]:
        """Cleans a batch and splits it between the two Rust tokenizers (see the top).

        Returns `(ascii_at, ascii_texts, pieces_at, pieces)`: the indices and cleaned texts for
        the ASCII tokenizer, and the indices and CLIP pre-tokens of the other texts."""
        ascii_at, ascii_texts, pieces_at, pieces = [], [], [], []
        findall = self.pattern.findall
        for i, text in enumerate(texts):
            if needs_full_clean(text):
                text = clean_text(text)
                plain = text.isascii() and text.isprintable()
            else:
                text = text.lower()
                plain = True
            if plain and "_of_text>" not in text:
                ascii_at.append(i)
                ascii_texts.append(text)
            else:
                pieces_at.append(i)
                pieces.append(findall(text))
        return ascii_at, ascii_texts, pieces_at, pieces

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (no sot/eot added; literal special tokens in the text do count)."""
        ascii_at, ascii_texts, pieces_at, pieces = self.route(texts)
        # encode_batch_fast: encode_batch without character offsets (~15% faster); both
        # release the GIL while the batch is encoded.
        encs = self.ascii.encode_batch_fast(ascii_texts, add_special_tokens=False)
        if not pieces:  # the common case: nothing to reorder
            return [e.ids for e in encs]
        out: list[list[int]] = [[]] * len(texts)
        for i, e in zip(ascii_at, encs):
            out[i] = e.ids
        encs = self.pieces.encode_batch_fast(pieces, is_pretokenized=True, add_special_tokens=False)
        for i, e in zip(pieces_at, encs):
            out[i] = e.ids
        return out


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

    def __init__(
        self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: Optional[str] = None
    ):
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
        return self._vocab.encode_batch([as_str(text)])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._vocab.encode_batch(texts)

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
        text = (
            bytearray(v.byte_decoder[c] for c in text)
            .decode("utf-8", errors="replace")
            .replace("</w>", " ")
        )
        return text.strip() if skip_special_tokens else text

    def __repr__(self) -> str:
        path = "" if self.bpe_path == DEFAULT_BPE_PATH else f", bpe_path={self.bpe_path!r}"
        return f"ClipBPETokenizer(context_length={self.context_length}{path})"
