"""The shipped demo dataset (clip_jax/data/demo) and the pure-Python parts of its builder.

Reads the committed shards with tarfile + PIL only (no TensorFlow), about 2 s in all.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import io
import re
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

# The builder is a development tool outside the installed package (tools/build_demo.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_demo  # noqa: E402

DEMO = Path(str(importlib.resources.files("clip_jax.data") / "demo"))
SIZE = 64
BUDGET_BYTES = 16 * 2**20
SPLITS = ("train", "heldout", "classify")


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}``, the WebDataset grouping: key = basename up to first '.'."""
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            assert member.isfile(), f"{path.name}: {member.name} is not a regular file"
            assert "/" not in member.name, f"{path.name}: {member.name} lies in a folder"
            key, ext = member.name.split(".", 1)
            assert ext not in samples[key], f"{path.name}: {member.name} appears twice"
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def demo() -> dict[str, dict[str, dict[str, bytes]]]:
    """``{split: {key: {extension: bytes}}}`` of every shipped shard."""
    out: dict[str, dict[str, dict[str, bytes]]] = {}
    for split in SPLITS:
        out[split] = {}
        for path in sorted(DEMO.glob(f"{split}-*.tar.gz")):
            shard = _read_shard(path)
            assert not set(shard) & set(out[split]), f"{path.name} repeats keys of its split"
            out[split].update(shard)
    return out


