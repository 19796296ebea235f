"""Builds the demo dataset shipped in ``clip_jax/data/demo`` from Debian packages.

    python tools/build_demo.py [--output clip_jax/data/demo] [--size 64] [--seed 0]

Sources:

- the public-domain clip art of Debian's ``openclipart-png`` (bitmaps) and ``openclipart-svg``
  (the same drawings as SVG, whose RDF metadata gives each image a title, keywords and sometimes
  a description). Huge PNGs that PIL treats as decompression bombs are rendered from their SVG
  with ``rsvg-convert`` (package ``librsvg2-bin``) instead;
- the Noto Color Emoji font (``fonts-noto-color-emoji``) rendered with PIL, captioned with the
  emoji's CLDR short name and subgroup from ``unicode-data``'s ``emoji-test.txt`` (train only:
  held-out and classify stay clip art, the task the demo's numbers have always measured).

Output (the WebDataset layout the input pipeline reads, see ``clip_jax.data.shards``):

- ``train-0000{0..7}.tar.gz``: image/caption pairs, members ``{key}.jpg`` + ``{key}.txt``;
- ``heldout-00000.tar.gz``: a retrieval set split from train BY CAPTION (no normalised held-out
  caption occurs in train; every held-out caption is unique and names one image);
- ``classify-00000.tar.gz`` + ``classnames.txt``: a labelled set, members also ``{key}.cls``,
  images whose title/keywords/folders name exactly one of :data:`CLASSES`; excluded from train;
- ``sources.tsv``: key -> split, label, source file and author, for provenance;
- ``PROVENANCE.md``: packages and versions, licence, the command, counts.

Images are flattened onto white, fitted into ``size x size`` keeping the aspect ratio and PADDED
with white (clip art sits on white already and padding never cuts off part of the drawing), then
stored as JPEG. Everything is deterministic given the seed (fixed tar/gzip timestamps, sorted
inputs, seeded shuffles).

Only the standard library, PIL and ftfy are imported here, so that the tests can import
:func:`normalize_caption` cheaply. The builder is not run by the tests: its output is committed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import html
import io
import logging
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import typing
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional, Sequence

import ftfy
import ftfy.fixes
import PIL
from PIL import Image, ImageChops, ImageDraw, ImageFont, features

SOURCE_ROOT = Path("/usr/share/openclipart")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
REQUIRED_PACKAGES = (
    "openclipart-png",
    "openclipart-svg",
    "librsvg2-bin",
    "fonts-noto-color-emoji",
    "unicode-data",
)
# Emoji keys start here, above every clip-art index (6,900 source PNGs in release 0.18).
EMOJI_KEY_BASE = 100_000
# The only size at which the bitmap font NotoColorEmoji.ttf has glyphs (136x128 px bitmaps).
EMOJI_FONT_SIZE = 109
# Skin-tone modifiers: the five tones of one emoji are the same drawing recoloured; only the
# default (yellow) one is kept.
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "clip_jax" / "data" / "demo"
_WHITE = (255, 255, 255, 255)
_FAINT = 225  # a scaled drawing whose darkest channel value is this light is invisible

# XML namespaces of the RDF metadata block that Inkscape-era SVGs carry.
_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
_SODIPODI = "http://sodipodi.sourceforge.net/DTD/sodipodi-0.dtd"
_SVG = "http://www.w3.org/2000/svg"
_XLINK = "http://www.w3.org/1999/xlink"

# Titles that name a collection, a theme or a generator rather than the picture. They are shared
# by hundreds of unrelated images ("Part of the Flat Icon Collection (Wed Aug 25 ...)" x 800,
# "gramastar" x 1375 generated stars, "Lemon SVG theme" x 411, ...), and "Clipart by Nicu
# Buculei - <file name>" titles are often pasted onto the wrong drawing.
_BOILERPLATE_TITLE = re.compile(
    r"""(
        ^part\ of\ (the\ )?.*\bcollection\b
      | ^clipart\ by\ .*\ -
      | \btheme$ | -theme$ | \bicon-?theme\b | \bicon\ ?set\b | \biconset\b
      | ^gramastar$ | ^various\ cliparts?$ | ^etiquette\ icons$
      | ^r\d+\ sibmission$ | ^sallite$ | @
      | ^(untitled|unnamed|new\ document|drawing|image|svg|clipart|test)\b(\ ?\d+)?$
    )""",
    re.X | re.I,
)

# Descriptions that are licence text, contact data, links or collection boilerplate.
_BOILERPLATE_DESCRIPTION = re.compile(
    r"https?:|www\.|@|public\ domain|creative\ commons|converted\ from|^part\ of\b|data\ from"
    r"|^collection\ of\b|\bsvg\b|inkscape|0x[0-9a-f]{5,}",
    re.X | re.I,
)

# An upload script wrote Perl references ("HASH(0x85a0ae8)") into some keywords/descriptions.
_PERL_HASH = re.compile(r"0x[0-9a-f]{5,}", re.I)

# Keywords that carry no information about the picture: upload-tool tags, theme names, the
# package's own sorting bins.
_STOP_KEYWORDS = frozenset(
    {
        "hash",
        "icons",
        "icon",
        "theme",
        "lemon theme icon",
        "magick",
        "geometry",
        "unsorted",
        "action",
        "application",
        "applications",
        "mimetypes",
        "mime-types",
        "mime types",
        "appicon",
        "menu",
        "work",
        "signs and symbols",
        "united nations member",
        "mapsym",
        "map symbol",
        "networksym",
        "religholiday",
        "musicstuff",
        "miscellany",
        "subnational",
        "shapes",
        "shape",
        "clip art",
        "clipart",
        "openclipart",
        "image",
        "picture",
        "simple",
        "other",
        "misc",
        "stuff",
        "filesystem",
        "filesystems",
        "device",
        "devices",
        "stock",
        "apps",
    }
)  # compared after clean_text() and lower(): underscores are spaces by then
_STOP_WORDS_IN_KEYWORDS = frozenset(
    "hash icons icon theme magick unsorted mimetypes appicon mapsym networksym religholiday".split()
)

_PLAYING_CARD = re.compile(
    r"^(bordered|ornamental|simple|white)_(?:([cdhs])_(a|10|[2-9jqk])|jk_([br]))$"
)
_CARD_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
# Ranks in words: captions are compared without digits, so "2 of hearts" would equal "3 of ...".
_CARD_RANKS = dict(
    zip(
        "a 2 3 4 5 6 7 8 9 10 j q k".split(),
        "ace two three four five six seven eight nine ten jack queen king".split(),
    )
)

MAX_TITLE_WORDS = 12
MAX_DESCRIPTION_WORDS = 25
MAX_KEYWORDS = 3
COLLECTION_TITLE_MIN = 10

# Classification categories: class name -> words that name it in a title or keyword (a few
# Italian/French ones too: many drawings have Italian titles). An image is labelled only if
# exactly one class matches, so overlapping words (e.g. "man" for person, "stick" for stick
# figure) make the image ambiguous and keep it out of the classification set rather than
# mislabel it. Classes with too few images after de-duplication are left out at build time.
CLASSES: dict[str, frozenset[str]] = {
    name: frozenset(words.split())
    for name, words in [
        (
            "bird",
            "bird birds eagle eagles owl parrot penguin penguins swan duck rooster hen "
            "chicken aquila acquila cigno",
        ),
        ("fish", "fish fishes goldfish shark pesce"),
        (
            "insect",
            "insect insects bug bugs butterfly bee ladybug ladybird dragonfly damselfly "
            "beetle ant ants fly wasp",
        ),
        ("cat", "cat cats kitten kitty gatto"),
        ("dog", "dog dogs puppy cane"),
        ("horse", "horse horses pony cavallo"),
        ("dinosaur", "dinosaur dinosaurs dino dinosauro"),
        ("flower", "flower flowers rose roses tulip daisy sunflower fiore"),
        ("tree", "tree trees pine oak albero"),
        (
            "fruit",
            "fruit fruits apple apples banana pear pears cherry cherries grape grapes "
            "strawberry lemon orange peach",
        ),
        ("dessert", "dessert desserts cake cakes icecream pie cookie cookies candy cupcake gelato"),
        ("drink", "drink drinks beverage beverages beer wine coffee tea juice cocktail"),
        ("house", "house houses home homes hut cottage casa"),
        ("car", "car cars automobile hummer jeep taxi"),
        ("boat", "boat boats ship ships sailboat yacht canoe barca nave"),
        ("clock", "clock clocks orologio"),
        ("hat", "hat hats cap"),
        ("smiley", "smiley smilies smileys emoticon"),
        ("stick figure", "stickman stickmen stick"),
        ("person", "person man woman men women boy girl child"),
        ("arrow", "arrow arrows"),
        ("flag", "flag flags"),
        ("playing card", "card cards"),
        ("jigsaw puzzle piece", "jigsaw puzzle"),
        ("book", "book books"),
        ("telephone", "telephone telephones phone phones"),
        ("weapon", "weapon weapons gun guns rifle pistol sword"),
        ("light bulb", "bulb lightbulb"),
        ("moon", "moon moons"),
        ("musical instrument", "guitar violin piano trumpet drum saxophone instrument"),
    ]
}


@dataclasses.dataclass(frozen=True)
class ClipArt:
    """One source drawing: a real (non-symlink) PNG of the package and its metadata."""

    index: int  # position in the sorted list of all source PNGs; the shard key is f"{index:06d}"
    rel: str  # path below png/ without extension, e.g. "animals/birds/owl_01"
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str
    docname: str  # sodipodi:docname, the file name the author saved the SVG under ("" if none)

    @property
    def key(self) -> str:
        return f"{self.index:06d}"

    @property
    def source(self) -> str:
        return f"openclipart/png/{self.rel}.png"

    @property
    def author(self) -> str:
        return clean_text(self.creator)


@dataclasses.dataclass(frozen=True)
class Emoji:
    """One emoji of ``emoji-test.txt`` (fully qualified, default skin tone)."""

    index: int  # EMOJI_KEY_BASE + position in emoji-test.txt's fully-qualified list
    sequence: str  # the code points, e.g. "\U0001F469\u200d\U0001F373"
    name: str  # CLDR short name, e.g. "woman cook", "flag: Germany"
    subgroup: str  # e.g. "person-role", "country-flag"

    @property
    def key(self) -> str:
        return f"{self.index:06d}"

    @property
    def source(self) -> str:
        return "noto-color-emoji/" + "_".join(f"{ord(c):04X}" for c in self.sequence)

    @property
    def author(self) -> str:
        return "Google (Noto Emoji)"

    @property
    def caption(self) -> str:
        """``"Woman cook. Emoji, person role."``: the name, then the subgroup as keywords."""
        return f"{_sentence(self.name)} Emoji, {self.subgroup.replace('-', ' ')}."


Item = typing.Union[ClipArt, Emoji]


# --------------------------------------------------------------------------------------------
# Text.


def clean_text(text: Optional[str]) -> str:
    """Unescapes HTML entities (also double-escaped ones), repairs mojibake, drops tags and
    comments, turns underscores into spaces and collapses whitespace."""
    if not text:
        return ""
    for _ in range(2):  # some titles are escaped twice: "L&amp;Atilde;&amp;copy;zard"
        text = html.unescape(text)
    # Stray Windows-1252 bytes ("Mikolá\x9a" for "Mikoláš") first: left in, ftfy misreads them
    # as the tail of a UTF-8 sequence.
    text = ftfy.fix_text(ftfy.fixes.fix_c1_controls(text))
    text = re.sub(r"<!--.*?-->|<[^>]*>", " ", text, flags=re.S)
    text = text.replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def normalize_caption(text: str) -> str:
    """The key under which captions count as equal: NFKC, lower case, letters only.

    Digits are dropped too so that numbered variants ("Woman Police 01" / "... 02") count as one
    caption: they are near-identical drawings and must not straddle the train/held-out split.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[\W\d_]+", " ", text)
    return " ".join(text.split())


