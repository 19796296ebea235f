"""Causal text Transformer tower (OpenAI CLIP layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.config import TextTransformerConfig
from clip_jax.models.transformer import Dtype, Transformer, layer_norm


def end_of_text_index(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Index of the last non-pad token of each row: [B, L] int -> [B] int32.

    Our tokenizers end every row with the end-of-text token followed only by padding, so this is
    the EOT position; unlike open_clip's `tokens.argmax(-1)` it also works for SentencePiece
    vocabularies, whose EOT id is not the largest. It must not count non-pad tokens: in OpenAI's
    BPE the pad id 0 is also a real token ("!"), which can occur inside a caption.
    """
    is_token = tokens != pad_id
    last_from_end = jnp.argmax(jnp.flip(is_token, axis=-1), axis=-1)
    return (tokens.shape[-1] - 1 - last_from_end).astype(jnp.int32)


class TextTransformer(nn.Module):
    """Token + positional embedding, causal Transformer, ln_final, features at EOT, projection."""

    config: TextTransformerConfig
    output_dim: int
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    remat: str = "none"  # per-block activation rematerialisation (transformer.py)
    scan_layers: bool = False  # nn.scan over the blocks (stacked `resblocks` params)

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int32 (L <= context_length) -> [B, output_dim] in `dtype` (not normalised)."""
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
            raise ValueError(
                f"expected tokens of shape [B, L] with L <= {cfg.context_length}, "
                f"got {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        x = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=self.dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embedding",
        )(tokens)
        positional = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width)
        )
        x = x + positional[:length].astype(self.dtype)
        x = Transformer(
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.activation,
            causal=True,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            name="transformer",
        )(x)
        x = layer_norm("ln_final", self.dtype)(x)
        pooled = x[jnp.arange(x.shape[0]), end_of_text_index(tokens, cfg.pad_id)]
        proj = self.param(
            "text_projection", nn.initializers.normal(cfg.width**-0.5), (cfg.width, self.output_dim)
        )
        return pooled @ proj.astype(self.dtype)