@pytest.fixture(scope="module")
def classnames() -> list[str]:
    return (DEMO / "classnames.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def provenance() -> str:
    return (DEMO / "PROVENANCE.md").read_text(encoding="utf-8")


def _captions(samples: dict[str, dict[str, bytes]]) -> dict[str, str]:
    return {key: parts["txt"].decode("utf-8") for key, parts in samples.items()}


# ------------------------------------------------------------------------------------------
# The shipped files.


def test_shipped_files_exist_with_the_names_the_pipeline_globs():
    train = sorted(p.name for p in DEMO.glob("train-*.tar.gz"))
    assert len(train) >= 4, "at least 4 train shards, so 2 processes each get 2"
    assert train == [f"train-{i:05d}.tar.gz" for i in range(len(train))]
    for name in (
        "heldout-00000.tar.gz",
        "classify-00000.tar.gz",
        "classnames.txt",
        "PROVENANCE.md",
    ):
        assert (DEMO / name).is_file(), name
    assert not list(DEMO.glob("heldout-00001*")) and not list(DEMO.glob("classify-00001*"))


def test_every_key_has_exactly_its_members(demo):
    for split, samples in demo.items():
        expected = {"jpg", "txt", "cls"} if split == "classify" else {"jpg", "txt"}
        assert samples, f"{split} is empty"
        for key, parts in samples.items():
            assert re.fullmatch(r"\d{6}", key), f"{split}: bad key {key!r}"
            assert set(parts) == expected, f"{split}/{key}: members {sorted(parts)}"


def test_every_image_is_a_64px_rgb_jpeg(demo):
    for split, samples in demo.items():
        for key, parts in samples.items():
            with Image.open(io.BytesIO(parts["jpg"])) as image:
                assert image.format == "JPEG", f"{split}/{key}"
                assert image.mode == "RGB", f"{split}/{key}: {image.mode}"
                assert image.size == (SIZE, SIZE), f"{split}/{key}: {image.size}"
                image.load()  # decodes the whole stream: a truncated JPEG raises here


def test_images_are_on_white_and_not_blank(demo):
    # Padding is white and every image shows something: the corner of a padded, flattened
    # drawing is near white (JPEG ringing next to dark edges pulls it down to ~210), and some
    # channel somewhere is darker than white (thin outlines come out pale grey at 64 px).
    for split, samples in demo.items():
        for key, parts in samples.items():
            image = Image.open(io.BytesIO(parts["jpg"]))
            assert min(image.getpixel((0, 0))) > 200, f"{split}/{key}: corner not white"
            darkest = min(low for low, _ in image.getextrema())
            assert darkest < 225, f"{split}/{key} looks blank"


def test_captions_are_clean_utf8_text(demo):
    for split, samples in demo.items():
        for key, caption in _captions(samples).items():
            assert caption == caption.strip() and caption, f"{split}/{key}: {caption!r}"
            assert "\n" not in caption and "  " not in caption, f"{split}/{key}: {caption!r}"
            assert not re.search(r"&(#\d+|[a-z]+);", caption), f"{split}/{key}: {caption!r}"
            assert "Flat Icon Collection" not in caption and "gramastar" not in caption
            assert not re.search(r"[\x00-\x1f\x7f-\x9f]", caption), f"{split}/{key}"
            # < ~60 BPE tokens: the builder keeps captions well under 60 words.
            assert len(caption.split()) <= 45, f"{split}/{key}: {caption!r}"


def test_keys_unique_across_splits(demo):
    seen: dict[str, str] = {}
    for split, samples in demo.items():
        for key in samples:
            assert key not in seen, f"key {key} is in {seen.get(key)} and {split}"
            seen[key] = split


def test_no_heldout_or_classify_caption_in_train(demo):
    train = {build_demo.normalize_caption(c) for c in _captions(demo["train"]).values()}
    for split in ("heldout", "classify"):
        for key, caption in _captions(demo[split]).items():
            assert build_demo.normalize_caption(caption) not in train, f"{split}/{key}: {caption}"


def test_heldout_captions_are_unique_so_retrieval_has_one_answer(demo):
    normalized = [build_demo.normalize_caption(c) for c in _captions(demo["heldout"]).values()]
    assert len(set(normalized)) == len(normalized)
    assert 700 <= len(normalized) <= 900


def test_train_duplicates_are_capped(demo):
    counts = collections.Counter(
        build_demo.normalize_caption(c) for c in _captions(demo["train"]).values()
    )
    assert max(counts.values()) <= 8
    # Numbered series are kept (up to 8), but most captions still name one image.
    assert sum(n == 1 for n in counts.values()) > 0.7 * len(counts)


def test_train_has_clip_art_and_emoji_and_the_test_splits_only_clip_art(demo):
    def is_emoji(key: str) -> bool:
        return int(key) >= build_demo.EMOJI_KEY_BASE

    train_emoji = [key for key in demo["train"] if is_emoji(key)]
    assert 1500 <= len(train_emoji) <= 2500
    assert len(demo["train"]) - len(train_emoji) >= 3500
    for split in ("heldout", "classify"):
        assert not any(is_emoji(key) for key in demo[split]), split
    caption = demo["train"]["100000"]["txt"].decode()
    assert caption == "Grinning face. Emoji, face smiling.", caption


def test_labels_in_range_and_every_class_has_20_examples(demo, classnames):
    assert len(classnames) >= 12 and len(set(classnames)) == len(classnames)
    assert all(name and name == name.strip() for name in classnames)
    labels = [int(parts["cls"].decode("ascii")) for parts in demo["classify"].values()]
    assert all(0 <= label < len(classnames) for label in labels)
    per_class = collections.Counter(labels)
    assert set(per_class) == set(range(len(classnames))), "a class has no example"
    assert min(per_class.values()) >= 20, per_class
    assert max(per_class.values()) <= 2 * 20, "classes should stay balanced-ish"


def test_size_within_budget():
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert 1_000_000 < total <= BUDGET_BYTES, total


def test_counts_match_provenance(demo, classnames, provenance):
    table = dict(
        re.findall(r"^\| (train|heldout|classify) \| \d+ \| (\d+) \|$", provenance, flags=re.M)
    )
    assert {split: int(n) for split, n in table.items()} == {
        split: len(samples) for split, samples in demo.items()
    }
    shards = dict(re.findall(r"^\| (train) \| (\d+) \|", provenance, flags=re.M))
    assert int(shards["train"]) == len(list(DEMO.glob("train-*.tar.gz")))
    classes = re.findall(r"^\| (\d+) \| ([^|]+?) \| (\d+) \|$", provenance, flags=re.M)
    assert [name for _, name, _ in classes] == classnames
    per_class = collections.Counter(int(p["cls"]) for p in demo["classify"].values())
    assert {int(label): int(n) for label, _, n in classes} == dict(per_class)
    assert "public domain" in provenance.lower() and "openclipart-png" in provenance
    assert "SIL Open Font License" in provenance and "fonts-noto-color-emoji" in provenance
    assert "python tools/build_demo.py" in provenance


def test_sources_tsv_maps_every_key(demo):
    rows = (DEMO / "sources.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["key", "split", "label", "source", "author"]
    listed = {}
    for row in rows[1:]:
        key, split, label, source, _author = row.split("\t")
        if int(key) < build_demo.EMOJI_KEY_BASE:
            assert source.startswith("openclipart/png/") and source.endswith(".png"), row
        else:
            assert re.fullmatch(r"noto-color-emoji/[0-9A-F]{4,5}(_[0-9A-F]{4,5})*", source), row
        listed[key] = (split, label)
    expected = {
        key: (split, parts["cls"].decode() if "cls" in parts else "")
        for split, samples in demo.items()
        for key, parts in samples.items()
    }
    assert listed == expected


# ------------------------------------------------------------------------------------------
# Builder logic (the builder itself needs the Debian packages and is not run here).


def _clipart(title="", description="", keywords=(), creator="", docname="", rel="x/y"):
    return build_demo.ClipArt(0, rel, title, description, tuple(keywords), creator, docname)


def test_normalize_caption_ignores_case_punctuation_and_numbering():
    norm = build_demo.normalize_caption
    assert norm("Woman Police 01.") == norm("woman  police 02") == "woman police"
    assert norm("Café, crème!") == "café crème"
    assert norm("Red car.") != norm("Blue car.")


def test_clean_text_repairs_entities_mojibake_and_whitespace():
    clean = build_demo.clean_text
    assert clean("L&amp;Atilde;&amp;copy;zard") == "Lézard"
    assert clean("Dog by Mikolá\x9a Ale\x9a") == "Dog by Mikoláš Aleš"  # cp1252 bytes
    assert clean("  a_b\n\t<b>c</b> ") == "a b c"
    assert clean(None) == ""


def test_caption_from_title_description_and_keywords():
    item = _clipart(
        "Blue Vacuum Cleaner",
        "A blue vacuum cleaner.  It sucks.",
        ["blue", "vacuum", None, "hash", "tool", "Jaime Sanchez", "clean", "work"],
        creator="Jaime Sanchez",
    )
    # Description repeated? no: it differs from the title once normalised. Keywords already in
    # the text, tool tags, the author and the empty keyword are dropped.
    assert build_demo.make_caption(item) == (
        "Blue Vacuum Cleaner. A blue vacuum cleaner. Tool, clean."
    )


def test_boilerplate_titles_fall_back_to_the_file_name_or_are_dropped():
    flat = _clipart(
        "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
        keywords=["hash", None, "action", "computer", "icons", "theme"],
        docname="folder_music.svg",
    )
    assert build_demo.make_caption(flat) == "Folder music. Computer."
    star = _clipart("gramastar", keywords=["stars", "shapes"], rel="shapes/stars/star_73pt34step")
    assert build_demo.make_caption(star) == "Star."
    nothing = _clipart("Lemon SVG theme", keywords=["icon", "computer"], rel="icons/v17")
    assert build_demo.make_caption(nothing) == ""


def test_series_titles_are_preceded_by_the_file_name():
    card = _clipart("card", keywords=["card", "white"], rel="games/cards/white/white_h_q")
    caption = build_demo.make_caption(card, frozenset({"card"}))
    assert caption == "Queen of hearts, white playing card."
    state = _clipart("Australian Maps", keywords=["geography"], docname="queensland-outline.svg")
    assert build_demo.make_caption(state, frozenset({"australian maps"})) == (
        "Queensland outline. Australian Maps. Geography."
    )


def test_name_from_file_strips_paths_numbers_and_author_fragments():
    name = build_demo.name_from_file
    assert name("/home/nicu/svg_gal/clock/clock04.svg") == "clock"
    assert name("bullet_hole_linda_kim_r", "Linda Kim") == "bullet hole"
    assert name("woman_reading_gerald_g._01", "Gerald G.") == "woman reading"
    assert name("70a018.svg") == ""


def test_labels_need_exactly_one_class_word():
    assert build_demo.labels_of(_clipart("Owl on Branch", keywords=["animal", "bird"])) == ["bird"]
    assert build_demo.labels_of(_clipart("Dog and cat")) == ["cat", "dog"]
    # Theme tags do not count: "lemon_theme_icon" must not make an icon a fruit.
    assert build_demo.labels_of(_clipart("Lemon SVG theme", keywords=["lemon_theme_icon"])) == []


def test_fit_on_white_crops_to_the_drawing_and_pads_with_white():
    page = Image.new("RGBA", (400, 200), (0, 0, 0, 0))  # transparent page, drawing in a corner
    page.paste((255, 0, 0, 255), (10, 10, 50, 30))  # 40x20 red box
    out = build_demo.fit_on_white(page, SIZE)
    assert out.mode == "RGB" and out.size == (SIZE, SIZE)
    assert out.getpixel((SIZE // 2, SIZE // 2))[0] > 200 > out.getpixel((SIZE // 2, SIZE // 2))[1]
    assert out.getpixel((SIZE // 2, 2)) == (255, 255, 255)  # padding above the 2:1 box
    assert out.getpixel((3, SIZE // 2))[1] < 60  # the box fills the width, less the margin
    with pytest.raises(build_demo.BlankImageError):
        build_demo.fit_on_white(Image.new("RGBA", (30, 30), (255, 255, 255, 0)), SIZE)


def test_write_shard_is_deterministic_and_readable(tmp_path):
    items = [_clipart(rel="a"), build_demo.ClipArt(7, "b", "", "", (), "", "")]
    images = {"000000": b"jpeg-0", "000007": b"jpeg-7"}
    captions = {"000000": "Zero.", "000007": "Seven é."}
    for name in ("one.tar.gz", "two.tar.gz"):
        build_demo.write_shard(tmp_path / name, items, images, captions, {"000000": 0, "000007": 3})
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    shard = _read_shard(tmp_path / "one.tar.gz")
    assert shard == {
        "000000": {"jpg": b"jpeg-0", "txt": b"Zero.", "cls": b"0"},
        "000007": {"jpg": b"jpeg-7", "txt": "Seven é.".encode(), "cls": b"3"},
    }


def test_missing_packages_give_a_clear_error(tmp_path):
    with pytest.raises(
        RuntimeError,
        match="openclipart-png, openclipart-svg.*fonts-noto-color-emoji, unicode-data.*apt-get",
    ):
        build_demo.check_sources(tmp_path, tmp_path / "font.ttf", tmp_path / "emoji-test.txt")


def test_emoji_list_keeps_default_skin_tone_and_names_with_subgroups(tmp_path):
    (tmp_path / "emoji-test.txt").write_text(
        "# group: Smileys & Emotion\n"
        "# subgroup: face-smiling\n"
        "1F600 ; fully-qualified # 😀 E1.0 grinning face\n"
        "# group: People & Body\n"
        "# subgroup: person-role\n"
        "1F469 200D 1F373 ; fully-qualified # 👩‍🍳 E4.0 woman cook\n"
        "1F469 1F3FD 200D 1F373 ; fully-qualified # 👩🏽‍🍳 E4.0 woman cook: medium skin tone\n"
        "263A ; unqualified # ☺ E0.6 smiling face\n"
        "# group: Component\n"
        "# subgroup: hair-style\n"
        "1F9B0 ; component # 🦰 E11.0 red hair\n",
        encoding="utf-8",
    )
    counts = collections.Counter()
    emoji = build_demo.read_emoji_test(tmp_path / "emoji-test.txt", counts)
    assert [(e.key, e.sequence, e.caption) for e in emoji] == [
        ("100000", "\U0001f600", "Grinning face. Emoji, face smiling."),
        ("100001", "\U0001f469\u200d\U0001f373", "Woman cook. Emoji, person role."),
    ]
    assert emoji[1].source == "noto-color-emoji/1F469_200D_1F373"
    assert counts["emoji skipped: skin-tone variant"] == 1


def test_splits_keep_emoji_in_train_and_hold_out_single_image_captions():
    items = [
        _clipart(f"Thing {name}", rel=f"r/{i}")
        for i, name in enumerate(["alpha", "beta", "gamma", "delta", "eps", "zeta"])
    ]
    items = [dataclasses.replace(it, index=i) for i, it in enumerate(items)]
    # A numbered series: three drawings whose captions normalise alike ("Star 1." / "Star 2.").
    items += [dataclasses.replace(_clipart(f"Star {i}", rel="s"), index=10 + i) for i in range(3)]
    emoji = [build_demo.Emoji(build_demo.EMOJI_KEY_BASE, "\U0001f600", "thing alpha", "x")]
    counts = collections.Counter()
    splits = build_demo.make_splits(
        items, 0, counts, heldout_size=2, max_per_caption=2, train_only=emoji
    )
    norm = build_demo.normalize_caption
    train = {norm(splits.captions[it.key]) for it in splits.train}
    heldout = [norm(splits.captions[it.key]) for it in splits.heldout]
    assert len(heldout) == len(set(heldout)) == 2 and not set(heldout) & train
    assert "star" not in heldout  # a series is never held out: it has no single right image
    assert [it.key for it in splits.train].count("100000") == 1
    assert counts["dropped: duplicate caption"] == 1  # the third star (max_per_caption=2)
    assert len(splits.train) + len(splits.heldout) == 6 + 2 + 1
