"""open_clip's model-directory format: `open_clip_config.json` <-> clip_jax `CLIPConfig`.

An open_clip directory (a Hub repo such as `laion/CLIP-ViT-B-32-laion2B-s34B-b79K`, or what
`open_clip.create_model_and_transforms("local-dir:DIR")` reads) holds

    open_clip_config.json   {"model_cfg": {...}, "preprocess_cfg": {...}}
    open_clip_model.safetensors  (or open_clip_pytorch_model.bin)   the open_clip state dict

`model_cfg` is open_clip's `CLIP(**model_cfg)` arguments: `embed_dim`, `quick_gelu`,
`vision_cfg` (a ViT, or a ModifiedResNet when `layers` is a list of 4), `text_cfg`, optional
`init_logit_bias`. Options clip_jax's models do not implement (layer scale, attentional
pooling, other pooling, timm or HF towers, ...) are refused with the option's name rather than
converted into a model that would compute something else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD
from clip_jax.models import CLIPConfig
from clip_jax.models.config import (
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # preference
WEIGHTS_FILE = WEIGHT_FILES[0]  # what `clip_jax.export` writes

# Options that only act in training or on outputs clip_jax does not produce: any value.
_VISION_IGNORED = {
    "patch_dropout",
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
_TEXT_IGNORED = {"output_tokens", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
# Options that change the computation: accepted only at open_clip's default value.
_COMMON_DEFAULTS = {
    "ls_init_value": (None,),
    "final_ln_after_pool": (False,),
    "act_kwargs": (None, {}),
    "norm_kwargs": (None, {}),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_VISION_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "pool_type": ("tok",),
    "timm_model_name": (None,),
}
_TEXT_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "hf_tokenizer_name": (None,),
    "tokenizer_mode": (None,),
    "tokenizer_kwargs": (None, {}),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "proj_type": ("linear",),
    "hf_model_name": (None,),
}
_VISION_USED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_TEXT_USED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id"}
_MODEL_USED = {
    "embed_dim",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "init_logit_bias",
    "custom_text",
}
_MODEL_IGNORED = {"init_logit_scale", "cast_dtype", "output_dict"}  # weights hold the scale


def _check_options(
    cfg: Mapping[str, Any],
    used: set[str],
    ignored: set[str],
    defaults: Mapping[str, tuple],
    where: str,
) -> None:
    for key, value in cfg.items():
        if key in used or key in ignored:
            continue
        if key not in defaults:
            raise ValueError(f"{where}.{key} is not an open_clip option clip_jax knows")
        if value not in defaults[key]:
            raise ValueError(
                f"{where}.{key}={value!r} is not supported by clip_jax's models "
                f"(supported: {defaults[key][0]!r})"
            )


def _square(size: Any, where: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{where}={list(size)}: only square images are supported")
        size = size[0]
    return int(size)


def config_from_open_clip(
    model_cfg: Mapping[str, Any], quick_gelu: bool | None = None
) -> CLIPConfig:
    """open_clip `model_cfg` -> `CLIPConfig`; missing fields take open_clip's defaults.

    `quick_gelu` is used when `model_cfg` has no "quick_gelu" key (a pretrained-name table can
    know it); otherwise, and by default, open_clip's default (exact GELU) applies.
    Raises ValueError naming the first option clip_jax cannot honour.
    """
    _check_options(model_cfg, _MODEL_USED, _MODEL_IGNORED, {}, "model_cfg")
    vision = dict(model_cfg.get("vision_cfg") or {})
    text = dict(model_cfg.get("text_cfg") or {})
    _check_options(vision, _VISION_USED, _VISION_IGNORED, _VISION_DEFAULTS, "vision_cfg")
    _check_options(text, _TEXT_USED, _TEXT_IGNORED, _TEXT_DEFAULTS, "text_cfg")
    if "quick_gelu" in model_cfg:
        quick_gelu = bool(model_cfg["quick_gelu"])
    activation = "quick_gelu" if quick_gelu else "gelu"
    image_size = _square(vision.get("image_size", 224), "vision_cfg.image_size")
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # open_clip builds a ModifiedResNet
        vision_config = ModifiedResNetConfig(
            image_size=image_size, layers=tuple(layers), width=width, heads=width * 32 // head_width
        )
    else:
        vision_config = VisionTransformerConfig(
            image_size=image_size,
            patch_size=int(vision.get("patch_size", 16)),
            width=width,
            layers=int(layers),
            heads=width // head_width,
            mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            activation=activation,
        )
    text_config = TextTransformerConfig(
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        width=int(text.get("width", 512)),
        layers=int(text.get("layers", 12)),
        heads=int(text.get("heads", 8)),
        mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        activation=activation,
        pad_id=int(text.get("pad_id", 0)),
    )
    bias = model_cfg.get("init_logit_bias")
    return CLIPConfig(
        embed_dim=int(model_cfg["embed_dim"]),
        vision=vision_config,
        text=text_config,
        init_logit_bias=None if bias is None else float(bias),
    )


def config_to_open_clip(config: CLIPConfig) -> dict[str, Any]:
    """`CLIPConfig` -> open_clip `model_cfg` (what `open_clip.model.CLIP(**model_cfg)` takes)."""
    vision, text = config.vision, config.text
    if config.vision.type == "resnet":
        vision_cfg = {
            "image_size": vision.image_size,
            "layers": list(vision.layers),
            "width": vision.width,
            "head_width": vision.width * 32 // vision.heads,
        }
    else:
        if vision.activation != text.activation:
            raise ValueError(
                "open_clip uses one activation for both towers; this model's towers differ"
            )
        vision_cfg = {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.layers,
            "head_width": vision.width // vision.heads,
            "mlp_ratio": vision.mlp_ratio,
        }
    model_cfg = {
        "embed_dim": config.embed_dim,
        "quick_gelu": text.activation == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
            "pad_id": text.pad_id,
        },
    }
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return model_cfg


def preprocess_to_open_clip(image_size: int) -> dict[str, Any]:
    """`preprocess_cfg` of clip_jax's evaluation pipeline (shorter side, bicubic, OpenAI
    mean/std, center crop)."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def check_preprocess(preprocess_cfg: Mapping[str, Any], where: str) -> None:
    """Raises ValueError when the weights expect another normalisation than clip_jax's
    (OpenAI mean/std); logs a warning for another resize (the embeddings shift slightly)."""
    for key, ours in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
        value = preprocess_cfg.get(key, ours)
        value = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(value) != 3 or max(abs(a - b) for a, b in zip(value, ours)) > 1e-6:
            raise ValueError(
                f"{where} normalises images with {key} {value}; clip_jax's "
                f"pipelines use OpenAI's {list(ours)}, so these weights would "
                f"see wrongly normalised images"
            )
    for key, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
        if preprocess_cfg.get(key, ours) != ours:
            logger.warning(
                "%s resizes images with %s=%r; clip_jax uses %r",
                where,
                key,
                preprocess_cfg[key],
                ours,
            )