def _words(text: str) -> set[str]:
    return set(normalize_caption(text).split())


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _stems(text: str) -> set[str]:
    return {_singular(w) for w in _words(text)}


def _first_words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def _first_sentence(text: str) -> str:
    match = re.search(r"(?<=[a-z0-9)\"'])[.!?](\s|$)", text)
    return text[: match.start() + 1] if match else text


def _sentence(part: str) -> str:
    """Capitalised, ending in exactly one sentence mark."""
    part = part.strip().rstrip(".;:,- ")
    part = part[:1].upper() + part[1:]
    return part if part.endswith(("!", "?")) else part + "."


def informative_title(title: str) -> str:
    """The cleaned title, or "" for collection/theme boilerplate and titles without letters."""
    title = clean_text(title)
    if not re.search(r"[^\W\d_]", title) or _BOILERPLATE_TITLE.search(title):
        return ""
    return _first_words(title, MAX_TITLE_WORDS)


def name_from_file(file_name: str, creator: str = "") -> str:
    """A title made from a file name: ``"/home/nicu/svg_gal/clock/clock04.svg"`` -> ``"clock"``,
    ``"folder_music.svg"`` -> ``"folder music"``; "" when nothing word-like is left.

    Digits glued to words are stripped, tokens still holding digits dropped ("79pt35step"),
    and trailing tokens that abbreviate the author's name ("dog_gerald_g_01") removed.
    """
    stem = re.split(r"[/\\]", file_name)[-1]
    stem = re.sub(r"\.(svgz?|png|ai|eps|jpe?g)$", "", stem, flags=re.I)
    card = _PLAYING_CARD.match(stem)
    if card:  # the package's four card decks: "white_h_q" -> "queen of hearts, white ..."
        style, suit, rank, joker = card.groups()
        if joker:
            return f"{'black' if joker == 'b' else 'red'} joker, {style} playing card"
        return f"{_CARD_RANKS[rank]} of {_CARD_SUITS[suit]}, {style} playing card"
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)  # camelCase -> camel Case
    tokens = []
    for token in re.split(r"[\W_]+", clean_text(stem)):
        token = re.sub(r"^\d+|\d+$", "", token)
        if token and not re.search(r"\d", token):
            tokens.append(token)
    creator_words = normalize_caption(clean_text(creator)).split()
    # File names often end in a cut-off author name and initials: "bullet_hole_linda_kim_r".
    while tokens and (
        len(tokens[-1]) == 1 or any(w.startswith(tokens[-1].lower()) for w in creator_words)
    ):
        tokens.pop()
    if not any(len(t) >= 3 for t in tokens):
        return ""
    return " ".join(tokens)


