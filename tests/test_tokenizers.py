"""Tests of clip_jax.tokenizers: CLIP BPE parity with open_clip, SentencePiece rules, get(), CLI."""

import html
import json
import os
import pickle
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from clip_jax import tokenizers
from clip_jax.tokenizers import bpe as bpe_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Varied texts for parity with open_clip: ASCII, case, punctuation, numbers, contractions, HTML
# entities, whitespace, accents, mojibake, CJK, other scripts, emoji, control characters,
# literal special tokens, and texts far longer than 77 tokens.
CORPUS = [
    "",
    " ",
    "\n\t  \r\n",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photo of a cat.",
    "A dog, a cat, and a bird!!!",
    "what's up? I'm fine; you're late & they've gone, we'll see, he'd know",
    "DON'T SHOUT, it's OK'S",
    "rock'n'roll ''quoted'' 's 't",
    "3 apples and 42 oranges cost $12.50 (or 1,000,000 yen) on 2021-03-04",
    "3.14159 1e-10 0x1F 007 ½ ² ③ ٣ 五",
    "user@example.com https://example.com/path?q=1&x=2#frag",
    "Tom &amp; Jerry",
    "it&#39;s &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp;amp; triple &#38;#38; escaped",
    "&nbsp;non&nbsp;breaking&nbsp;",
    "&copy; 2021 &mdash; &hellip; &euro;5 &#x2019;curly&#x2019;",
    "<b>bold</b> &amp; <i>tags</i> stay",
    "&notanentity; & ; &# &#; &#xZZ;",
    "multiple    spaces\tand\ttabs\nand\nnewlines\r\nand CRLF",
    "   leading and trailing   ",
    "vertical\x0btab form\x0cfeed unit\x1fsep",
    "null\x00byte bell\x07 delete\x7f escape\x1b[31mred\x1b[0m",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade se\u00f1or \u00fcber stra\u00dfe",
    "cafe\u0301 decomposed e\u0301 (NFD)",
    "\u00c9COLE \u00c0 PARIS, \u00d6STERREICH",
    "Ã©tÃ© mojibake Ã  la plage â€” done â€™s",
    "\u201csmart quotes\u201d and \u2018single\u2019 quotes",
    "ﬁne ﬂour ligatures",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３",
    "一只猫坐在垫子上",
    "東京タワーの写真",
    "한국어 텍스트 사진",
    "Привет, мир! Фото кошки",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "emoji 😀😃😄 party 🎉🎉 cat 🐈",
    "family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "❤️ ✔ ★ ☃ ♥ ©®™",
    "math ∑∫√∞ ≤≥≠ ±×÷",
    "zero\u200bwidth\u200cjoiner\u200d and bom \ufeff",
    "soft\u00adhyphen and nbsp\u00a0here",
    "line\u2028separator\u2029paragraph\x85next",
    "İstanbul ΣΊΣΥΦΟΣ straße ǅ",
    "<start_of_text> literal special tokens <end_of_text>",
    "<START_OF_TEXT>upper<END_OF_TEXT>",
    "!!!???...,,,;;;:::---___",
    "!",
    "a",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The quick brown fox jumps over the lazy dog. " * 20,
    " ".join(f"word{i}" for i in range(120)),
    " ".join(str(i) for i in range(100)),
    "这是一个很长的中文句子，" * 30,
    "🎉" * 100,
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a low resolution photo of the cat.",
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "C++ C# F# .NET node.js",
    "#hashtag @mention $money %percent ^caret *star",
    "tab\tseparated\tvalues\t1\t2\t3",
    "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS !@#",
    "mIxEd CaSe TeXt",
    "ǈ ǋ ǲ titlecase digraphs",
    "\U0001d400\U0001d401 math bold \U0001f600",
    "\ud800 lone surrogate".encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
    # Literal special tokens where CLIP's regex does or does not see them (after "!!" it does
    # not: the punctuation run swallows the "<"), next to non-ASCII text and whitespace.
    "!!<end_of_text> a<end_of_text>b <end_of_text>!! <end_of_text><start_of_text>",
    "caf\u00e9<end_of_text>\t<START_OF_TEXT>x",
    # Case folding in CLIP's IGNORECASE regex: "'\u017f" (long s) is the contraction "'s".
    "it'\u017f IT'S it'\u017ft \ufb05 \u212a",
    # Code points where Rust's regex engine (Oniguruma) and Python's `regex` classify letters
    # differently (combining ypogegrammeni, letters new in Unicode 16), inside ASCII words.
    "a\u0345b c\u0558d e\ua7ceF g\U00010940h",
]

