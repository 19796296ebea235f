"""Pre-LN Transformer blocks shared by the ViT image tower and the text tower.

Parameter names follow OpenAI/open_clip (`ln_1`, `attn/in_proj`, `attn/out_proj`, `ln_2`,
`mlp/c_fc`, `mlp/c_proj`) so that weight conversion is a renaming plus transposes.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import attention

Dtype = Any

# torch.nn.LayerNorm's default epsilon; flax's default (1e-6) would not match imported weights.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's sigmoid approximation of GELU, used by their released CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU() (erf form), used by open_clip's own model configs.

    Written as torch writes it, x/2 * (1 + erf(x/sqrt(2))), rather than with
    `jax.nn.gelu(approximate=False)`: that one goes through erfc, whose XLA:CPU lowering made
    the activation's forward + backward 2.5x slower (11.0 vs 4.4 ms on a [1232, 2048] array).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    activations = {"gelu": exact_gelu, "quick_gelu": quick_gelu, "relu": jax.nn.relu}
    if name not in activations:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(activations)}")
    return activations[name]


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # Statistics are reduced in float32 even when dtype is bfloat16 (flax default).
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class QKVProjection(nn.Module):
    """The fused input projection of torch's nn.MultiheadAttention: one kernel [W, 3W] and one
    bias [3W] (so weights convert as they are), applied as three [W, W] matmuls.

    Three matmuls rather than one [W, 3W] matmul followed by slicing: the slice's backward pads
    dq, dk and dv back to [B, T, 3W] and transposes them for the weight gradient, which cost
    ~20% of the attention layer's time on XLA:CPU. The FLOPs are the same either way; XLA:GPU
    merges dots that share an operand only below `--xla_gpu_dot_merger_threshold_mb`, so at
    training sizes these stay three [B*T, W] x [W, W] GEMMs (not measured on a GPU).
    """

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, T, W] -> q, k, v, each [B, T, heads, W // heads]."""
        batch, length, width = x.shape
        kernel = self.param(
            "kernel", nn.initializers.normal(width**-0.5), (width, 3 * width), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (3 * width,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        head_dim = width // self.heads
        return tuple(
            (
                jnp.dot(x, kernel[:, i * width : (i + 1) * width])
                + bias[i * width : (i + 1) * width]
            ).reshape(batch, length, self.heads, head_dim)
            for i in range(3)
        )


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
        q, k, v = QKVProjection(self.heads, dtype=self.dtype, name="in_proj")(x)
        out = attention.dot_product_attention(
            q, k, v, causal=self.causal, implementation=self.attention_impl
        )
        out = out.reshape(batch, length, width)
        out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
        return nn.Dense(
            width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std), name="out_proj"
        )(out)


class Mlp(nn.Module):
    """Two-layer MLP: c_fc (W -> mlp_width), activation, c_proj (mlp_width -> W)."""

    mlp_width: int
    activation: str = "gelu"
    out_init_std: float | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_width,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal((2 * width) ** -0.5),
            name="c_fc",
        )(x)
        h = get_activation(self.activation)(h)
        out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
        return nn.Dense(
            width, dtype=self.dtype, kernel_init=nn.initializers.normal(out_std), name="c_proj"
        )(h)


REMAT_CHOICES = ("none", "full")  # plus any name in jax.checkpoint_policies