def informative_description(description: str, title: str) -> str:
    """The first sentence of the description, or "" when it is boilerplate, only repeats the
    title, or runs over MAX_DESCRIPTION_WORDS words (cutting it would leave half a sentence)."""
    description = clean_text(description)
    if not description or _BOILERPLATE_DESCRIPTION.search(description):
        return ""
    description = _first_sentence(description)
    if len(description.split()) > MAX_DESCRIPTION_WORDS:
        return ""
    norm = normalize_caption(description)
    if not norm or norm in normalize_caption(title):
        return ""
    return description


def informative_keywords(keywords: Iterable[Optional[str]], creator: str, text: str) -> list[str]:
    """Keywords that add something to ``text`` (title + description): no upload-tool tags, no
    author names, no repeats of words already in the text. At most MAX_KEYWORDS, source order."""
    seen = {_singular(w) for w in _words(text)}
    creator_norm = normalize_caption(clean_text(creator))
    out: list[str] = []
    for raw in keywords:
        kw = clean_text(raw).lower()
        norm = normalize_caption(kw)
        if not norm or kw in _STOP_KEYWORDS or norm in _STOP_KEYWORDS or _PERL_HASH.search(kw):
            continue
        if creator_norm and (norm in creator_norm or creator_norm in norm):
            continue
        words = [w for w in norm.split() if w not in _STOP_WORDS_IN_KEYWORDS]
        if not words or all(_singular(w) in seen for w in words):
            continue
        seen.update(_singular(w) for w in words)
        out.append(kw)
        if len(out) == MAX_KEYWORDS:
            break
    return out


def collection_titles(items: Iterable[ClipArt]) -> frozenset[str]:
    """Normalised titles shared by at least COLLECTION_TITLE_MIN drawings ("Australian Maps",
    "SVG Road Signs", "card", ...): they name a series, so the file name must tell its members
    apart."""
    counter = collections.Counter(normalize_caption(clean_text(it.title)) for it in items)
    return frozenset(t for t, n in counter.items() if t and n >= COLLECTION_TITLE_MIN)


