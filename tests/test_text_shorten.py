"""Short-text training (CLIPA): the three ways to cut captions, and the pipeline using them."""

import numpy as np
import pytest
from data_samples import data_config, take

from clip_jax import tokenizers
from clip_jax.data import config as config_lib
from clip_jax.data import text_shorten
from clip_jax.data.pipeline import build_train_dataset

BPE = tokenizers.get("clip-bpe")
CAPTIONS = [
    "a photo of a small red bicycle leaning against an old brick wall in the rain",
    "two dogs",
    "an extremely long caption about nothing in particular that keeps going and going on",
]


def batches(start=None, **overrides):
    """The first 2 training batches of 16 demo samples at 16 px (seed 3), data overrides."""
    ds = build_train_dataset(
        data_config(source="demo", **overrides),
        image_size=16,
        tokenizer=BPE,
        context_length=32,
        local_batch_size=16,
        seed=3,
        start_position=start,
    )
    return take(ds, 2)


def _content(row, has_sot=True):
    """Content ids of a row (between start and end tokens), and its end token."""
    last = int(np.flatnonzero(row)[-1])
    return list(row[1 if has_sot else 0 : last]), int(row[last])


def test_three_modes_keep_start_end_and_cut_as_documented():
    full = BPE(CAPTIONS, context_length=77)
    rng = np.random.default_rng(0)
    # truncate == tokenising at the short length.
    np.testing.assert_array_equal(
        text_shorten.shorten(full, 8, "truncate", rng), BPE(CAPTIONS, context_length=8)
    )
    for mode in ("random_subset", "random_block"):
        out = text_shorten.shorten(full, 8, mode, rng)
        assert out.shape == (3, 8) and out.dtype == np.int32
        assert (out[:, 0] == BPE.sot_id).all()
        for short, long in zip(out, full):
            got, end = _content(short)
            want, _ = _content(long)
            assert end == BPE.eot_id
            if len(want) <= 6:
                assert got == want  # fits: kept whole ("two dogs")
                continue
            assert len(got) == 6
            if mode == "random_block":
                starts = [s for s in range(len(want) - 5) if want[s : s + 6] == got]
                assert starts, (got, want)
            else:  # an in-order subsequence
                it = iter(want)
                assert all(any(t == u for u in it) for t in got), (got, want)


def test_random_choices_are_uniform_and_work_without_a_start_token():
    """Rows 0..19 of content (no start token, SentencePiece-style); keep 4 of 20."""
    row = np.zeros((1, 32), np.int32)
    row[0, :21] = np.r_[np.arange(10, 30), 99]  # 20 content tokens, then end-of-text 99
    rows = np.repeat(row, 4000, axis=0)
    rng = np.random.default_rng(1)
    subset = text_shorten.shorten(rows, 5, "random_subset", rng, has_sot=False)
    assert (subset[:, 4] == 99).all()
    assert (np.diff(subset[:, :4], axis=1) > 0).all()  # in order, distinct
    # Each token kept with probability 4/20: 800 of 4000 (binomial std 25).
    counts = np.bincount(subset[:, :4].ravel() - 10, minlength=20)
    assert np.abs(counts - 800).max() < 5 * 25, counts
    block = text_shorten.shorten(rows, 5, "random_block", rng, has_sot=False)
    assert (np.diff(block[:, :4], axis=1) == 1).all()  # consecutive
    starts = np.bincount(block[:, 0] - 10, minlength=17)  # 17 possible starts, 235 each
    assert starts.shape == (17,) and np.abs(starts - 4000 / 17).max() < 5 * 15, starts


def test_pipeline_cuts_captions_reproducibly_and_validates():
    full = batches()
    truncated = batches(context_length=6)
    block = batches(context_length=6, text_shorten="random_block")
    again = batches(context_length=6, text_shorten="random_block")
    assert full[0]["text"].shape == (16, 32) and block[0]["text"].shape == (16, 6)
    for a, b in zip(block, again):
        np.testing.assert_array_equal(a["text"], b["text"])  # seeded by (seed, position)
    resumed = batches(start=block[0]["position"], context_length=6, text_shorten="random_block")
    np.testing.assert_array_equal(resumed[0]["text"], block[1]["text"])  # exact resume
    np.testing.assert_array_equal(truncated[0]["image"], full[0]["image"])  # same samples
    for t, s, f in zip(truncated[0]["text"], block[0]["text"], full[0]["text"]):
        np.testing.assert_array_equal(t, BPE.__call__([BPE.decode(f)], context_length=6)[0])
        got, want = _content(s)[0], _content(f)[0]
        assert any(want[i : i + len(got)] == got for i in range(len(want) - len(got) + 1))
    assert any(
        not np.array_equal(t, s) for t, s in zip(truncated[0]["text"], block[0]["text"])
    )  # the random block is not always the head

    with pytest.raises(ValueError, match="text_shorten='shuffle'"):
        config_lib.validate(data_config(text_shorten="shuffle"))
    with pytest.raises(ValueError, match="context_length=2 must be 0"):
        config_lib.validate(data_config(context_length=2))
    with pytest.raises(ValueError, match="longer than the model's text context 32"):
        batches(context_length=40)


def test_sentence_dropout_keeps_at_least_one_sentence_in_order():
    rng = np.random.default_rng(0)
    caption = "Cardinal. A red bird on a 3.5 cm branch! bird, animal, nature?"
    sentences = ["Cardinal.", "A red bird on a 3.5 cm branch!", "bird, animal, nature?"]
    outs = text_shorten.drop_sentences([caption] * 3000, 0.5, rng)
    kinds = set()
    for out in outs:
        kept = [s for s in sentences if s in out]
        assert kept and out == " ".join(kept)  # whole sentences, original order
        kinds.add(out)
    assert len(kinds) == 7  # every non-empty subset occurs
    assert abs(sum(out == caption for out in outs) / 3000 - 1 / 8) < 0.03
    assert text_shorten.drop_sentences(["One sentence only."], 0.9, rng) == ["One sentence only."]
    assert text_shorten.drop_sentences([caption], 0.0, rng) == [caption]
    single = text_shorten.drop_sentences([caption] * 50, 1.0, rng)
    assert all(out in sentences for out in single)


def test_pipeline_drops_sentences_reproducibly_and_flips_images():
    plain = batches()
    dropped = batches(sentence_dropout=0.7, aug_flip=0.5)
    again = batches(sentence_dropout=0.7, aug_flip=0.5)
    resumed = batches(start=dropped[0]["position"], sentence_dropout=0.7, aug_flip=0.5)
    for a, b in zip(dropped, again):
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(resumed[0]["text"], dropped[1]["text"])
    np.testing.assert_array_equal(resumed[0]["image"], dropped[1]["image"])
    shorter = [
        len(_content(d)[0]) < len(_content(p)[0])
        for d, p in zip(dropped[0]["text"], plain[0]["text"])
    ]
    assert any(shorter)  # some captions lost sentences (same samples in the same order)
    mirrored = [
        np.array_equal(d, p[:, ::-1]) and not np.array_equal(d, p)
        for d, p in zip(dropped[0]["image"], plain[0]["image"])
    ]
    assert any(mirrored)
    for key, value in (("sentence_dropout", 1.5), ("aug_flip", -0.1)):
        with pytest.raises(ValueError, match=f"data.{key}=.* must be a probability"):
            config_lib.validate(data_config(**{key: value}))
