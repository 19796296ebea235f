"""Data configuration: defaults for every data key, validation, per-source specs.

The training config embeds `get_default_config()` as `config.data`. A mixture is given as
`sources`, a tuple of dicts holding any of the per-source keys (`SOURCE_KEYS`) plus `weight`;
keys a mixture entry leaves out are taken from the top level.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from clip_jax.data import text_shorten
from clip_jax.data.transforms import RESIZE_METHODS

SOURCES = ("demo", "tfds", "tar", "tfrecord", "image_folder", "synthetic")
# Keys that describe one source; a `sources` entry may set any of them (plus "weight").
SOURCE_KEYS = (
    "source",
    "split",
    "shards",
    "tfds_name",
    "tfds_data_dir",
    "image_key",
    "text_key",
    "label_key",
    "label_template",
    "caption_field",
    "image_folder",
)
DECODE_MODES = ("auto", "window", "full")


def get_default_config() -> ml_collections.ConfigDict:
    """Every data key with its default (see the comment on each)."""
    c = ml_collections.ConfigDict()
    # Where samples come from: "demo" (the small dataset shipped in the package), "tfds",
    # "tar" (WebDataset/img2dataset shards), "tfrecord" (tf.train.Example shards) or
    # "image_folder" (eval only: <dir>/<class>/<image>) or "synthetic" (random in-memory
    # samples for benchmarks and tests; the global batch is independent of the process count).
    c.source = "demo"
    # Split: for "demo" one of train/heldout/classify; for "tfds" a TFDS split string with
    # optional slicing ("train", "train[:90%]"). Ignored by tar/tfrecord.
    c.split = "train"
    # tar/tfrecord shard patterns: brace ranges ("data/{00000..00099}.tar"), globs
    # ("data/*.tfrecord"), several separated by whitespace or ';'. Plain or .gz tar both work.
    c.shards = ""
    # Mixture: tuple of dicts, each with any SOURCE_KEYS and a "weight" (relative sampling
    # probability), e.g. ({"source": "tar", "shards": "a/*.tar", "weight": 3},
    # {"source": "tfds", "tfds_name": "coco_captions", "weight": 1}). Empty: the single
    # top-level source is used. Missing per-source keys come from the top level.
    c.sources = ()
    # TFDS dataset name (e.g. "coco_captions"); empty with tfds_data_dir pointing at a prepared
    # dataset version folder reads it via tfds.builder_from_directory. Never downloads.
    c.tfds_name = ""
    # TFDS data_dir holding the prepared dataset (required for source "tfds").
    c.tfds_data_dir = ""
    # TFDS feature keys ('/' for nested features): encoded image, caption text, class label.
    c.image_key = "image"
    c.text_key = "caption"
    c.label_key = ""
    # Caption template for image-label TFDS datasets without text (text_key empty).
    c.label_template = "a photo of a {}."
    # JSON field holding the caption when a tar sample has `{key}.json` but no `{key}.txt`.
    c.caption_field = "caption"
    # Root folder for source "image_folder" (one subfolder per class, sorted names = labels).
    c.image_folder = ""
    # Record-level shuffle: records are shuffled in consecutive blocks of this many raw records
    # (fixed seed, a new permutation per block so every epoch differs). Memory: this many
    # encoded samples (x2 while the next block fills). 0 or 1 disables record shuffling.
    c.shuffle_buffer = 10_000
    # Number of distinct samples the "synthetic" source cycles through.
    c.synthetic_pool_size = 1024
    # Draw shards with replacement (endless, no epoch boundaries) instead of shuffled epochs.
    c.resample = False
    # Number of shards read concurrently (records are interleaved one by one across them).
    c.shard_cycle_length = 16
    # Train augmentation: random resized crop area fraction and aspect-ratio (w/h) ranges.
    c.aug_scale = (0.9, 1.0)
    c.aug_ratio = (3 / 4, 4 / 3)
    # Train augmentation: probability of a horizontal flip (0: never; CLIP trains without;
    # captions naming left or right are not changed).
    c.aug_flip = 0.0
    # tf.image.resize method for train and eval transforms (antialiased). "bicubic" matches
    # OpenAI CLIP preprocessing; "bilinear" is ~1.3x faster on CPU.
    c.resize_method = "bicubic"
    # Image decoding: "window" decodes only the pixels the crop uses (libjpeg crop + DCT-domain
    # downscaling when the source is >= 2x the target: 1.5x faster from 1024x768 JPEGs, but
    # its control flow costs ~15% on sources < 2x the target), "full" decodes whole images,
    # "auto" picks by the shorter side of a few images of the first shard (window if >= 2x).
    c.decode = "auto"
    # Parallel decode/augment calls; -1 = tf.data.AUTOTUNE (output order stays deterministic).
    c.num_parallel_calls = -1
    # Host-side batches prefetched by tf.data (-1 = AUTOTUNE).
    c.prefetch = 2
    # Batches kept ahead on the accelerators by `device.prefetch_to_device`.
    c.device_prefetch = 2
    # Tokenizer: "clip-bpe" (OpenAI BPE) or a path to a SentencePiece ".model" file.
    c.tokenizer = "clip-bpe"
    # Short-text training (CLIPA): training captions get this many tokens (0: the model's
    # context; evaluation always uses the model's). Longer captions are cut as text_shorten
    # says, keeping start/end tokens: "truncate" (the first tokens), "random_subset" (random
    # tokens in order) or "random_block" (a random run of consecutive tokens).
    c.context_length = 0
    c.text_shorten = "truncate"
    # Caption augmentation: each sentence of a training caption is dropped with this
    # probability, at least one kept ("Cardinal. A red bird. bird, animal." may train as
    # "A red bird."), before tokenisation; see `text_shorten.drop_sentences`. 0: off; 1: one
    # sentence drawn at random.
    c.sentence_dropout = 0.0
    # tf.data private thread pool size (0 = TF's shared default pool).
    c.threadpool_size = 0
    # No caching options: raw records are cheap to re-read and caching decoded images would
    # break per-epoch augmentation.
    return c


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One resolved input source (see `get_default_config` for the meaning of each field)."""

    source: str = "demo"
    split: str = "train"
    shards: Any = ""
    tfds_name: str = ""
    tfds_data_dir: str = ""
    image_key: str = "image"
    text_key: str = "caption"
    label_key: str = ""
    label_template: str = "a photo of a {}."
    caption_field: str = "caption"
    image_folder: str = ""
    weight: float = 1.0


