"""Named model configurations.

The full-size entries have exactly the shapes of OpenAI/open_clip's models of the same name, so
their weights convert one-to-one. `-quickgelu` variants use QuickGELU (what OpenAI's released
ViT weights need); the plain names use exact GELU as in open_clip. Tiny entries are for tests and
CPU work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clip_jax.models.config import (
    CLIPConfig,
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
)


def _vit(embed, image, patch, width, layers, text_width, text_heads, text_layers=12):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionTransformerConfig(
            image_size=image, patch_size=patch, width=width, layers=layers, heads=width // 64
        ),
        text=TextTransformerConfig(width=text_width, heads=text_heads, layers=text_layers),
    )


def _rn(embed, image, layers, width, text_width, text_heads):
    return CLIPConfig(
        embed_dim=embed,
        vision=ModifiedResNetConfig(
            image_size=image, layers=layers, width=width, heads=width * 32 // 64
        ),
        text=TextTransformerConfig(width=text_width, heads=text_heads, layers=12),
    )


_MODELS: dict[str, CLIPConfig] = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512, 8),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512, 8),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 768, 12),
    # ~7.6M parameters (6.3M of them the token embedding); trains on the 64 px demo data on CPU.
    "tiny-vit": CLIPConfig(
        embed_dim=128,
        vision=VisionTransformerConfig(image_size=64, patch_size=8, width=128, layers=2, heads=2),
        text=TextTransformerConfig(context_length=32, width=128, layers=2, heads=2),
    ),
    "tiny-rn": CLIPConfig(
        embed_dim=128,
        vision=ModifiedResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=16, heads=4),
        text=TextTransformerConfig(context_length=32, width=128, layers=2, heads=2),
    ),
}


def list_models() -> list[str]:
    """All registered names, including the `-quickgelu` variants."""
    names = sorted(_MODELS)
    return names + sorted(f"{n}-quickgelu" for n in names)


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """The named config, e.g. `get_model_config("ViT-B-32")`.

    A `-quickgelu` suffix switches both towers' activation to QuickGELU. `overrides` replace
    top-level fields; `vision={...}` / `text={...}` dicts replace fields of a tower.
    """
    base = name.removesuffix("-quickgelu")
    if base not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config = _MODELS[base]
    if name.endswith("-quickgelu"):
        config = set_activation(config, "quick_gelu")
    return apply_overrides(config, name, **overrides)


def apply_overrides(config: CLIPConfig, name: str = "", **overrides: Any) -> CLIPConfig:
    """`config` with `overrides` replacing top-level fields; `vision={...}` / `text={...}`
    dicts replace fields of a tower. `name` only labels the error for an unknown field."""
    vision_overrides = overrides.pop("vision", None) or {}
    text_overrides = overrides.pop("text", None) or {}
    try:
        return dataclasses.replace(
            config,
            vision=dataclasses.replace(config.vision, **vision_overrides),
            text=dataclasses.replace(config.text, **text_overrides),
            **overrides,
        )
    except TypeError as e:
        raise ValueError(f"bad override for model {name or 'config'!r}: {e}") from None


def set_activation(config: CLIPConfig, activation: str) -> CLIPConfig:
    """Same architecture with another transformer activation (ResNet convs stay ReLU)."""
    vision = config.vision
    if isinstance(vision, VisionTransformerConfig):
        vision = dataclasses.replace(vision, activation=activation)
    return dataclasses.replace(
        config, vision=vision, text=dataclasses.replace(config.text, activation=activation)
    )
