"""open_clip (PyTorch) as a reference implementation for parity tests.

Import only from tests that need torch/open_clip (they are test-only dependencies).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import torch

from clip_jax.models import CLIPConfig, create_model

EOT_ID = 49407  # OpenAI BPE end-of-text: the highest id, so open_clip's argmax pooling finds it
SOT_ID = 49406


def randomize_batchnorm(
    model: torch.nn.Module, seed: int = 0, train_batches: int = 2, image_size: int | None = None
) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    open_clip zero-initialises each block's bn3 scale (blocks start as identities), which would
    hide conversion errors in the residual branches; the running statistics start at 0/1, which
    would hide a mean/var mix-up. Running statistics come from a few train-mode forward passes.
    """
    generator = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.1)
        if batchnorms and train_batches:
            model.train()
            size = image_size or model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            for _ in range(train_batches):
                model.encode_image(torch.randn(2, 3, size, size, generator=generator) * 2 + 0.5)
    model.eval()


def make_small_model(
    embed_dim: int,
    vision_cfg: dict,
    text_cfg: dict,
    quick_gelu: bool,
    seed: int = 0,
    logit_scale: float = 3.3,
) -> torch.nn.Module:
    """A random-init open_clip CLIP in eval mode, with non-default BN state and logit_scale."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu)
    randomize_batchnorm(model, seed, image_size=vision_cfg["image_size"])
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model.eval()


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """[B, 3, H, W] float32 (torch layout), roughly normalised."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def random_tokens(batch: int, context_length: int, seed: int = 0) -> np.ndarray:
    """[B, L] int32: SOT, random ids, EOT, then zeros; the last row fills the whole context.

    Id 0 is both the pad id and a real BPE token ("!"): rows of 4+ tokens hold a 0 before the
    EOT, so pooling must find the last non-pad token, not count non-pad tokens.
    """
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, context_length), np.int32)
    for row in range(batch):
        length = context_length if row == batch - 1 else int(rng.integers(4, context_length))
        tokens[row, 0] = SOT_ID
        tokens[row, 1 : length - 1] = rng.integers(0, SOT_ID, size=length - 2)
        tokens[row, length - 1] = EOT_ID
        tokens[row, int(rng.integers(1, length - 2))] = 0
    return tokens


def torch_encode(
    model: torch.nn.Module, images: np.ndarray | None, tokens: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """open_clip encode_image([B, 3, H, W]) and encode_text([B, L]) as float32 numpy."""
    model.eval()
    with torch.no_grad():
        image = None if images is None else model.encode_image(torch.from_numpy(images)).numpy()
        text = (
            None if tokens is None else model.encode_text(torch.from_numpy(tokens).long()).numpy()
        )
    return image, text


def jax_encode(
    config: CLIPConfig, variables, images: np.ndarray | None, tokens: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Our encode_image (on the NHWC transpose of torch-layout images) and encode_text."""
    model = create_model(config)

    # One jit for both towers: compiling the whole forward once is several times faster on CPU
    # than eager op-by-op dispatch, which compiles every new primitive shape separately.
    @jax.jit
    def encode(variables, images_nhwc, tokens):
        image = (
            None
            if images_nhwc is None
            else model.apply(variables, images_nhwc, method=model.encode_image)
        )
        text = None if tokens is None else model.apply(variables, tokens, method=model.encode_text)
        return image, text

    image, text = encode(
        variables,
        None if images is None else jnp.asarray(images.transpose(0, 2, 3, 1)),
        None if tokens is None else jnp.asarray(tokens),
    )
    return (
        None if image is None else np.asarray(image),
        None if text is None else np.asarray(text),
    )