def remat_policy(remat: str) -> tuple[bool, Callable | None]:
    """(rematerialise?, policy) for `model.remat`: "none", "full" (save nothing, recompute the
    whole block in the backward pass) or a `jax.checkpoint_policies` name such as
    "dots_with_no_batch_dims_saveable" (keep the weight matmuls' outputs, recompute the rest)."""
    if remat == "none":
        return False, None
    if remat == "full":
        return True, None
    policy = getattr(jax.checkpoint_policies, remat, None)
    if policy is None or remat.startswith("_"):
        names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
        raise ValueError(
            f"model.remat={remat!r}: expected 'none', 'full' or one of "
            f"jax.checkpoint_policies: {', '.join(names)}"
        )
    if remat in (
        "save_only_these_names",
        "save_any_names_but_these",
        "save_anything_except_these_names",
        "save_and_offload_only_these_names",
        "save_from_both_policies",
    ):
        raise ValueError(
            f"model.remat={remat!r} is a policy factory that needs arguments; "
            f"use a ready policy such as 'dots_with_no_batch_dims_saveable'"
        )
    return True, policy


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    `scan_output=True` makes the block return `(x, None)`, the (carry, output) pair `nn.scan`
    expects, so the same module serves both the unrolled and the scanned stack.
    """

    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    depth: int = 12  # total number of blocks; scales the residual-branch init like open_clip
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    scan_output: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> jax.Array | tuple[jax.Array, None]:
        """[B, T, W] -> [B, T, W] (or `(x, None)` with scan_output)."""
        width = x.shape[-1]
        residual_std = width**-0.5 * (2 * self.depth) ** -0.5
        y = layer_norm("ln_1", self.dtype)(x)
        y = MultiHeadSelfAttention(
            width,
            self.heads,
            causal=self.causal,
            out_init_std=residual_std,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="attn",
        )(y)
        x = x + y
        y = layer_norm("ln_2", self.dtype)(x)
        y = Mlp(
            int(width * self.mlp_ratio),
            self.activation,
            out_init_std=residual_std,
            dtype=self.dtype,
            name="mlp",
        )(y)
        x = x + y
        return (x, None) if self.scan_output else x


class Transformer(nn.Module):
    """A stack of `layers` residual attention blocks.

    Unrolled (default) the blocks are named `resblocks_{i}` (the OpenAI layout that
    `clip_jax.convert` writes). With `scan_layers=True` one block is `nn.scan`ned `layers`
    times: XLA compiles the block once instead of `layers` times, and the parameters are
    stacked under `resblocks` with a leading [layers] axis (`stack_layers` / `unstack_layers`
    convert between the two layouts). `remat` rematerialises each block's activations in the
    backward pass (see `remat_policy`).
    """

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, W] -> [B, T, W]."""
        use_remat, policy = remat_policy(self.remat)
        block = ResidualAttentionBlock
        if use_remat:
            # Under scan, CSE across iterations is impossible anyway; prevent_cse=False lets
            # XLA optimise the loop body better (flax's recommendation).
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan_layers)
        kwargs = dict(
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            causal=self.causal,
            depth=self.layers,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
                in_axes=nn.broadcast,
            )
            x, _ = stack(scan_output=True, name=SCANNED_NAME, **kwargs)(x, None)
            return x
        for i in range(self.layers):
            x = block(name=f"resblocks_{i}", **kwargs)(x)
        return x


SCANNED_NAME = "resblocks"
_LAYER_NAME = re.compile(r"resblocks_(\d+)$")


def stack_layers(tree: Any) -> Any:
    """Unrolled -> scanned parameter layout: every dict holding `resblocks_0..resblocks_{L-1}`
    gets them replaced by one `resblocks` subtree whose leaves are stacked on a new leading
    [L] axis. Other entries are kept. Works on numpy or jax leaves."""
    if not isinstance(tree, dict):
        return tree
    layers = {int(m.group(1)): k for k in tree if (m := _LAYER_NAME.match(k))}
    out = {k: stack_layers(v) for k, v in tree.items() if k not in layers.values()}
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"resblocks indices {sorted(layers)} are not 0..{len(layers) - 1}")
        blocks = [tree[layers[i]] for i in range(len(layers))]
        out[SCANNED_NAME] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def unstack_layers(tree: Any) -> Any:
    """Scanned -> unrolled layout (inverse of `stack_layers`): `resblocks` [L, ...] leaves
    become `resblocks_0..resblocks_{L-1}`, the layout of `clip_jax.convert` and of models built
    with scan_layers=False."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != SCANNED_NAME}
    if SCANNED_NAME in tree:
        stacked = tree[SCANNED_NAME]
        num = {x.shape[0] for x in jax.tree.leaves(stacked)}
        if len(num) != 1:
            raise ValueError(f"stacked resblocks have different leading sizes {sorted(num)}")
        for i in range(num.pop()):
            out[f"resblocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
