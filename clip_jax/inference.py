"""Inference API: `clip_jax.load(path)` -> a model that embeds images and texts.

    import clip_jax
    model = clip_jax.load("runs/tiny")              # a training workdir (latest checkpoint)
    model = clip_jax.load("runs/tiny@1200")         # or one of its checkpoints
    model = clip_jax.load("converted/ViT-B-32")     # or a `python -m clip_jax.convert` output
    model = clip_jax.load("pretrained:ViT-B-32/openai")   # or Hub weights (clip_jax.hub)
    img = model.encode_image(images)    # uint8 [N, H, W, 3] -> float32 [N, D], unit L2 norm
    txt = model.encode_text(["a photo of a dog"])    # [N] strings -> float32 [N, D], unit norm
    probs = model.classify(images, ["dog", "cat"], templates="imagenet80")   # float32 [N, C]

Images of any size are resized like the evaluation pipeline: shorter side to the model's image
size (bicubic, antialiased, `tf.image.resize`), then center-cropped to a square; images already
at the model's size are used as they are. Outputs are NumPy and L2-normalised, so
`img @ txt.T` are cosine similarities. Inputs are cut into batches of `batch_size` (the last
one zero-padded), so one program compiles per tower whatever N is.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from clip_jax import models, tokenizers
from clip_jax.losses import MAX_LOGIT_SCALE
from clip_jax.model_store import LoadedModel


class CLIPInference:
    """A loaded CLIP model with NumPy in, NumPy out methods (see the module docstring).

    Attributes: `config` (CLIPConfig), `model` (flax CLIP), `variables`, `tokenizer`,
    `image_size`, `context_length`, `embed_dim`, `step` (None for converted weights),
    `logit_scale` (the temperature as a multiplier, exp of the learned log, at most 100).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        mesh=None,
        batch_size: int = 64,
        dtype: str | None = None,
        resize_method: str = "bicubic",
    ):
        from clip_jax import sharding as sharding_lib
        from clip_jax.embedder import Embedder

        self.config = loaded.config
        self.step = loaded.step
        self.dtype = dtype or loaded.dtype
        self.model = models.create_model(self.config, dtype=self.dtype)
        self.mesh = mesh or sharding_lib.create_mesh()
        self.tokenizer = tokenizers.get(loaded.tokenizer)
        self.resize_method = resize_method
        self._embedder = Embedder(self.model, loaded.variables, self.mesh, batch_size)
        self.variables = self._embedder.variables
        self.image_size = self.config.image_size
        self.context_length = self.config.context_length
        self.embed_dim = self.config.embed_dim
        log_scale = float(np.asarray(self.variables["params"]["logit_scale"]))
        self.logit_scale = float(min(np.exp(log_scale), MAX_LOGIT_SCALE))

    def preprocess(self, images: np.ndarray | Sequence[Any]) -> np.ndarray:
        """uint8 [N, H, W, 3] array, or a list of uint8 [H, W, 3] arrays / PIL images of any
        sizes -> uint8 [N, S, S, 3] at the model's size S (shorter side resized, center crop).
        """
        return preprocess_images(images, self.image_size, self.resize_method)

    def encode_image(self, images: np.ndarray | Sequence[Any]) -> np.ndarray:
        """Images (see `preprocess`) -> float32 [N, D], unit L2 norm."""
        return self._embedder.embed_images(self.preprocess(images))

    def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """A string or [N] strings -> float32 [N, D], unit L2 norm (tokenised with the
        checkpoint's tokenizer, cut to the model's context length)."""
        if isinstance(texts, (str, bytes)):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text got no texts")
        return self._embedder.embed_texts(texts, self.tokenizer)

    def classifier(
        self, classnames: Sequence[str], templates: str | Sequence[str] = "photo"
    ) -> np.ndarray:
        """float32 [C, D] zero-shot class embeddings (prompt ensemble over `templates`: a set
        name of `clip_jax.evaluation.templates` or a list of strings with one '{}')."""
        from clip_jax.evaluation.templates import get_templates
        from clip_jax.evaluation.zeroshot import class_embeddings

        return class_embeddings(self.encode_text, list(classnames), get_templates(templates))

    def classify(
        self,
        images: np.ndarray | Sequence[Any],
        classnames: Sequence[str],
        templates: str | Sequence[str] = "photo",
    ) -> np.ndarray:
        """float32 [N, C] class probabilities: softmax over `logit_scale` * cosine similarity of
        each image with each class embedding (see `classifier`)."""
        logits = self.logit_scale * (
            self.encode_image(images) @ self.classifier(classnames, templates).T
        )
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _as_uint8_image(image: Any, index: int) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(
            f"image {index} has dtype {image.dtype}; expected uint8 pixels in "
            f"0..255 (e.g. np.asarray(pil_image) or (x * 255).round().astype("
            f"np.uint8))"
        )
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {index} has shape {image.shape}; expected [H, W, 3] RGB")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image {index} is empty: shape {image.shape}")
    return image