def make_caption(item: ClipArt, series_titles: frozenset[str] = frozenset()) -> str:
    """``"<Title>. <Description>. <keyword>, <keyword>."``, or "" when neither the title nor the
    description says anything (keywords alone are generic tags shared by hundreds of images).

    A boilerplate title is replaced by a name made from the SVG's file name; a series title
    (one of ``series_titles``, see :func:`collection_titles`) is preceded by that name.
    """
    title = informative_title(item.title)
    if title and _words(title) <= _words(clean_text(item.creator)):
        title = ""  # the author's name typed into the title field
    name = informative_title(name_from_file(item.docname or item.rel, item.creator))
    if not title:
        titles = [name] if name else []
    elif name and normalize_caption(title) in series_titles:
        # "Queensland outline. Australian Maps."; a series title the name already contains
        # ("card" for "Queen of hearts, simple playing card") is left out.
        titles = [name] if _stems(title) <= _stems(name) else [name, title]
    else:
        titles = [title]
    description = informative_description(item.description, " ".join(titles))
    if not titles and not description:
        return ""
    parts = [_sentence(p) for p in titles + [description] if p]
    keywords = informative_keywords(item.keywords, item.creator, " ".join(parts))
    if keywords:
        parts.append(_sentence(", ".join(keywords)))
    return " ".join(parts)


def labels_of(item: ClipArt) -> list[str]:
    """Class names of :data:`CLASSES` named by the (informative) title or keywords of ``item``.

    The package's folders are not used: symlinks file drawings under loose folders (a squirrel
    under education/books, a cassette among the playing cards).
    """
    words = _words(informative_title(item.title))
    for raw in item.keywords:
        keyword = clean_text(raw).lower()
        if keyword and keyword not in _STOP_KEYWORDS and not _PERL_HASH.search(keyword):
            words |= _words(keyword) - _STOP_WORDS_IN_KEYWORDS
    return [name for name, class_words in CLASSES.items() if words & class_words]


# --------------------------------------------------------------------------------------------
# Sources.


def check_sources(
    root: Path = SOURCE_ROOT, emoji_font: Path = EMOJI_FONT, emoji_test: Path = EMOJI_TEST
) -> None:
    """Raises a RuntimeError naming the Debian packages to install when a source is missing."""
    missing = []
    if not (root / "png").is_dir():
        missing.append("openclipart-png")
    if not (root / "svg").is_dir():
        missing.append("openclipart-svg")
    if shutil.which("rsvg-convert") is None:
        missing.append("librsvg2-bin")
    if not emoji_font.is_file():
        missing.append("fonts-noto-color-emoji")
    if not emoji_test.is_file():
        missing.append("unicode-data")
    if missing:
        raise RuntimeError(
            f"the demo dataset is built from Debian packages that are not installed: "
            f"{', '.join(missing)} (looked for {root}/png, {root}/svg, rsvg-convert, "
            f"{emoji_font} and {emoji_test}). "
            f"Install them with: apt-get update && apt-get install -y {' '.join(REQUIRED_PACKAGES)}"
        )
    if not features.check("raqm"):
        # Without libraqm PIL draws a ZWJ sequence or a flag as its separate code points.
        raise RuntimeError(
            "PIL was built without libraqm (PIL.features.check('raqm') is False): emoji "
            "sequences cannot be shaped; install libraqm0 (Debian) and reinstall Pillow"
        )


def package_versions(packages: Sequence[str] = REQUIRED_PACKAGES) -> dict[str, str]:
    """Installed Debian versions of ``packages`` (via dpkg-query), "unknown" where unavailable."""
    versions = {}
    for package in packages:
        try:
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package],
                capture_output=True,
                text=True,
                check=True,
            )
            versions[package] = result.stdout.strip() or "unknown"
        except (OSError, subprocess.CalledProcessError) as err:
            logging.warning("cannot read the version of %s: %s", package, err)
            versions[package] = "unknown"
    return versions


def read_svg_metadata(svg_path: Path) -> tuple[str, str, list[Optional[str]], str, str, bool]:
    """``(title, description, keywords, creator, docname, links_external_image)`` of an SVG.

    The first four come from the ``cc:Work`` RDF block, ``docname`` from the root's
    ``sodipodi:docname``; ``links_external_image`` is True when an ``<image>`` element points to
    a file on its author's disk instead of embedding the bitmap: the package's PNG of such a
    drawing shows a "Linked Image Not Found" placeholder or a hole.
    Raises ``xml.etree.ElementTree.ParseError`` for malformed XML; missing fields come back empty.
    """
    root = ET.parse(svg_path).getroot()
    docname = root.get(f"{{{_SODIPODI}}}docname", "")
    external = any(
        not (element.get(f"{{{_XLINK}}}href") or element.get("href") or "data:").startswith("data:")
        for element in root.iter(f"{{{_SVG}}}image")
    )
    work = root.find(".//cc:Work", _NS)
    if work is None:
        return "", "", [], "", docname, external
    title = work.findtext("dc:title", default="", namespaces=_NS)
    description = work.findtext("dc:description", default="", namespaces=_NS)
    keywords = [li.text for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
    creator = work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=_NS)
    return title, description, keywords, creator, docname, external


