"""CLIP model definitions: towers, the two-tower model and the registry of named configs."""

from clip_jax.models.clip import CLIP, l2_normalize
from clip_jax.models.config import (
    CLIPConfig,
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
)
from clip_jax.models.registry import apply_overrides, get_model_config, list_models
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


def create_model(name_or_config, dtype="float32", attention_impl=None, **overrides) -> CLIP:
    """Build a `CLIP` module from a registry name (or a `CLIPConfig`) with a compute dtype.

    `overrides` replace config fields, for a name and a `CLIPConfig` alike (see
    `get_model_config`), e.g. `create_model(config, vision={"layers": 1})`.
    """
    import jax.numpy as jnp

    if isinstance(name_or_config, CLIPConfig):
        config = apply_overrides(name_or_config, **overrides)
    else:
        config = get_model_config(name_or_config, **overrides)
    return CLIP(config, dtype=jnp.dtype(dtype), attention_impl=attention_impl)


__all__ = [
    "CLIP",
    "CLIPConfig",
    "ModifiedResNet",
    "ModifiedResNetConfig",
    "TextTransformer",
    "TextTransformerConfig",
    "VisionTransformer",
    "VisionTransformerConfig",
    "create_model",
    "get_model_config",
    "l2_normalize",
    "list_models",
]
