"""The two-tower CLIP model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import CLIPConfig
from clip_jax.models.patch_dropout import check_rate
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.transformer import Dtype
from clip_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Normalise the last axis to unit L2 norm, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class CLIP(nn.Module):
    """Image tower `image`, text tower `text` and the learned temperature `logit_scale`.

    Parameters are float32; `dtype` is the compute dtype (e.g. jnp.bfloat16). Top-level parameter
    names are `image/...`, `text/...`, `logit_scale` (and `logit_bias` when configured), so regexes
    such as `image/.*` select a tower (e.g. to freeze it for LiT).
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    # Training-time memory/compile options, not part of the architecture (see
    # models/transformer.py): per-block rematerialisation and nn.scan over Transformer blocks.
    remat: str = "none"
    scan_layers: bool = False
    # FLIP patch dropout for ViT towers (models/patch_dropout.py): fraction of image patch
    # tokens dropped per sample in train mode; 0 = off. Also a training option.
    patch_dropout: float = 0.0

    def setup(self):
        cfg = self.config
        tower_kwargs = {}
        if self.patch_dropout:
            if cfg.vision.type != "vit":
                raise ValueError(
                    f"patch_dropout={self.patch_dropout} needs a ViT image tower, "
                    f"not {cfg.vision.type!r}"
                )
            tower_kwargs["patch_dropout"] = check_rate(self.patch_dropout)
        tower = {"vit": VisionTransformer, "resnet": ModifiedResNet}[cfg.vision.type]
        self.image = tower(
            cfg.vision,
            cfg.embed_dim,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            **tower_kwargs,
        )
        self.text = TextTransformer(
            cfg.text,
            cfg.embed_dim,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.init_logit_scale), ()
        )
        if cfg.init_logit_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(cfg.init_logit_bias), ()
            )

    def encode_image(
        self, images: jax.Array, train: bool = False, patch_noise: jax.Array | None = None
    ) -> jax.Array:
        """[B, H, W, 3] normalised float -> [B, D] float32, unnormalised (as OpenAI).

        `patch_noise` [B, N] float32 picks the kept patches under patch dropout (train=True
        only; see VisionTransformer); None draws them from the "dropout" RNG stream."""
        kwargs = {} if patch_noise is None else {"patch_noise": patch_noise}
        return self.image(images, train=train, **kwargs).astype(jnp.float32)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int32 -> [B, D] float32, unnormalised (as OpenAI)."""
        return self.text(tokens).astype(jnp.float32)

    def __call__(
        self,
        images: jax.Array,
        tokens: jax.Array,
        train: bool = False,
        patch_noise: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Both towers: returns L2-normalised `image_embeddings` [B, D], `text_embeddings` [B, D]
        (float32), the raw `logit_scale` parameter (a log; exp it and clip at 100 for logits)
        and, for SigLIP-style models, `logit_bias`. `patch_noise`: see `encode_image`."""
        out = {
            "image_embeddings": l2_normalize(
                self.encode_image(images, train=train, patch_noise=patch_noise)
            ),
            "text_embeddings": l2_normalize(self.encode_text(tokens)),
            "logit_scale": self.logit_scale.astype(jnp.float32),
        }
        if self.config.init_logit_bias is not None:
            out["logit_bias"] = self.logit_bias.astype(jnp.float32)
        return out

    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Initialise all variables with a batch of 1 (shapes only matter)."""
        size = self.config.image_size
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        tokens = jnp.zeros((1, self.config.context_length), jnp.int32)
        return self.init(rng, images, tokens, train=False)