def scan_clipart(root: Path, counts: collections.Counter) -> list[ClipArt]:
    """All real PNG files below ``root/png``, sorted by path, with the metadata of the SVG at the
    same relative path. Symlinks (the package files some drawings under two folders) are
    skipped so that every drawing is counted once."""
    png_root = root / "png"
    rels = []
    for path in sorted(png_root.rglob("*.png")):
        if path.is_symlink():
            counts["png symlinks skipped (second listing of a drawing)"] += 1
        else:
            rels.append(path.relative_to(png_root).with_suffix("").as_posix())
    items = []
    for index, rel in enumerate(rels):
        svg_path = root / "svg" / (rel + ".svg")
        try:
            title, description, keywords, creator, docname, external = read_svg_metadata(svg_path)
        except (OSError, ET.ParseError) as err:
            logging.warning("skipping %s: unreadable SVG: %s", rel, err)
            counts["skipped: SVG unreadable"] += 1
            continue
        if external:
            counts["skipped: links an image file missing from the package"] += 1
            continue
        items.append(ClipArt(index, rel, title, description, tuple(keywords), creator, docname))
    counts["source png files"] = len(rels)
    return items


def read_emoji_test(path: Path, counts: collections.Counter) -> list[Emoji]:
    """The fully-qualified emoji of ``emoji-test.txt`` (lines ``1F600 ; fully-qualified # 😀 E1.0
    grinning face`` under ``# subgroup: face-smiling``), in file order; skin-tone variants and
    the "Component" group (bare skin tones and hair styles) left out."""
    emoji: list[Emoji] = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            fields, _, comment = line.partition("#")
            points, _, status = fields.partition(";")
            if status.strip() != "fully-qualified" or group == "Component":
                continue
            codes = [int(c, 16) for c in points.split()]
            if _SKIN_TONES.intersection(codes):
                counts["emoji skipped: skin-tone variant"] += 1
                continue
            # The comment is "<emoji> E<version> <name>".
            name = comment.strip().split(" ", 2)[2]
            sequence = "".join(chr(c) for c in codes)
            emoji.append(Emoji(EMOJI_KEY_BASE + len(emoji), sequence, name, subgroup))
    counts["emoji listed (fully qualified, default skin tone)"] = len(emoji)
    return emoji


# --------------------------------------------------------------------------------------------
# Images.


class BlankImageError(ValueError):
    """The drawing is invisible on white: white strokes on a transparent page, or empty."""


def fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """``[size, size]`` RGB image of the drawing in ``image``: alpha flattened onto white,
    cropped to the drawing's bounding box (many clip arts sit small on a large empty page),
    scaled so its longer side is ``size`` minus a 1/32 margin on each side (aspect kept) and
    centred on a white square: padding, no cropping into the drawing.

    Raises BlankImageError when nothing shows on white, or when no pixel of the scaled drawing
    is darker than 225 in any channel (a CAD drawing of 1 px lines came out at 236).
    """
    rgba = image.convert("RGBA")  # P+transparency, LA, L, RGB all become RGBA with real alpha
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    # Ink = any channel more than 8 levels below white (ignores faint anti-aliasing haze).
    ink = ImageChops.difference(rgb, Image.new("RGB", rgb.size, _WHITE[:3])).convert("L")
    bbox = ink.point(lambda v: 255 if v > 8 else 0).getbbox()
    if bbox is None:
        raise BlankImageError("nothing but white or transparency (a white drawing?)")
    rgb = rgb.crop(bbox)
    w, h = rgb.size
    inner = size - 2 * max(1, size // 32)
    scale = inner / max(w, h)
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = rgb.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), _WHITE[:3])
    if min(low for low, _ in rgb.getextrema()) >= _FAINT:
        raise BlankImageError("only hairlines that fade to near-white at this size")
    canvas.paste(rgb, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def render_svg(svg_path: Path, box: int) -> Image.Image:
    """Renders an SVG with rsvg-convert into a PNG that fits a ``box x box`` square."""
    result = subprocess.run(
        ["rsvg-convert", "--keep-aspect-ratio", "-w", str(box), "-h", str(box), str(svg_path)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rsvg-convert failed on {svg_path}: {result.stderr.decode()[-300:]}")
    image = Image.open(io.BytesIO(result.stdout))
    image.load()
    return image


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def render_emoji(
    font: ImageFont.FreeTypeFont, sequence: str, size: int, quality: int
) -> tuple[Optional[bytes], str]:
    """``(jpeg bytes or None, how)`` for one emoji drawn with the colour bitmap ``font``: "emoji",
    "not one glyph" (the font has no glyph for the sequence and PIL would draw its parts side by
    side) or "blank" (white on transparent, invisible on white)."""
    # One Noto glyph advances 136 px at size 109; a sequence without a glyph of its own is drawn
    # as two or more of them.
    width = font.getlength(sequence)
    if width > 1.5 * font.getlength("\U0001f600"):
        return None, "not one glyph"
    canvas = Image.new("RGBA", (int(width) + 2 * EMOJI_FONT_SIZE, 3 * EMOJI_FONT_SIZE), (0,) * 4)
    ImageDraw.Draw(canvas).text(
        (EMOJI_FONT_SIZE, EMOJI_FONT_SIZE), sequence, font=font, embedded_color=True
    )
    try:
        return _jpeg(fit_on_white(canvas, size), quality), "emoji"
    except BlankImageError:
        return None, "blank"


def encode_image(job: tuple[Path, str, int, int]) -> tuple[Optional[bytes], str]:
    """``(jpeg bytes or None, how)`` for one drawing. ``how`` is "png", "svg" (the PNG was too
    large for PIL's decompression-bomb limit and the SVG was rendered instead), "blank" (see
    :class:`BlankImageError`) or "error: <reason>". Runs in worker processes."""
    root, rel, size, quality = job
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS PIL only warns (up to 2x, then raises); a PNG that large would
            # take GBs to decode for a 64 px thumbnail, so both cases are rendered from the SVG.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(root / "png" / (rel + ".png")) as image:
                    image.load()
                    square = fit_on_white(image, size)
                how = "png"
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                square = fit_on_white(render_svg(root / "svg" / (rel + ".svg"), 8 * size), size)
                how = "svg"
    except BlankImageError:
        return None, "blank"
    except (OSError, RuntimeError, ValueError, SyntaxError) as err:
        return None, f"error: {type(err).__name__}: {err}"
    return _jpeg(square, quality), how


# --------------------------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass
class Splits:
    """Items per split; ``labels`` maps class-set keys to label indices."""

    train: list[Item]
    heldout: list[ClipArt]
    classify: list[ClipArt]
    classnames: list[str]
    labels: dict[str, int]
    captions: dict[str, str]


def make_splits(
    items: Sequence[ClipArt],
    seed: int,
    counts: collections.Counter,
    heldout_size: int = 800,
    max_per_caption: int = 8,
    min_per_class: int = 20,
    max_per_class: int = 40,
    max_per_class_group: int = 2,
    train_only: Sequence[Emoji] = (),
) -> Splits:
    """Captions, de-duplication and the train / heldout / classify split.

    Images are grouped by normalised caption and every group goes to exactly one split, so no
    held-out or classify caption occurs in train. A group keeps at most ``max_per_caption``
    images: numbered series ("Jigsaw blue" x 16) are different drawings worth training on, but
    the 1,376 generated stars captioned "Star." would be a sixth of the data. Classify takes,
    per class with at least ``min_per_class`` unambiguous images in caption groups of at most
    ``max_per_class_group``, about half of them, between ``min_per_class`` and
    ``max_per_class``, so some of every class stays in train. Heldout takes
    ``heldout_size`` random clip-art captions that name a single image (no image is thrown
    away and retrieval has one right answer). Train is the rest plus ``train_only`` (the emoji;
    a group holding one of them goes to train), shuffled.
    """
    rng = random.Random(seed)
    series = collection_titles(items)
    captions: dict[str, str] = {}
    groups: dict[str, list[Item]] = collections.defaultdict(list)
    for item in items:
        caption = make_caption(item, series)
        if not caption:
            counts["dropped: caption without information"] += 1
            continue
        captions[item.key] = caption
        groups[normalize_caption(caption)].append(item)
    for extra in train_only:
        captions[extra.key] = extra.caption
        groups[normalize_caption(extra.caption)].append(extra)
    train_groups = {
        norm for norm, members in groups.items() if any(isinstance(m, Emoji) for m in members)
    }
    for norm in sorted(groups):
        members = groups[norm]
        rng.shuffle(members)
        counts["dropped: duplicate caption"] += max(0, len(members) - max_per_caption)
        groups[norm] = sorted(members[:max_per_caption], key=lambda it: it.index)
    group_keys = sorted(groups)

    # Classification candidates: groups of at most `max_per_class_group` images whose every
    # image has the same single label. Larger groups are numbered series ("Jigsaw blue" x 8,
    # "Clock." x 8): one of them would fill a class with near-copies of one drawing.
    candidates: dict[str, list[str]] = collections.defaultdict(list)
    for norm in group_keys:
        if norm in train_groups or len(groups[norm]) > max_per_class_group:
            continue
        label_sets = {tuple(labels_of(it)) for it in groups[norm]}
        if len(label_sets) == 1:
            (labels,) = label_sets
            if len(labels) == 1:
                candidates[labels[0]].append(norm)
    classnames = [
        name for name in CLASSES if sum(len(groups[g]) for g in candidates[name]) >= min_per_class
    ]
    for name in CLASSES:
        if name not in classnames:
            counts[f"class dropped (< {min_per_class} images): {name}"] = sum(
                len(groups[g]) for g in candidates[name]
            )
    classify_groups: set[str] = set()
    classify: list[ClipArt] = []
    labels: dict[str, int] = {}
    for label, name in enumerate(classnames):
        available = sum(len(groups[g]) for g in candidates[name])
        target = min(max_per_class, max(min_per_class, available // 2))
        chosen: list[ClipArt] = []
        pool = list(candidates[name])
        rng.shuffle(pool)
        for norm in pool:
            if len(chosen) >= target:
                break
            classify_groups.add(norm)
            chosen.extend(groups[norm])
        for item in chosen:
            labels[item.key] = label
        classify.extend(chosen)

    remaining = [g for g in group_keys if g not in classify_groups]
    singles = [g for g in remaining if g not in train_groups and len(groups[g]) == 1]
    rng.shuffle(singles)
    if len(singles) < 2 * heldout_size:
        raise ValueError(
            f"only {len(singles)} single-image clip-art captions left for heldout+train; "
            f"heldout_size={heldout_size} would leave too little to train on"
        )
    heldout_groups = set(singles[:heldout_size])
    heldout = [groups[norm][0] for norm in sorted(heldout_groups)]
    train = [it for norm in remaining if norm not in heldout_groups for it in groups[norm]]
    train.sort(key=lambda it: it.index)
    rng.shuffle(train)
    heldout.sort(key=lambda it: it.index)
    classify.sort(key=lambda it: it.index)
    return Splits(train, heldout, classify, classnames, labels, captions)


# --------------------------------------------------------------------------------------------
# Output.


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same inputs give byte-identical shards
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: Path,
    items: Sequence[Item],
    images: dict[str, bytes],
    captions: dict[str, str],
    labels: Optional[dict[str, int]] = None,
) -> None:
    """One gzipped tar: ``{key}.jpg``, ``{key}.txt`` (utf-8) and, with labels, ``{key}.cls``."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for item in items:
            _add_member(tar, f"{item.key}.jpg", images[item.key])
            _add_member(tar, f"{item.key}.txt", captions[item.key].encode("utf-8"))
            if labels is not None:
                _add_member(tar, f"{item.key}.cls", str(labels[item.key]).encode("ascii"))


def _chunks(items: Sequence[Item], n: int) -> list[Sequence[Item]]:
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(n)]


def write_provenance(
    path: Path,
    *,
    command: str,
    seed: int,
    size: int,
    quality: int,
    max_per_caption: int,
    versions: dict[str, str],
    splits: Splits,
    shard_counts: dict[str, int],
    counts: collections.Counter,
    class_counts: dict[str, int],
    total_bytes: int,
) -> None:
    """PROVENANCE.md. The "Counts" and "Classes" tables are parsed by tests/test_demo_data.py."""
    train_emoji = sum(isinstance(it, Emoji) for it in splits.train)
    lines = [
        "# Demo dataset: provenance",
        "",
        "Small image-caption dataset shipped with clip_jax for demos, smoke tests and tutorials.",
        "",
        "## Sources and licences",
        "",
        "1. Clip art: the Open Clip Art Library (openclipart.org), release 0.18. Licence:",
        "   **public domain** (Creative Commons Public Domain Dedication; see",
        "   `/usr/share/doc/openclipart-png/copyright`). Authors are listed per image in",
        "   `sources.tsv` (attribution is not required, but kept for provenance).",
        "2. Emoji: glyphs of the Noto Color Emoji font (https://github.com/googlefonts/noto-emoji,",
        "   Copyright 2013-2017 Google Inc.), licensed under the **SIL Open Font License 1.1**",
        "   (the font; the emoji artwork is also published under the Apache License 2.0); see",
        "   `/usr/share/doc/fonts-noto-color-emoji/copyright`. Captions are the CLDR short names",
        "   and subgroups of the Unicode emoji data file `emoji-test.txt`",
        "   (Copyright Unicode, Inc., Unicode License; `/usr/share/doc/unicode-data/copyright`).",
        "   Emoji are in the train split only.",
        "",
        "Debian packages used:",
        "",
    ]
    lines += [f"- `{pkg}` {ver}" for pkg, ver in versions.items()]
    lines += [
        "",
        f"Encoded with Pillow {PIL.__version__} (JPEG bytes depend on its libjpeg, emoji on its",
        f"FreeType and libraqm); captions repaired with ftfy {ftfy.__version__}; Python",
        f"{sys.version.split()[0]}.",
        "",
        "## How it was built",
        "",
        "```",
        command,
        "```",
        "",
        f"Builder: `tools/build_demo.py`, seed {seed}. Rebuilding with the same seed and",
        "package versions gives byte-identical shards.",
        "",
        "- Clip-art images: the package's PNGs (symlinked duplicates counted once); PNGs above",
        "  PIL's decompression-bomb limit are rendered from their SVG with `rsvg-convert`;",
        "  drawings whose SVG links an image file that is not in the package are skipped (their",
        '  PNG shows a "Linked Image Not Found" placeholder). Alpha is flattened onto white, the',
        "  image cropped to the drawing's bounding box, scaled so its longer side fills the square",
        f"  less a 1/32 margin (aspect kept) and padded with white to {size}x{size} (padding, not",
        f"  center-cropping); JPEG quality {quality}.",
        "- Clip-art captions: from each SVG's RDF metadata: `<title>. <description>. <keywords>.`",
        "  HTML entities and mojibake repaired, whitespace collapsed; collection/theme titles",
        '  ("Part of the Flat Icon Collection ...", "gramastar", "Lemon SVG theme", ...),',
        "  licence/URL descriptions, tool tags and author names among the keywords dropped; the",
        f"  description cut to its first sentence ({MAX_DESCRIPTION_WORDS} words at most), at most",
        f"  {MAX_KEYWORDS} keywords not already in the text. Images whose title and description",
        "  are both uninformative are dropped.",
        "- Emoji: every fully-qualified emoji of `emoji-test.txt` in its default skin tone",
        "  (skin-tone variants and the Component group left out), ZWJ sequences and flags",
        f"  included, drawn with PIL (libraqm shaping) at the font's bitmap size {EMOJI_FONT_SIZE}",
        "  on transparency and flattened, cropped and padded exactly like the clip art. Caption:",
        '  `<CLDR name>. Emoji, <subgroup>.`, e.g. "Woman cook. Emoji, person role.".',
        "- De-duplication and splits: captions are compared after normalisation (lower case,",
        f"  letters only, digits dropped). Each caption group keeps at most {max_per_caption}",
        "  images and goes to exactly one split, so no held-out or classify caption occurs in",
        "  train.",
        "  `heldout` holds clip-art images whose caption names that image alone (unique captions",
        "  for retrieval). `classify` holds clip-art images whose title or keywords name exactly",
        "  one class of `classnames.txt`, from caption groups of at most 2 images (no numbered",
        "  series); classes need at least 20 such images and contribute about half of them",
        "  (20 to 40) so the rest stays in train.",
        "- Keys: clip art, the index of the source PNG in the sorted file list (`000000`...);",
        f"  emoji, {EMOJI_KEY_BASE} + the position in `emoji-test.txt`'s kept list. `sources.tsv`",
        "  maps every key to its split, label, source file (or emoji code points) and author.",
        "",
        "## Counts",
        "",
        "| split | shards | images |",
        "|---|---|---|",
        f"| train | {shard_counts['train']} | {len(splits.train)} |",
        f"| heldout | {shard_counts['heldout']} | {len(splits.heldout)} |",
        f"| classify | {shard_counts['classify']} | {len(splits.classify)} |",
        "",
        f"Train: {len(splits.train) - train_emoji} clip-art images and {train_emoji} emoji.",
        f"Total size of this folder: {total_bytes} bytes ({total_bytes / 2**20:.2f} MiB).",
        "",
        "## Classes",
        "",
        "| label | class | images |",
        "|---|---|---|",
    ]
    lines += [
        f"| {i} | {name} | {class_counts[name]} |" for i, name in enumerate(splits.classnames)
    ]
    lines += ["", "## Build log", ""]
    lines += [f"- {name}: {value}" for name, value in sorted(counts.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build(
    output: Path,
    size: int,
    seed: int,
    quality: int,
    train_shards: int,
    heldout_size: int,
    max_per_caption: int,
    workers: int,
    command: str,
) -> dict[str, int]:
    """Builds the whole demo folder; returns images per split, bytes written and seconds taken."""
    start = time.time()
    check_sources(SOURCE_ROOT)
    counts: collections.Counter = collections.Counter()
    items = scan_clipart(SOURCE_ROOT, counts)
    logging.info("encoding %d drawings with %d processes", len(items), workers)
    # Images first, so that a drawing that cannot be decoded never takes a split's place.
    jobs = [(SOURCE_ROOT, it.rel, size, quality) for it in items]
    images: dict[str, bytes] = {}
    with multiprocessing.Pool(workers) as pool:
        for item, (data, how) in zip(items, pool.imap(encode_image, jobs, chunksize=16)):
            if how == "blank":
                counts[
                    "skipped: nothing shows on white (empty, white-only or hairline drawing)"
                ] += 1
            elif data is None:
                logging.warning("skipping %s: %s", item.rel, how)
                counts["skipped: image cannot be decoded"] += 1
            else:
                images[item.key] = data
                if how == "svg":
                    counts["images rendered from SVG (PNG too large for PIL)"] += 1
    items = [it for it in items if it.key in images]
    emoji = read_emoji_test(EMOJI_TEST, counts)
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    rendered = []
    for em in emoji:
        data, how = render_emoji(font, em.sequence, size, quality)
        if data is None:
            counts[f"emoji skipped: {how}"] += 1
        else:
            images[em.key] = data
            rendered.append(em)
    splits = make_splits(
        items,
        seed,
        counts,
        heldout_size=heldout_size,
        max_per_caption=max_per_caption,
        train_only=rendered,
    )
    selected = sorted(splits.train + splits.heldout + splits.classify, key=lambda it: it.index)

    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.tar.gz"):
        old.unlink()  # a rebuild with fewer shards must not leave stale ones for the glob
    for i, chunk in enumerate(_chunks(splits.train, train_shards)):
        write_shard(output / f"train-{i:05d}.tar.gz", chunk, images, splits.captions)
    write_shard(output / "heldout-00000.tar.gz", splits.heldout, images, splits.captions)
    write_shard(
        output / "classify-00000.tar.gz", splits.classify, images, splits.captions, splits.labels
    )
    (output / "classnames.txt").write_text("\n".join(splits.classnames) + "\n", encoding="utf-8")

    split_of = {
        it.key: name for name in ("train", "heldout", "classify") for it in getattr(splits, name)
    }
    rows = ["key\tsplit\tlabel\tsource\tauthor"]
    for item in selected:
        label = splits.labels.get(item.key, "")
        author = item.author.replace("\t", " ")
        rows.append(f"{item.key}\t{split_of[item.key]}\t{label}\t{item.source}\t{author}")
    (output / "sources.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    class_counts = collections.Counter(
        splits.classnames[splits.labels[it.key]] for it in splits.classify
    )
    provenance = output / "PROVENANCE.md"
    # Total size including PROVENANCE.md itself: write once to measure, then rewrite.
    for _ in range(2):
        total = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
        write_provenance(
            provenance,
            command=command,
            seed=seed,
            size=size,
            quality=quality,
            max_per_caption=max_per_caption,
            versions=package_versions(),
            splits=splits,
            shard_counts={"train": train_shards, "heldout": 1, "classify": 1},
            counts=counts,
            class_counts=class_counts,
            total_bytes=total,
        )
    return {
        "train": len(splits.train),
        "heldout": len(splits.heldout),
        "classify": len(splits.classify),
        "bytes": total,
        "seconds": round(time.time() - start),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/build_demo.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="output folder (default: the package's data/demo)",
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--train-shards", type=int, default=8, help="number of train shards")
    parser.add_argument("--heldout-size", type=int, default=800, help="held-out pairs")
    parser.add_argument(
        "--max-per-caption", type=int, default=8, help="images kept per (normalised) caption"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="image encoding processes"
    )
    args = parser.parse_args(argv)
    if args.size < 8 or not 1 <= args.quality <= 100 or args.train_shards < 1:
        parser.error("need --size >= 8, 1 <= --quality <= 100 and --train-shards >= 1")
    if args.max_per_caption < 1:
        parser.error("need --max-per-caption >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    command = "python tools/build_demo.py " + " ".join(sys.argv[1:] if argv is None else list(argv))
    try:
        result = build(
            args.output,
            args.size,
            args.seed,
            args.quality,
            args.train_shards,
            args.heldout_size,
            args.max_per_caption,
            args.workers,
            command.strip(),
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
