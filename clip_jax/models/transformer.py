"""Pre-LN Transformer blocks shared by the ViT image tower and the text tower.

Parameter names follow OpenAI/open_clip (`ln_1`, `attn/in_proj`, `attn/out_proj`, `ln_2`,
`mlp/c_fc`, `mlp/c_proj`) so that weight conversion is a renaming plus transposes.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# torch.nn.LayerNorm's default epsilon; flax's default (1e-6) would not match imported weights.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's sigmoid approximation of GELU, used by their released CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU() (erf form), used by open_clip's own model configs."""
    return jax.nn.gelu(x, approximate=False)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    activations = {"gelu": exact_gelu, "quick_gelu": quick_gelu, "relu": jax.nn.relu}
    if name not in activations:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(activations)}")
    return activations[name]


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # Statistics are reduced in float32 even when dtype is bfloat16 (flax default).
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with a fused QKV projection (torch's nn.MultiheadAttention layout).

    Attributes:
      width: model width W.
      heads: number of heads; head width is W // heads.
      causal: mask attention to earlier positions only (text tower).
      out_init_std: std of the output projection's init (open_clip scales it by depth).
      attention_impl: passed to `jax.nn.dot_product_attention` (None: XLA picks; 'cudnn':
        fused flash attention on NVIDIA GPUs).
    """

    width: int
    heads: int
    causal: bool = False
    out_init_std: float | None = None
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, W] -> [B, T, W]."""
        batch, length, width = x.shape
        head_dim = width // self.heads
        qkv = nn.Dense(3 * width, dtype=self.dtype,
                       kernel_init=nn.initializers.normal(width ** -0.5),
                       name="in_proj")(x)
        qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                           implementation=self.attention_impl)
        out = out.reshape(batch, length, width)
        out_std = self.out_init_std if self.out_init_std is not None else width ** -0.5
        return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std),
                        name="out_proj")(out)


class Mlp(nn.Module):
    """Two-layer MLP: c_fc (W -> mlp_width), activation, c_proj (mlp_width -> W)."""

    mlp_width: int
    activation: str = "gelu"
    out_init_std: float | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(self.mlp_width, dtype=self.dtype,
                     kernel_init=nn.initializers.normal((2 * width) ** -0.5), name="c_fc")(x)
        h = get_activation(self.activation)(h)
        out_std = self.out_init_std if self.out_init_std is not None else width ** -0.5
        return nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std),
                        name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    depth: int = 12  # total number of blocks; scales the residual-branch init like open_clip
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, W] -> [B, T, W]."""
        width = x.shape[-1]
        residual_std = width ** -0.5 * (2 * self.depth) ** -0.5
        y = layer_norm("ln_1", self.dtype)(x)
        y = MultiHeadSelfAttention(width, self.heads, causal=self.causal,
                                   out_init_std=residual_std,
                                   attention_impl=self.attention_impl,
                                   dtype=self.dtype, name="attn")(y)
        x = x + y
        y = layer_norm("ln_2", self.dtype)(x)
        y = Mlp(int(width * self.mlp_ratio), self.activation, out_init_std=residual_std,
                dtype=self.dtype, name="mlp")(y)
        return x + y


class Transformer(nn.Module):
    """A stack of `layers` residual attention blocks named `resblocks_{i}`."""

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, W] -> [B, T, W]."""
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.heads, self.mlp_ratio, self.activation, self.causal,
                                       depth=self.layers, attention_impl=self.attention_impl,
                                       dtype=self.dtype, name=f"resblocks_{i}")(x)
        return x
