"""Vision Transformer image tower (OpenAI CLIP layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import patch_dropout as patch_dropout_lib
from clip_jax.models.config import VisionTransformerConfig, check_image_shape
from clip_jax.models.transformer import Dtype, Transformer, layer_norm


class VisionTransformer(nn.Module):
    """Patch-embedding conv, class token, learned positions, ln_pre, Transformer, ln_post on the
    class token, then a linear projection to the shared embedding space.

    Attributes:
      config: the architecture.
      output_dim: size of the shared image-text embedding.
      dtype: compute dtype (parameters stay float32).
    """

    config: VisionTransformerConfig
    output_dim: int
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    remat: str = "none"  # per-block activation rematerialisation (transformer.py)
    scan_layers: bool = False  # nn.scan over the blocks (stacked `resblocks` params)
    # FLIP patch dropout (models/patch_dropout.py): fraction of patch tokens dropped per sample
    # when train=True. A training option, not part of the architecture.
    patch_dropout: float = 0.0

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, patch_noise: jax.Array | None = None
    ) -> jax.Array:
        """[B, H, W, 3] float (normalised) -> [B, output_dim] in `dtype` (not normalised).

        With train=True and patch_dropout > 0 only `num_kept` random patch tokens (plus the class
        token) enter the Transformer; which ones is decided by `patch_noise` [B, N] float32
        (N = grid patches; each sample keeps its lowest-noise patches), or, when that is None,
        by noise drawn from the "dropout" RNG stream. train=False always sees every token.
        """
        cfg = self.config
        check_image_shape(images, cfg.image_size)
        width = cfg.width
        x = nn.Conv(
            width,
            (cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="conv1",
        )(images.astype(self.dtype))
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, width)
        scale = width**-0.5
        class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (width,))
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1)
        positional = self.param(
            "positional_embedding", nn.initializers.normal(scale), (grid_h * grid_w + 1, width)
        )
        x = x + positional.astype(self.dtype)
        if train and self.patch_dropout > 0:
            if patch_noise is None:
                patch_noise = patch_dropout_lib.sample_noise(
                    self.make_rng("dropout"), batch, grid_h * grid_w
                )
            x = patch_dropout_lib.keep_patches(x, patch_noise, self.patch_dropout)
        x = layer_norm("ln_pre", self.dtype)(x)
        x = Transformer(
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.activation,
            causal=False,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            name="transformer",
        )(x)
        pooled = layer_norm("ln_post", self.dtype)(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (width, self.output_dim))
        return pooled @ proj.astype(self.dtype)