def _get(mapping, key, default):
    if isinstance(mapping, Mapping):
        return mapping.get(key, default)
    return getattr(mapping, key, default)


def source_specs(config) -> list[SourceSpec]:
    """Resolves a data config (ConfigDict or dict) to its list of sources (one unless mixed)."""
    defaults = SourceSpec()
    top = {k: _get(config, k, getattr(defaults, k)) for k in SOURCE_KEYS}
    entries = list(_get(config, "sources", ()) or ())
    if not entries:
        return [SourceSpec(**top)]
    specs = []
    for i, entry in enumerate(entries):
        entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        unknown = set(entry) - set(SOURCE_KEYS) - {"weight"}
        if unknown:
            raise ValueError(
                f"data.sources[{i}] has unknown key(s) {sorted(unknown)}; allowed: "
                f"{list(SOURCE_KEYS) + ['weight']}"
            )
        specs.append(SourceSpec(**{**top, **entry}))
    return specs


def as_source_spec(spec) -> SourceSpec:
    """Accepts a SourceSpec, a per-source dict, or a full data config (must be a single source)."""
    if isinstance(spec, SourceSpec):
        return spec
    specs = source_specs(spec)
    if len(specs) != 1:
        raise ValueError(f"expected a single source, got a mixture of {len(specs)}")
    return specs[0]