CONTEXT_LENGTHS = [77, 16, 5, 2, 1, 100]


@pytest.fixture(scope="module")
def open_clip():
    oc = pytest.importorskip("open_clip")
    return oc


@pytest.fixture(scope="module")
def bpe():
    return tokenizers.get("clip-bpe")


def _random_texts(n, seed):
    """Random strings mixing everything CLIP's cleaning and regex care about."""
    rng = random.Random(seed)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r\x0b\x0c\x1b\x00\x7f&;#<>'\".,!?-_/\\[]()")
        + list("éèàüöñçßÉÀÃ©â€™œ«»¡¿½²ﬁＡｂ　\u00a0\u200b\u0301")
        + list("猫犬写真東京한국Привет")
        + ["😀", "🎉", "👍🏽", "❤️"]
    )
    pieces = [
        "&amp;",
        "&#39;",
        "&quot;",
        "&lt;",
        "&gt;",
        "&nbsp;",
        "&#x2019;",
        "&amp;amp;",
        "'s",
        "'t",
        "'re",
        "'ll",
        "Ã©",
        "â€™",
        "\x1b[31m",
        "<end_of_text>",
        "\r\n",
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            parts.append(rng.choice(pieces) if rng.random() < 0.15 else rng.choice(alphabet))
        out.append("".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# OpenAI CLIP BPE
# --------------------------------------------------------------------------------------------


def test_bpe_routes_texts_as_documented(bpe):
    """Which texts take which Rust tokenizer (bpe.py, top), and that the corpus covers each."""
    v = bpe._vocab
    texts = [
        "A Photo\tof a CAT",
        "Tom &amp; Jerry",
        "caf\u00e9 \U0001f600",
        "x<END_OF_TEXT>",
        "null\x00byte",
        "",
        "\u201cquoted\u201d",
    ]
    ascii_at, ascii_texts, pieces_at, pieces = v.route(texts)
    assert ascii_at == [0, 1, 4, 5, 6]
    # Raw text only lower-cased (the regex drops whitespace); other text fully cleaned.
    assert ascii_texts == ["a photo\tof a cat", "tom & jerry", "nullbyte", "", '"quoted"']
    assert pieces_at == [2, 3]
    assert pieces == [["caf\u00e9", "\U0001f600"], ["x", "<end_of_text>"]]
    ascii_at, _, pieces_at, _ = v.route(CORPUS)
    assert len(ascii_at) > 20 and len(pieces_at) > 20
    assert any(bpe_mod.needs_full_clean(CORPUS[i]) for i in ascii_at)
    assert any(not bpe_mod.needs_full_clean(CORPUS[i]) for i in pieces_at)
    # The byte-level map skipped on the ASCII route is the identity there.
    byte_map = bpe_mod.bytes_to_unicode()
    assert all(byte_map[b] == chr(b) for b in range(0x21, 0x7F))


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_bpe_matches_open_clip(open_clip, bpe, context_length):
    ours = bpe(CORPUS, context_length=context_length)
    assert ours.dtype == np.int32 and ours.shape == (len(CORPUS), context_length)
    ref = open_clip.tokenize(CORPUS, context_length=context_length).numpy()
    mismatched = [CORPUS[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not mismatched, mismatched
    # The model-facing factory must agree as well.
    ref_vit = open_clip.get_tokenizer("ViT-B-32")(CORPUS, context_length=context_length).numpy()
    np.testing.assert_array_equal(ours, ref_vit)


def test_bpe_default_context_length_matches_open_clip(open_clip, bpe):
    np.testing.assert_array_equal(bpe(CORPUS), open_clip.get_tokenizer("ViT-B-32")(CORPUS).numpy())
    assert bpe(CORPUS).shape == (len(CORPUS), 77)


@pytest.mark.parametrize("context_length", [77, 16])
def test_bpe_matches_open_clip_on_random_strings(open_clip, bpe, context_length):
    texts = _random_texts(400, seed=context_length)
    ours = bpe(texts, context_length=context_length)
    ref = open_clip.tokenize(texts, context_length=context_length).numpy()
    mismatched = [texts[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not mismatched, mismatched


def test_bpe_ascii_route_matches_open_clip_on_every_character(open_clip, bpe):
    """The ASCII route replaces CLIP's regex classes by [a-z], [0-9] and [^\\sa-z0-9]: check
    every ASCII character in every context the regex distinguishes, and after apostrophes."""
    chars = [chr(c) for c in range(128)]
    texts = [f"a{c}a 1{c}1 !{c}! '{c} {c}{c}{c} x{c}'s {c}" for c in chars]
    texts += ["'" + a + b for a in chars for b in "sStTrReEvVmMlLdD'a1! \t"]
    ours = bpe(texts, context_length=32)
    ref = open_clip.tokenize(texts, context_length=32).numpy()
    mismatched = [texts[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not mismatched, mismatched


def test_bpe_batch_equals_one_by_one(bpe):
    """Batches mixing both routes come back in order, as if each text were alone."""
    texts = CORPUS + _random_texts(50, seed=2)
    rows = bpe(texts, context_length=20)
    for text, row in zip(texts, rows):
        np.testing.assert_array_equal(bpe(text, context_length=20)[0], row)


def test_bpe_encode_and_clean_match_open_clip(open_clip, bpe):
    ref = open_clip.tokenizer._tokenizer
    for text in CORPUS + _random_texts(100, seed=1):
        assert bpe_mod.clean_text(text) == open_clip.tokenizer._clean_lower(text), repr(text)
        assert bpe.encode(text) == ref.encode(text), repr(text)


def test_ascii_fast_path_is_what_ftfy_does():
    """clean_text skips ftfy/html for text without '&', non-ASCII or control characters; check
    against ftfy that this changes nothing."""
    import ftfy

    rng = random.Random(0)
    safe = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]
    texts = ["".join(rng.choice(safe) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["a\nb\n", "\n\n", "x;#39;", "<b>hi</b>", "'s'''", "\t\t"]
    for text in texts:
        assert not bpe_mod.needs_full_clean(text)
        assert html.unescape(html.unescape(ftfy.fix_text(text))) == text, repr(text)
    for text in ["&amp;", "é", "\r", "\x0b", "\x1b[0m", "\x7f", "\x00", "a\tb&", "\u00a0"]:
        assert bpe_mod.needs_full_clean(text)
    # needs_full_clean's shortcuts (isascii, isprintable) agree with the regex alone.
    chars = [chr(c) for c in range(0x80)] + ["\u00e9", "\u00a0", "\U0001f600"]
    for _ in range(3000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 8)))
        expected = bpe_mod._NEEDS_FULL_CLEAN.search(text) is not None
        assert bpe_mod.needs_full_clean(text) == expected, repr(text)


def test_bpe_ids_and_rows(bpe):
    assert (bpe.vocab_size, bpe.sot_id, bpe.eot_id, bpe.pad_id) == (49408, 49406, 49407, 0)
    row = bpe("a photo of a cat")[0]
    assert row[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (row[7:] == 0).all()
    assert bpe.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert bpe.encode("") == [] and bpe("")[0, :2].tolist() == [49406, 49407]
    # The pad id 0 is also a real token ("!" inside a word): rows can hold 0 before eot, so the
    # end of text is the first eot / the last non-zero position, not count_nonzero - 1.
    row = bpe("wow!(really)")[0]
    assert row[:8].tolist() == [49406, 2781, 0, 263, 1414, 264, 49407, 0]
    assert row.argmax() == 6 == len(row) - 1 - np.flatnonzero(row[::-1])[0]


def test_bpe_truncation_rule(bpe):
    text = " ".join(f"word{i}" for i in range(200))
    ids = bpe.encode(text)
    assert len(ids) > 77
    row = bpe(text)[0]
    assert row[0] == bpe.sot_id and row[-1] == bpe.eot_id
    assert row[1:76].tolist() == ids[:75]
    # Exactly one eot per row in every case; it is the row's largest id (CLIP pools at argmax).
    # Except, as in open_clip, a text spelling a special token literally gets its id.
    assert bpe.encode("<start_of_text>x<END_OF_TEXT>") == [bpe.sot_id, 343, bpe.eot_id]
    plain = [t for t in CORPUS if "_of_text>" not in t.lower()]
    for L in CONTEXT_LENGTHS:
        rows = bpe(plain, context_length=L)
        assert ((rows == bpe.eot_id).sum(axis=1) == 1).all()
        assert (rows.argmax(axis=1) == (rows == bpe.eot_id).argmax(axis=1)).all()
    # Exact fit: sot + 75 ids + eot is 77 tokens and is not cut.
    fit = " ".join(["cat"] * 75)
    assert bpe(fit)[0].tolist() == [bpe.sot_id] + [2368] * 75 + [bpe.eot_id]
    over = " ".join(["cat"] * 76)
    assert bpe(over)[0].tolist() == [bpe.sot_id] + [2368] * 75 + [bpe.eot_id]
    assert bpe("cat", context_length=1)[0].tolist() == [bpe.eot_id]


def test_bpe_accepts_bytes_numpy_and_single_strings(bpe):
    texts = ["a photo of a cat", "café 😀", "Tom &amp; Jerry"]
    expected = bpe(texts)
    np.testing.assert_array_equal(bpe([t.encode() for t in texts]), expected)
    np.testing.assert_array_equal(
        bpe(np.array([t.encode() for t in texts], dtype=object)), expected
    )
    np.testing.assert_array_equal(bpe(np.array(texts)), expected)  # numpy unicode dtype
    np.testing.assert_array_equal(bpe(tuple(texts)), expected)
    np.testing.assert_array_equal(bpe(texts[1]), expected[1:2])
    np.testing.assert_array_equal(bpe(texts[1].encode()), expected[1:2])
    np.testing.assert_array_equal(bpe(np.array(texts[1].encode(), dtype=object)), expected[1:2])
    assert bpe.encode(b"caf\xc3\xa9") == bpe.encode("café")
    assert bpe([]).shape == (0, 77) and bpe([]).dtype == np.int32
    with pytest.raises(ValueError, match="1-d"):
        bpe(np.array([["a"]], dtype=object))
    with pytest.raises(TypeError):
        bpe([1, 2])
    with pytest.raises(ValueError):
        bpe("a", context_length=0)


def test_bpe_decode(bpe):
    for text in ["a photo of a cat", "caf\u00e9 na\u00efve \u4e00\u53ea\u732b \U0001f600", ""]:
        assert bpe.decode(bpe.encode(text)) == text
        assert bpe.decode(bpe(text)[0]) == text  # padded row: stops at eot
    # Punctuation comes back as separate words, but decoding is stable under re-encoding.
    assert bpe.decode(bpe.encode("Hello, World!")) == "hello , world !"
    assert bpe.decode(bpe.encode("word123 and 42")) == "word 1 2 3 and 4 2"
    for text in CORPUS:
        ids = bpe.encode(text)
        if bpe.eot_id not in ids and bpe.sot_id not in ids:  # literal special tokens
            assert bpe.encode(bpe.decode(ids)) == ids, repr(text)
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([49408])
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([-1])


def test_bpe_decode_without_skipping_is_open_clips(open_clip, bpe):
    import torch

    for row in bpe(CORPUS, context_length=16):
        ref = open_clip.decode(torch.from_numpy(row.astype(np.int64)))
        assert bpe.decode(row, skip_special_tokens=False) == ref


@pytest.mark.slow
def test_bpe_is_picklable_lazy_and_cheap():
    tok = tokenizers.ClipBPETokenizer(context_length=16)
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # the vocabulary is not pickled
    tok2 = pickle.loads(blob)
    assert tok2.context_length == 16 and tok2.bpe_path == bpe_mod.DEFAULT_BPE_PATH
    np.testing.assert_array_equal(tok2(CORPUS[:10]), tok(CORPUS[:10]))
    # Importing and constructing read no vocabulary; the first use does.
    code = (
        "import clip_jax.tokenizers as t, clip_jax.tokenizers.bpe as b\n"
        "tok = t.get('clip-bpe')\n"
        "assert b._load_vocab.cache_info().currsize == 0\n"
        "tok('x')\n"
        "assert b._load_vocab.cache_info().currsize == 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_vocabulary_file_is_openais():
    import hashlib

    with open(bpe_mod.DEFAULT_BPE_PATH, "rb") as f:
        ours = hashlib.sha256(f.read()).hexdigest()
    assert ours == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert os.path.isfile(os.path.join(os.path.dirname(bpe_mod.DEFAULT_BPE_PATH), "NOTICE"))


class _GilProbe:
    """Tells whether another Python thread got to run while `method` of `obj` was running.

    A helper thread loops: note the time, then block 1 ms on a lock (outside the GIL). With the
    switch interval raised to 1000 s, the helper gets the GIL back only when the calling thread
    gives it up itself, as C code that releases the GIL does, not by preemption. `ran_inside`:
    whether the helper noted a time during a call of `obj.method` (the last call, if several).
    """

    def __init__(self, obj, method: str):
        self.obj, self.method = obj, method
        self.ran_inside = False

    def _wrapped(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._real(*args, **kwargs)
        end = time.perf_counter()
        self.ran_inside = any(start < t < end for t in self._ticks)
        return out

    def __enter__(self):
        self._real = getattr(self.obj, self.method)
        setattr(self.obj, self.method, self._wrapped)
        self._ticks, self._stop, blocker = [], threading.Event(), threading.Lock()
        blocker.acquire()

        def helper():
            while not self._stop.is_set():
                self._ticks.append(time.perf_counter())
                blocker.acquire(timeout=0.001)

        self._thread = threading.Thread(target=helper, daemon=True)
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        sys.setswitchinterval(self._interval)
        self._thread.join()
        delattr(self.obj, self.method)


def test_gil_probe_detects_a_call_holding_the_gil():
    class Work:
        def python(self, n):
            return sum(i * i for i in range(n))

        def sleep(self, s):
            time.sleep(s)

    work = Work()
    with _GilProbe(work, "python") as probe:
        work.python(200_000)
    assert probe.ran_inside is False
    with _GilProbe(work, "sleep") as probe:
        work.sleep(0.01)
    assert probe.ran_inside is True


def test_bpe_batch_runs_without_the_gil(bpe):
    """The Rust encoder of both routes lets other Python threads run (tf.data's parallel
    numpy_function calls then tokenise concurrently), unlike a Python BPE. (The `regex` module
    also releases the GIL, but only within each regex call.)"""
    texts = [t.lower() for t in _random_texts(3000, seed=3)]
    ascii_texts = [t for t in texts if t.isascii()]
    other_texts = [t for t in texts if not t.isascii()]
    assert len(ascii_texts) > 100 and len(other_texts) > 1000
    v = bpe._vocab
    with _GilProbe(v.ascii, "encode_batch_fast") as probe:
        bpe(ascii_texts * 5)
    assert probe.ran_inside is True
    with _GilProbe(v.pieces, "encode_batch_fast") as probe:
        bpe(other_texts)
    assert probe.ran_inside is True


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


def _captions(n, seed=0):
    rng = random.Random(seed)
    adjectives = ["red", "small", "happy", "old", "shiny", "wooden", "fluffy", "bright", "dark"]
    nouns = ["cat", "dog", "car", "house", "tree", "bird", "boat", "chair", "flower", "mountain"]
    places = [
        "on the beach",
        "in the park",
        "at night",
        "under a bridge",
        "near a lake",
        "in the snow",
        "on a table",
        "in the city",
    ]
    templates = [
        "a photo of a {a} {n} {p}",
        "a {a} {n} and a {a2} {n2}",
        "the {n} is {a}",
        "two {n}s {p}",
        "A close-up picture of the {a} {n}.",
    ]
    return [
        rng.choice(templates).format(
            a=rng.choice(adjectives),
            a2=rng.choice(adjectives),
            n=rng.choice(nouns),
            n2=rng.choice(nouns),
            p=rng.choice(places),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "captions.model"
    out = tokenizers.train_sentencepiece(_captions(400), vocab_size=120, output=path)
    assert out == str(path)
    return str(path)


@pytest.fixture(scope="module")
def sp(spm_path):
    return tokenizers.get(spm_path)


def test_spm_id_layout(sp):
    assert isinstance(sp, tokenizers.SentencePieceTokenizer)
    assert (sp.pad_id, sp.eot_id, sp.sot_id) == (0, 2, None)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "<unk>", "</s>"]
    assert 20 < sp.vocab_size <= 120


def test_spm_rows_pad_eos_and_truncation(sp):
    text = "a photo of a red cat on the beach"
    ids = sp.encode(text)
    assert ids and 0 not in ids and sp.eot_id not in ids
    L = len(ids) + 5
    row = sp(text, context_length=L)[0]
    assert row.dtype == np.int32
    assert row.tolist() == ids + [sp.eot_id] + [0] * 4  # EOS appended, padded with 0
    # Exact fit: the ids and eos fill the row.
    assert sp(text, context_length=len(ids) + 1)[0].tolist() == ids + [sp.eot_id]
    # One too short: cut, and the last token is still eos.
    assert sp(text, context_length=len(ids))[0].tolist() == ids[:-1] + [sp.eot_id]
    assert sp(text, context_length=3)[0].tolist() == ids[:2] + [sp.eot_id]
    assert sp(text, context_length=1)[0].tolist() == [sp.eot_id]
    long_text = " ".join(_captions(30, seed=3))
    long_ids = sp.encode(long_text)
    assert len(long_ids) > 77
    assert sp(long_text)[0].tolist() == long_ids[:76] + [sp.eot_id]
    assert sp("")[0].tolist() == [sp.eot_id] + [0] * 76
    rows = sp(_captions(50, seed=4) + [long_text, ""], context_length=12)
    assert ((rows == sp.eot_id).sum(axis=1) == 1).all()


def test_spm_batch_bytes_and_decode(sp):
    caps = _captions(20, seed=5)
    batch = sp(caps)
    for cap, row in zip(caps, batch):
        assert row.tolist() == sp(cap)[0].tolist()
        assert sp.decode(sp.encode(cap)) == cap
        assert sp.decode(row) == cap  # stops at eos, ignores padding
    np.testing.assert_array_equal(sp(np.array([c.encode() for c in caps], dtype=object)), batch)
    assert sp.encode("zebra ❤") and 1 in sp.encode("❤")  # unseen character -> unk id 1
    with pytest.raises(ValueError, match="out of range"):
        sp.decode([sp.vocab_size])


def test_spm_batch_runs_without_the_gil(spm_path):
    # 20k captions take ~50 ms to encode: long enough that the helper thread, if the GIL is
    # released, ticks inside the call (3k captions, ~6 ms, missed it 1 time in 10 under load).
    caps = _captions(20_000, seed=10)
    for num_threads in [1, 2]:
        tok = tokenizers.SentencePieceTokenizer(spm_path, num_threads=num_threads)
        ran_inside = []
        for _ in range(3):  # a loaded CI machine may still deschedule the helper once
            with _GilProbe(tok._sp, "encode") as probe:
                rows = tok(caps)
            ran_inside.append(probe.ran_inside)
        assert any(ran_inside), ran_inside
        np.testing.assert_array_equal(rows[:50], np.concatenate([tok(c) for c in caps[:50]]))
    for bad in [0, -2, 1.5, True]:
        with pytest.raises(ValueError, match="num_threads"):
            tokenizers.SentencePieceTokenizer(spm_path, num_threads=bad)


def test_spm_is_picklable_without_the_file(spm_path, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(spm_path, "rb").read())
    tok = tokenizers.SentencePieceTokenizer(copy, context_length=8, num_threads=2)
    blob = pickle.dumps(tok)
    copy.unlink()
    tok2 = pickle.loads(blob)
    caps = _captions(5, seed=6)
    np.testing.assert_array_equal(tok2(caps), tok(caps))
    assert tok2.context_length == 8 and tok2.num_threads == 2


def test_train_from_file_and_bpe_type(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(_captions(300, seed=7) + ["", "   "]) + "\n")
    out = tokenizers.train_sentencepiece(captions, 5000, tmp_path / "sub" / "u.model")
    tok = tokenizers.get(out)
    assert tok.vocab_size < 5000 and (tok.pad_id, tok.eot_id) == (0, 2)
    out = tokenizers.train_sentencepiece(
        _captions(300, seed=8), 80, tmp_path / "b.model", model_type="bpe"
    )
    tok = tokenizers.get(out)
    assert tok.vocab_size <= 80 and tok("a cat")[0, 0] != 0
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenizers.train_sentencepiece(tmp_path / "missing.txt", 100, tmp_path / "x.model")
    with pytest.raises(ValueError):
        tokenizers.train_sentencepiece(_captions(10), 2, tmp_path / "x.model")


@pytest.mark.slow
def test_cli_train_and_encode(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(_captions(300, seed=9)) + "\n")
    model = tmp_path / "spm.model"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.tokenizers",
            "train",
            "--input",
            str(captions),
            "--vocab-size",
            "32000",
            "--output",
            str(model),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(model) and summary["pad_id"] == 0
    tok = tokenizers.get(str(model))
    assert tok.vocab_size == summary["vocab_size"] < 32000
    assert tok.decode(tok.encode("a photo of a red cat")) == "a photo of a red cat"

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.tokenizers",
            "encode",
            "--tokenizer",
            "clip-bpe",
            "a photo of a cat",
            "Tom &amp; Jerry",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    bpe = tokenizers.get("clip-bpe")
    assert res.stdout.splitlines() == [
        " ".join(map(str, bpe.encode(t))) for t in ["a photo of a cat", "Tom &amp; Jerry"]
    ]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.tokenizers",
            "encode",
            "--tokenizer",
            str(model),
            "--context-length",
            "8",
            "a red cat",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert res.stdout.split() == [str(i) for i in tok("a red cat", context_length=8)[0]]
    res = subprocess.run(
        [sys.executable, "-m", "clip_jax.tokenizers", "encode", "--tokenizer", "nope", "x"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "clip-bpe" in res.stderr


# --------------------------------------------------------------------------------------------
# get()
# --------------------------------------------------------------------------------------------


def test_get(spm_path, tmp_path):
    import pathlib

    for name in ["clip-bpe", "openai", "OpenAI", "CLIP-BPE"]:
        assert isinstance(tokenizers.get(name), tokenizers.ClipBPETokenizer)
    assert tokenizers.get("clip-bpe", context_length=16)("a").shape == (1, 16)
    assert isinstance(tokenizers.get(pathlib.Path(spm_path)), tokenizers.SentencePieceTokenizer)
    tok = tokenizers.get("openai")
    assert tokenizers.get(tok) is tok

    missing = str(tmp_path / "nowhere" / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizers.get(missing)
    for bad in ["bert-base-uncased", "", "clip", str(tmp_path)]:
        with pytest.raises(ValueError, match=r"clip-bpe.*openai.*\.model"):
            tokenizers.get(bad)
    with pytest.raises(TypeError):
        tokenizers.get(3)

    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        tokenizers.get(garbage)

    # A model with SentencePiece's default layout (unk=0, no pad) is refused with advice.
    import io

    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_captions(200)),
        model_writer=buf,
        vocab_size=60,
        hard_vocab_limit=False,
        logstream=open(os.devnull, "w"),
    )
    default_layout = tmp_path / "default.model"
    default_layout.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="pad id 0"):
        tokenizers.get(default_layout)


def test_check_name_agrees_with_get(spm_path, tmp_path):
    import pathlib

    for name in ["clip-bpe", "openai", "OpenAI", " CLIP-BPE ", spm_path, pathlib.Path(spm_path)]:
        assert tokenizers.check_name(name) is None
        tokenizers.get(name)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    bad = {
        "bert-base-uncased": "accepted",
        "": "accepted",
        "clip": "accepted",
        str(tmp_path): "accepted",
        str(tmp_path / "missing.model"): "not found",
        str(garbage): "garbage.model",
        3: "str or path",
        None: "str or path",
    }
    for name, message in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            tokenizers.check_name(name)
        assert "\n" not in str(err.value)
        with pytest.raises((ValueError, TypeError, FileNotFoundError)):
            tokenizers.get(name)


# --------------------------------------------------------------------------------------------
# tf.data
# --------------------------------------------------------------------------------------------


def test_usable_from_tf_data(spm_path):
    tf = pytest.importorskip("tensorflow")
    texts = ["a photo of a cat", "café 😀 &amp;", "", "a red dog in the park"]
    for tok in [tokenizers.get("clip-bpe"), tokenizers.get(spm_path)]:
        ds = (
            tf.data.Dataset.from_tensor_slices(texts)
            .batch(3)
            .map(
                lambda t, tok=tok: tf.numpy_function(
                    lambda x: tok(x, context_length=16), [t], tf.int32, stateful=False
                )
            )
        )
        rows = np.concatenate([b.numpy() for b in ds])
        np.testing.assert_array_equal(rows, tok(texts, context_length=16))
