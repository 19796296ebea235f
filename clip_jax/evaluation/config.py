"""Evaluation config: which evaluators run, on which data, with which options.

The training config embeds `get_default_config()` as `config.eval`; `python -m
clip_jax.evaluate` and the trainer (every `eval_every` steps) run every evaluator listed in
`eval.evaluators`. Override on the command line, e.g.
`--config.eval.evaluators.zeroshot.templates=imagenet80` or
`--config.eval.evaluators.retrieval.data.split=heldout`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from clip_jax.data import config as data_config_lib

EVALUATOR_TYPES = ("zeroshot", "retrieval", "linear_probe")


def data_block(**overrides: Any) -> ml_collections.ConfigDict:
    """An evaluator's data source: every per-source key of `clip_jax.data` (see
    `clip_jax.data.config.get_default_config` for their meaning) with its default."""
    defaults = data_config_lib.get_default_config()
    block = ml_collections.ConfigDict({k: defaults[k] for k in data_config_lib.SOURCE_KEYS})
    block.update(overrides)
    return block


def zeroshot_block(**data: Any) -> ml_collections.ConfigDict:
    """A zero-shot classification evaluator on the labelled source `data`."""
    c = ml_collections.ConfigDict()
    c.type = "zeroshot"
    # Labelled images: demo "classify", a tar/tfrecord set with `.cls` labels, a TFDS dataset
    # with `label_key`, or an image folder (one subfolder per class).
    c.data = data_block(**data)
    # Class names (index = label): "" finds them from the source (demo classnames.txt, image
    # folder names, classnames.txt beside tar/tfrecord shards, TFDS label names); or a path to
    # a classnames.txt, or a tuple of names.
    c.classnames = ""
    # Prompt templates: a set name (imagenet80 = OpenAI's 80 ImageNet prompts, openai7, generic,
    # short, photo, name; clip_jax/evaluation/templates.py) or a tuple of strings each holding
    # one "{}".
    c.templates = "generic"
    # Source labels the class names stand for when they are a subset of the source's labels
    # (ImageNet-A/-R: 200 of the 1,000 ImageNet labels); () means labels 0..C-1. See
    # `clip_jax.evaluation.benchmark(name).zeroshot_block(tfds_data_dir)` for ready-made blocks.
    c.class_indices = ()
    return c


def retrieval_block(**data: Any) -> ml_collections.ConfigDict:
    """An image-text retrieval evaluator on the captioned source `data`."""
    c = ml_collections.ConfigDict()
    c.type = "retrieval"
    # Image-caption pairs; samples sharing a key are several captions of one image.
    c.data = data_block(**data)
    # Recall@k cut-offs (both directions).
    c.ks = (1, 5, 10)
    return c


def linear_probe_block(**data: Any) -> ml_collections.ConfigDict:
    """A linear-probe evaluator (logistic regression on frozen image embeddings)."""
    c = ml_collections.ConfigDict()
    c.type = "linear_probe"
    # Labelled training images (and test images, unless test_data is set).
    c.data = data_block(**data)
    # Separate test source; source "" means: split `data` by key hash with test_fraction.
    c.test_data = data_block(source="")
    # Fraction of `data` held out as the test set when test_data.source is "".
    c.test_fraction = 0.3
    # Fraction of the training features held out to choose the L2 strength.
    c.val_fraction = 0.2
    # k training images per class (few-shot probe); 0 uses all of them.
    c.few_shot = 0
    # L2 strengths swept on the validation split (penalty l2/2*||W||^2 on the mean loss).
    c.l2_grid = tuple(10.0**e for e in range(-6, 3))
    # Gradient iterations of the full-batch solver per fit.
    c.max_iters = 1000
    # Seed of the key-hash splits (test, validation, few-shot choice).
    c.seed = 0
    return c


def get_default_config() -> ml_collections.ConfigDict:
    """Every evaluation key with its default: demo zero-shot, retrieval and linear probe."""
    c = ml_collections.ConfigDict()
    # Images/texts per embedding call (global, over all devices); rounded up to a multiple of
    # the data-parallel device count. The last batch is padded, so one shape compiles.
    c.batch_size = 256
    # Eval resize (shorter side to the model's image size, then center crop); tf.image method.
    c.resize_method = "bicubic"
    # Named evaluators; results are logged as "<name>/<metric>", e.g. "zeroshot/top1".
    # Add more (e.g. c.evaluators.imagenet = zeroshot_block(source="tfds", ...)) or delete any.
    c.evaluators = ml_collections.ConfigDict()
    # Zero-shot on the demo's labelled clip art (18 classes, 428 images).
    c.evaluators.zeroshot = zeroshot_block(source="demo", split="classify")
    # Retrieval on the demo's held-out image-caption pairs (800 images, one caption each).
    c.evaluators.retrieval = retrieval_block(source="demo", split="heldout")
    # Linear probe on the demo "classify" split, 30% of it (by key hash) as the test set.
    c.evaluators.linear_probe = linear_probe_block(source="demo", split="classify")
    return c


def validate(config) -> None:
    """Raises ValueError naming the bad key of an eval config."""
    if int(config.batch_size) <= 0:
        raise ValueError(f"eval.batch_size={config.batch_size!r} must be positive")
    from clip_jax.data.transforms import RESIZE_METHODS

    if config.resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"eval.resize_method={config.resize_method!r}; choose one of {RESIZE_METHODS}"
        )
    for name, block in config.evaluators.items():
        kind = block.get("type") if hasattr(block, "get") else None
        if kind not in EVALUATOR_TYPES:
            raise ValueError(
                f"eval.evaluators.{name}.type={kind!r}; choose one of {EVALUATOR_TYPES}"
            )
        if "data" not in block:
            raise ValueError(f"eval.evaluators.{name} has no data block")
        # Bad sources and templates fail here, at startup, not at the first evaluation.
        from clip_jax.evaluation.data import source_spec

        spec = source_spec(block.data, f"eval.evaluators.{name}.data")
        if kind == "retrieval" and spec.source == "image_folder":
            raise ValueError(
                f"eval.evaluators.{name}: retrieval needs captions; source 'image_folder' has none"
            )
        if kind == "zeroshot":
            from clip_jax.evaluation.templates import get_templates

            try:
                get_templates(block.get("templates", "generic"))
            except ValueError as e:
                raise ValueError(f"eval.evaluators.{name}.templates: {e}") from None
        if kind == "linear_probe" and block.get("test_data") and block.test_data.get("source"):
            source_spec(block.test_data, f"eval.evaluators.{name}.test_data")