def preprocess_images(
    images: np.ndarray | Sequence[Any], size: int, resize_method: str = "bicubic"
) -> np.ndarray:
    """See `CLIPInference.preprocess`. Raises TypeError/ValueError naming the bad input."""
    if hasattr(images, "convert"):  # a single PIL image
        raise ValueError("got a single PIL image; pass a list of images")
    if not isinstance(images, (list, tuple)):
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise TypeError(
                f"images have dtype {array.dtype}; expected uint8 [N, H, W, 3] "
                f"pixels in 0..255 (e.g. (x * 255).round().astype(np.uint8))"
            )
        if array.ndim == 3 and array.shape[-1] == 3:
            raise ValueError(
                f"images have shape {array.shape}; expected a batch [N, H, W, 3] "
                f"(use images[None] for a single image)"
            )
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"images have shape {array.shape}; expected uint8 [N, H, W, 3] RGB")
        if array.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if array.shape[1:3] == (size, size):
            return array
        images = list(array)
    images = [_as_uint8_image(im, i) for i, im in enumerate(images)]
    if not images:
        raise ValueError("images is an empty list")
    from clip_jax.data.transforms import resize_center_crop

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        if image.shape[:2] == (size, size):
            out[i] = image
        else:
            out[i] = resize_center_crop(image, size, method=resize_method).numpy()
    return out


def load(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    batch_size: int = 64,
    dtype: str | None = None,
    mesh=None,
    resize_method: str = "bicubic",
) -> CLIPInference:
    """Loads a model for inference from a training workdir or a converted-weights directory.

    Args:
      path: `--workdir` of `python -m clip_jax.train` (restores checkpoint `step` or
        `path@STEP`, default the latest, onto the devices present now, whatever device count
        wrote it; see `clip_jax.model_store`), an output
        directory of `python -m clip_jax.convert`, or pretrained weights from the Hugging Face
        Hub: `hf-hub:ORG/NAME[@REVISION]` or `pretrained:ARCH/TAG` (e.g.
        `pretrained:ViT-B-32/openai`; downloaded into the Hugging Face cache on first use).
      batch_size: rows per device call (rounded up to a multiple of the devices).
      dtype: compute dtype; default the training run's (float32 for converted weights).
      mesh: device mesh; default all devices, data parallel.
    Raises `clip_jax.checkpoint.CheckpointError` naming the problem for a bad path or
    checkpoint.
    """
    from clip_jax import model_store
    from clip_jax import sharding as sharding_lib

    mesh = mesh or sharding_lib.create_mesh()
    loaded = model_store.load_model(path, step, sharding_lib.replicated(mesh))
    return CLIPInference(
        loaded, mesh=mesh, batch_size=batch_size, dtype=dtype, resize_method=resize_method
    )
