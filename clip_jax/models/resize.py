"""Loading weights at another input size: positional embeddings follow the new image grid or
text context.

Low-resolution / short-text training (CLIPA, Li et al. 2023) trains most steps at a small
image size and continues at full size; fine-tuning at a higher resolution goes the other way.
Every parameter of a ViT or ResNet tower is independent of the image size except the learned
positional embedding, and the text tower's only length-dependent parameter is its positional
embedding. So a checkpoint loads at another size by

- resizing the image positional grid bicubically (antialiased), the class token's embedding
  kept as it is: open_clip's `resize_pos_embed` (ViT: `image/positional_embedding`
  [1 + G*G, W]; ResNet attention pool: `image/attnpool/positional_embedding`, grid = size / 32);
- truncating the text positional embedding [L, W] to a shorter context (the first rows: a
  causal text tower's early positions do not depend on later ones). A longer context than the
  weights have is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.config import CLIPConfig

log = logging.getLogger(__name__)


def resize_pos_embed(pos_embed: Any, grid: int | tuple[int, int], extra_tokens: int = 1) -> Any:
    """Resizes a [extra + G*G, W] positional embedding to [extra + h*w, W] for `grid` (h, w).

    The first `extra_tokens` rows (the class token) are kept; the square G x G grid behind them
    is resized with antialiased bicubic interpolation, exactly what open_clip's
    `resize_pos_embed` computes with torch's `F.interpolate(mode="bicubic", antialias=True,
    align_corners=False)` (Keys a = -0.5, support scaled when downsampling; parity within
    ~3e-6 in tests/test_resize.py). Computed in float32; returns the input's dtype (numpy in,
    numpy out).
    """
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    pos_embed_np = isinstance(pos_embed, np.ndarray)
    tokens, width = pos_embed.shape
    old = math.isqrt(tokens - extra_tokens)
    if old * old != tokens - extra_tokens:
        raise ValueError(
            f"positional embedding with {tokens} rows is not {extra_tokens} extra token(s) plus a "
            f"square grid"
        )
    if (old, old) == grid:
        return pos_embed
    head = pos_embed[:extra_tokens]
    image = jnp.asarray(pos_embed[extra_tokens:], jnp.float32).reshape(old, old, width)
    image = jax.image.resize(image, (*grid, width), method="bicubic", antialias=True)
    image = image.reshape(grid[0] * grid[1], width).astype(pos_embed.dtype)
    if pos_embed_np:
        return np.concatenate([head, np.asarray(image)], axis=0)
    return jnp.concatenate([head, image], axis=0)


def truncate_text_pos_embed(pos_embed: Any, context_length: int) -> Any:
    """The first `context_length` rows of a text positional embedding [L, W]; refuses L less
    than `context_length` (there is nothing to learn the extra positions from)."""
    if pos_embed.shape[0] < context_length:
        raise ValueError(
            f"context_length {context_length} is longer than the weights' {pos_embed.shape[0]} "
            f"text positions (a context can only be shortened)"
        )
    return pos_embed[:context_length]


def with_input_sizes(
    config: CLIPConfig, image_size: int | None = None, context_length: int | None = None
) -> CLIPConfig:
    """`config` with another image size and/or text context (None keeps the config's own);
    raises ValueError for a size the image tower cannot take (e.g. not a multiple of the patch
    size) or one that is not a positive int."""
    for name, value in (("image_size", image_size), ("context_length", context_length)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    vision, text = config.vision, config.text
    if image_size is not None and image_size != vision.image_size:
        vision = dataclasses.replace(vision, image_size=image_size)
    if context_length is not None and context_length != text.context_length:
        text = dataclasses.replace(text, context_length=context_length)
    return dataclasses.replace(config, vision=vision, text=text)


def _image_grid(config: CLIPConfig) -> int:
    vision = config.vision
    if vision.type == "vit":
        return vision.image_size // vision.patch_size
    return vision.image_size // 32  # ModifiedResNet: stride 32 before the attention pool


def adapt_variables(variables: dict, config: CLIPConfig) -> dict:
    """Model variables {"params": ..., ...} adapted to `config`'s image size and context
    length: the image positional grid resized, the text positional embedding truncated (see the
    module docstring). Other leaves are shared, not copied; variables that already fit are
    returned as they are. Raises ValueError when they cannot be adapted."""
    params = dict(variables["params"])
    image = dict(params["image"])
    owner, key = (image, "positional_embedding")
    if config.vision.type != "vit":
        owner = dict(image["attnpool"])
    pos = owner[key]
    grid = _image_grid(config)
    if pos.shape[0] != grid * grid + 1:
        log.info(
            "resizing the image positional embedding from %d to %d tokens (grid %d x %d)",
            pos.shape[0],
            grid * grid + 1,
            grid,
            grid,
        )
        owner[key] = resize_pos_embed(pos, grid)
        if config.vision.type != "vit":
            image["attnpool"] = owner
        params["image"] = image
    text_pos = params["text"]["positional_embedding"]
    if text_pos.shape[0] != config.context_length:
        log.info(
            "truncating the text positional embedding from %d to %d positions",
            text_pos.shape[0],
            config.context_length,
        )
        params["text"] = dict(
            params["text"],
            positional_embedding=truncate_text_pos_embed(text_pos, config.context_length),
        )
    return dict(variables, params=params)