def validate_source(spec: SourceSpec, where: str = "data") -> None:
    """Raises ValueError naming the bad key/value of one source."""
    if spec.source not in SOURCES:
        raise ValueError(f"{where}.source={spec.source!r} unknown; choose one of {SOURCES}")
    if spec.source == "demo":
        from clip_jax.data.shards import DEMO_SPLITS

        if spec.split not in DEMO_SPLITS:
            raise ValueError(
                f"{where}.split={spec.split!r} is not a demo split ({sorted(DEMO_SPLITS)})"
            )
    if spec.source in ("tar", "tfrecord") and not spec.shards:
        raise ValueError(f"{where}.shards is empty; source {spec.source!r} needs shard patterns")
    if spec.source == "tfds":
        if not spec.tfds_data_dir:
            raise ValueError(
                f"{where}.tfds_data_dir is empty; source 'tfds' needs the folder "
                "holding the prepared dataset (no downloads)"
            )
        if not spec.image_key:
            raise ValueError(f"{where}.image_key is empty")
        if not spec.text_key and not spec.label_key:
            raise ValueError(f"{where}.text_key and {where}.label_key are both empty")
        if not spec.text_key and "{}" not in spec.label_template:
            raise ValueError(f"{where}.label_template={spec.label_template!r} needs a '{{}}'")
    if spec.source == "image_folder" and not spec.image_folder:
        raise ValueError(f"{where}.image_folder is empty; source 'image_folder' needs a folder")
    if not spec.weight > 0:
        raise ValueError(f"{where}.weight={spec.weight!r} must be > 0")


def _check_range(name, value, lo, hi):
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.{name}={value!r} must be a pair of numbers") from err
    if not (lo < a <= b <= hi):
        raise ValueError(f"data.{name}={tuple(value)!r} must satisfy {lo} < min <= max <= {hi}")


def validate(config) -> None:
    """Checks a data config; raises ValueError naming the bad key and value."""
    specs = source_specs(config)
    mixed = bool(_get(config, "sources", ()))
    for i, spec in enumerate(specs):
        validate_source(spec, f"data.sources[{i}]" if mixed else "data")
    if len(specs) > 1 and any(s.source == "synthetic" for s in specs):
        raise ValueError("data.sources: 'synthetic' cannot be mixed with other sources")
    if int(_get(config, "synthetic_pool_size", 1)) < 1:
        raise ValueError(f"data.synthetic_pool_size={config.synthetic_pool_size!r} must be >= 1")
    if len(specs) > 1 and any(s.source == "image_folder" for s in specs):
        raise ValueError("data.sources: 'image_folder' is an eval-only source and cannot be mixed")
    _check_range("aug_scale", config.aug_scale, 0.0, 1.0)
    _check_range("aug_ratio", config.aug_ratio, 0.0, float("inf"))
    for key in ("aug_flip", "sentence_dropout"):
        value = _get(config, key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"data.{key}={value!r} must be a probability in [0, 1]")
    if _get(config, "decode", "auto") not in DECODE_MODES:
        raise ValueError(f"data.decode={config.decode!r}; choose one of {DECODE_MODES}")
    if config.resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"data.resize_method={config.resize_method!r}; choose one of {RESIZE_METHODS}"
        )
    for key in ("shuffle_buffer", "threadpool_size", "device_prefetch"):
        if int(config[key]) < 0:
            raise ValueError(f"data.{key}={config[key]!r} must be >= 0")
    if int(config.shard_cycle_length) < 1:
        raise ValueError(f"data.shard_cycle_length={config.shard_cycle_length!r} must be >= 1")
    for key in ("num_parallel_calls", "prefetch"):
        if int(config[key]) < -1 or (key == "num_parallel_calls" and int(config[key]) == 0):
            raise ValueError(f"data.{key}={config[key]!r} must be -1 (AUTOTUNE) or positive")
    text_shorten.check(
        str(_get(config, "text_shorten", "truncate")), _get(config, "context_length", 0)
    )
    tok = config.tokenizer
    if not isinstance(tok, str):
        raise ValueError(
            f"data.tokenizer={tok!r} must be a tokenizer name or a SentencePiece '.model' path"
        )
    from clip_jax import tokenizers  # the one owner of which names exist

    try:
        tokenizers.check_name(tok)
    except ValueError as err:
        raise ValueError(f"data.tokenizer={tok!r}: {err}") from None
