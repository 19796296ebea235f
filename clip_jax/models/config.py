"""Architecture descriptions of the CLIP towers.

These are plain frozen dataclasses so that a model is fully described by JSON-serialisable data:
checkpoints store `CLIPConfig.to_dict()` and `CLIPConfig.from_dict()` rebuilds the same model.
Compute precision is not part of the architecture; it is chosen when the module is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Union

Activation = Literal["gelu", "quick_gelu"]


@dataclasses.dataclass(frozen=True)
class VisionTransformerConfig:
    """A ViT image tower as in OpenAI CLIP / open_clip."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # OpenAI's released weights use QuickGELU; open_clip's own configs use exact GELU.
    activation: Activation = "gelu"
    type: Literal["vit"] = "vit"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")


@dataclasses.dataclass(frozen=True)
class ModifiedResNetConfig:
    """OpenAI's ModifiedResNet image tower (3-conv stem, anti-aliased strides, attention pool)."""

    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32  # open_clip: width * 32 // 64
    type: Literal["resnet"] = "resnet"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths, got {self.layers}")
        if self.image_size % 32:
            raise ValueError(
                f"ModifiedResNet image_size must be a multiple of 32, got {self.image_size}"
            )
        if (self.width * 32) % self.heads:
            raise ValueError(
                f"attention-pool width {self.width * 32} is not divisible by heads {self.heads}"
            )


@dataclasses.dataclass(frozen=True)
class TextTransformerConfig:
    """The causal text Transformer; features are taken at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: Activation = "gelu"
    pad_id: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


VisionConfig = Union[VisionTransformerConfig, ModifiedResNetConfig]


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers plus the shared embedding size."""

    embed_dim: int
    vision: VisionConfig
    text: TextTransformerConfig
    # Initial value of the learned temperature, as a log: log(1/0.07) for CLIP.
    init_logit_scale: float = 2.6592600369644165
    # Optional learned logit bias (SigLIP); None means the model has no bias parameter.
    init_logit_bias: float | None = None

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"]["layers"] = (
            list(d["vision"]["layers"]) if self.vision.type == "resnet" else d["vision"]["layers"]
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        vision = dict(d.pop("vision"))
        kind = vision.get("type", "vit")
        vision_cls = {"vit": VisionTransformerConfig, "resnet": ModifiedResNetConfig}.get(kind)
        if vision_cls is None:
            raise ValueError(f"unknown vision tower type {kind!r} (expected 'vit' or 'resnet')")
        _check_keys(vision_cls, vision, "vision")
        text = dict(d.pop("text"))
        _check_keys(TextTransformerConfig, text, "text")
        _check_keys(cls, d, "model", ignore=("vision", "text"))
        return cls(vision=vision_cls(**vision), text=TextTransformerConfig(**text), **d)

    def replace(self, **changes: Any) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)


def check_image_shape(images: Any, image_size: int) -> None:
    """Raises ValueError unless `images` is `[B, image_size, image_size, 3]` (any image tower's
    input; checked at trace time, so it costs nothing per step)."""
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"expected images of shape [B, {image_size}, {image_size}, 3], got "
            f"{tuple(images.shape)}"
        )


def _check_keys(cls, d: dict, what: str, ignore: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - set(ignore)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(known)}")
