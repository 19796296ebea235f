"""Evaluation data: a configured source -> padded numpy batches, and its class names."""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from clip_jax.data import config as data_config_lib


def source_spec(data: Any, where: str) -> data_config_lib.SourceSpec:
    """An evaluator's `data` block (ConfigDict/dict with `clip_jax.data` source keys) -> spec.

    Raises ValueError naming `where` (e.g. "eval.evaluators.zeroshot.data") on a bad source.
    """
    if hasattr(data, "to_dict"):
        data = data.to_dict()
    data = dict(data)
    unknown = set(data) - set(data_config_lib.SOURCE_KEYS)
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {sorted(unknown)}; allowed: "
            f"{list(data_config_lib.SOURCE_KEYS)}"
        )
    spec = data_config_lib.SourceSpec(**data)
    data_config_lib.validate_source(spec, where)
    return spec


def eval_batches(
    spec: data_config_lib.SourceSpec,
    *,
    image_size: int,
    tokenizer,
    context_length: int,
    batch_size: int,
    resize_method: str,
    with_text: bool = True,
) -> Iterator[dict]:
    """Numpy batches of `clip_jax.data.build_eval_dataset` (every sample once, padded, `mask`).

    Every process reads the whole set (the embedder places each process's rows), so the
    pipeline is built with process_count=1.
    """
    from clip_jax.data import pipeline  # TensorFlow: imported only when data is read

    ds = pipeline.build_eval_dataset(
        spec,
        image_size=image_size,
        tokenizer=tokenizer if with_text else None,
        context_length=context_length,
        batch_size=batch_size,
        resize_method=resize_method,
    )
    return ds.as_numpy_iterator()


def classnames_for(
    spec: data_config_lib.SourceSpec, override: str | Sequence[str] | None = None
) -> list[str]:
    """Class names (index = label) of a classification source.

    `override`: a path to a classnames.txt or a sequence of names. Otherwise by source: the
    demo's `classnames.txt`; an image folder's sorted subfolder names; for tar/tfrecord shards
    the `classnames.txt` beside the first shard; for TFDS the label feature's names.
    """
    from clip_jax.data import shards as shards_lib

    if override:
        if isinstance(override, str):
            return _nonempty(shards_lib.read_classnames(override), override)
        return [str(n) for n in override]
    if spec.source == "demo":
        return shards_lib.demo_classnames()
    if spec.source == "image_folder":
        from clip_jax.data.sources import list_image_folder

        return list_image_folder(spec.image_folder)[2]
    if spec.source in ("tar", "tfrecord"):
        first = shards_lib.resolve_files(spec.shards, what=f"{spec.source} shards")[0]
        path = os.path.join(os.path.dirname(first), "classnames.txt")
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            raise ValueError(
                f"no class names for {spec.source} shards {spec.shards!r}: "
                f"{path} does not exist; set the evaluator's `classnames`"
            )
        return _nonempty(shards_lib.read_classnames(path), path)
    if spec.source == "tfds":
        return _tfds_classnames(spec)
    raise ValueError(f"cannot find class names for source {spec.source!r}; set `classnames`")


def _nonempty(names: list[str], where: str) -> list[str]:
    if not names:
        raise ValueError(f"class names file {where} is empty")
    return names


def _tfds_classnames(spec: data_config_lib.SourceSpec) -> list[str]:
    import tensorflow_datasets as tfds

    if not spec.label_key:
        raise ValueError("zero-shot on a TFDS source needs its label_key (a ClassLabel feature)")
    if spec.tfds_name:
        builder = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir)
    else:
        builder = tfds.builder_from_directory(spec.tfds_data_dir)
    feature = builder.info.features
    for part in spec.label_key.split("/"):
        feature = feature[part]
    names = getattr(feature, "names", None)
    if not names:
        dataset = spec.tfds_name or spec.tfds_data_dir
        raise ValueError(
            f"TFDS feature {spec.label_key!r} of {dataset} has no class names; "
            f"set the evaluator's `classnames`"
        )
    return list(names)
