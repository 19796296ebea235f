"""FLIP patch dropout: the image tower sees a random subset of its patch tokens at train time.

FLIP (Li et al. 2023, "Scaling Language-Image Pre-training via Masking") drops 50-75% of the
patch tokens of every training image, per sample and uniformly at random, and runs the ViT on
the kept tokens only: a step costs about the kept fraction of the image tower's time, so more
samples fit in the same compute. The class token is always kept; positional embeddings are
added before the drop, so every kept token still knows where it came from. Evaluation and
inference see all tokens.

Shapes stay static (the kept count depends only on the rate and the grid), so the step jits
once. The drop is driven by a noise array `[B, N] float32` (N patches): each sample keeps the
patches with the smallest noise values. The trainer draws that noise for the whole global
batch from the step's RNG (`step_noise`), so GradCache micro-batches get exactly the masks the
same samples would get in a full-batch step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Folded into the step key so that the noise stream is separate from any other use of the
# train state's RNG.
_SALT = 0x5EED_F11B


def check_rate(rate: float) -> float:
    """The drop rate as a float in [0, 1); raises ValueError otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ValueError(f"patch_dropout={rate!r} must be a number in [0, 1)")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"patch_dropout={rate!r} must be in [0, 1) (0: off)")
    return float(rate)


def num_kept(num_patches: int, rate: float) -> int:
    """Patch tokens kept per sample: max(1, int(N * (1 - rate))), open_clip's PatchDropout rule
    (0.5 of 196 keeps 98, 0.75 keeps 49)."""
    return max(1, int(num_patches * (1.0 - check_rate(rate))))


def grid_patches(vision_config) -> int:
    """Patch tokens of a ViT tower config: (image_size // patch_size) ** 2."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def sample_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Uniform noise [batch, num_patches] float32; a sample keeps its lowest-noise patches."""
    return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def step_noise(rng: jax.Array, step: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """The trainer's noise for one step: [batch, num_patches] float32 from the train state's raw
    key data `rng` (uint32 [2]) and the step counter, so a resumed run draws the same masks."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), _SALT)
    return sample_noise(key, batch, num_patches)


def keep_patches(x: jax.Array, noise: jax.Array, rate: float) -> jax.Array:
    """Drops patch tokens: [B, 1 + N, W] (class token first) -> [B, 1 + K, W], K = num_kept.

    Each sample keeps the K patches with the smallest `noise` ([B, N]) values, in their
    original (raster) order, behind the class token.
    """
    batch, tokens, _ = x.shape
    num_patches = tokens - 1
    if noise.shape != (batch, num_patches):
        raise ValueError(
            f"patch dropout noise has shape {tuple(noise.shape)}, expected "
            f"{(batch, num_patches)} (batch, patch tokens)"
        )
    keep = num_kept(num_patches, rate)
    _, index = jax.lax.top_k(-noise, keep)  # [B, K] the K lowest-noise patches
    index = jnp.sort(index, axis=-1)
    patches = jnp.take_along_axis(x[:, 1:], index[..., None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)
