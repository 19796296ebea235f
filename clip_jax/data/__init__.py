"""clip_jax input pipeline: tf.data readers, transforms, exact resume, device prefetch.

Importing this package is cheap: the public names below are loaded on first use (TensorFlow
and JAX are heavy imports), e.g. `clip_jax.data.build_train_dataset` imports the pipeline.
"""

import importlib

_LAZY = {
    "build_train_dataset": "clip_jax.data.pipeline",
    "build_eval_dataset": "clip_jax.data.pipeline",
    "image_folder_classnames": "clip_jax.data.pipeline",
    "InputWatch": "clip_jax.data.pipeline",
    "NoUsableData": "clip_jax.data.pipeline",
    "get_default_config": "clip_jax.data.config",
    "validate": "clip_jax.data.config",
    "SourceSpec": "clip_jax.data.config",
    "num_skipped": "clip_jax.data.ordering",
    "make_global_batch": "clip_jax.data.device",
    "prefetch_to_device": "clip_jax.data.device",
    "demo_shards": "clip_jax.data.shards",
    "demo_classnames": "clip_jax.data.shards",
    "read_classnames": "clip_jax.data.shards",
    "OPENAI_MEAN": "clip_jax.data.transforms",
    "OPENAI_STD": "clip_jax.data.transforms",
    "normalize_images": "clip_jax.data.transforms",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clip_jax.data' has no attribute {name!r}")
