"""Hugging Face transformers' CLIP format: `CLIPModel` names and config, tokenizer, processor.

transformers keeps OpenAI's architecture (ViT towers only) under other names; this module maps
them both ways, so the rest of clip_jax only deals with OpenAI / open_clip names:

    OpenAI / open_clip                         transformers CLIPModel
    token_embedding.weight                     text_model.embeddings.token_embedding.weight
    positional_embedding                       text_model.embeddings.position_embedding.weight
    transformer.resblocks.{i}.*                text_model.encoder.layers.{i}.*
    ln_final.*                                 text_model.final_layer_norm.*
    text_projection            [W, D]          text_projection.weight           [D, W]
    visual.class_embedding                     vision_model.embeddings.class_embedding
    visual.conv1.weight                        vision_model.embeddings.patch_embedding.weight
    visual.positional_embedding                vision_model.embeddings.position_embedding.weight
    visual.ln_pre.* / visual.ln_post.*         vision_model.pre_layrnorm.* / post_layernorm.*
    visual.transformer.resblocks.{i}.*         vision_model.encoder.layers.{i}.*
    visual.proj                [W, D]          visual_projection.weight         [D, W]
  inside a block:
    attn.in_proj_weight/_bias  [3W, ...]       self_attn.{q,k,v}_proj.weight/bias (split in 3)
    attn.out_proj.* / ln_1.* / ln_2.*          self_attn.out_proj.* / layer_norm1.* / layer_norm2.*
    mlp.c_fc.* / mlp.c_proj.*                  mlp.fc1.* / mlp.fc2.*

(`pre_layrnorm` is transformers' spelling.) Nothing here imports transformers or torch.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD
from clip_jax.models import CLIPConfig
from clip_jax.models.config import TextTransformerConfig, VisionTransformerConfig
from clip_jax.models.transformer import LAYER_NORM_EPS

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers' names of the BPE special tokens (open_clip says <start_of_text>/<end_of_text>).
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # transformers "gelu" is exact

_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
_TOWERS = {"text_model": "transformer", "vision_model": "visual.transformer"}
_IN_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OPENAI_BLOCK = re.compile(r"^(transformer|visual\.transformer)\.resblocks\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def state_dict_from_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `CLIPModel` state dict ({name: NumPy array}) -> OpenAI names and layouts.

    q/k/v projections are stacked into `in_proj_weight`/`in_proj_bias`; the two projections are
    transposed; `position_ids` buffers are dropped. Names it does not know are kept unchanged,
    so that `clip_jax.convert.convert_state_dict` reports them as unexpected.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = np.asarray(value).T
        elif match := _HF_BLOCK.match(key):
            tower, index, module, leaf = match.groups()
            prefix = f"{_TOWERS[tower]}.resblocks.{index}."
            if module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
                qkv.setdefault((prefix, leaf), {})[module[len("self_attn.") :]] = value
            elif module in _IN_BLOCK:
                out[f"{prefix}{_IN_BLOCK[module]}.{leaf}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != set(_QKV):
            missing = sorted(set(_QKV) - set(parts))
            raise ValueError(f"{prefix}: self_attn {leaf} lacks {', '.join(missing)}")
        out[f"{prefix}attn.in_proj_{leaf}"] = np.concatenate([parts[n] for n in _QKV], axis=0)
    return out


def state_dict_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI-named state dict of a ViT CLIP -> transformers `CLIPModel` names (contiguous)."""
    top = {v: k for k, v in _TOP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    in_block = {v: k for k, v in _IN_BLOCK.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.T
        elif match := _OPENAI_BLOCK.match(key):
            tower, index, rest = match.groups()
            prefix = f"{towers[tower]}.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = rest.rsplit("_", 1)[1]
                for name, part in zip(_QKV, np.split(value, 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{leaf}"] = part
            else:
                module, leaf = rest.rsplit(".", 1)
                if module not in in_block:
                    raise ValueError(f"{key} has no transformers CLIPModel counterpart")
                out[f"{prefix}{in_block[module]}.{leaf}"] = value
        else:
            raise ValueError(f"{key} has no transformers CLIPModel counterpart")
    return {k: np.require(v, requirements="C") for k, v in out.items()}


def _activation(tower: Mapping[str, Any], what: str) -> str:
    act = tower.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"{what}.hidden_act={act!r} is not supported (clip_jax has "
            f"{' and '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[act]


def config_from_hf(hf_config: Mapping[str, Any]) -> CLIPConfig:
    """A transformers `CLIPConfig` (config.json as a dict) -> clip_jax `CLIPConfig`.

    Defaults are transformers' CLIPTextConfig/CLIPVisionConfig defaults (OpenAI ViT-B-32).
    Raises ValueError for another model type, a non-QuickGELU/GELU activation, a LayerNorm
    epsilon other than 1e-5, or a tower with its own projection size.
    """
    model_type = hf_config.get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"config.json describes a transformers {model_type!r} model; only "
            f"CLIPModel (model_type 'clip') is supported"
        )
    text = dict(hf_config.get("text_config") or {})
    vision = dict(hf_config.get("vision_config") or {})
    for tower, what in ((text, "text_config"), (vision, "vision_config")):
        eps = tower.get("layer_norm_eps", 1e-5)
        if abs(eps - LAYER_NORM_EPS) > 1e-12:
            raise ValueError(
                f"{what}.layer_norm_eps={eps} is not supported (clip_jax uses {LAYER_NORM_EPS})"
            )
    if _activation(text, "text_config") != _activation(vision, "vision_config"):
        raise ValueError(
            f"the towers use different activations (text {text.get('hidden_act')},"
            f" vision {vision.get('hidden_act')}), which clip_jax's conversion "
            f"does not support"
        )
    text_width, vision_width = text.get("hidden_size", 512), vision.get("hidden_size", 768)
    return CLIPConfig(
        embed_dim=int(hf_config.get("projection_dim", 512)),
        vision=VisionTransformerConfig(
            image_size=int(vision.get("image_size", 224)),
            patch_size=int(vision.get("patch_size", 32)),
            width=int(vision_width),
            layers=int(vision.get("num_hidden_layers", 12)),
            heads=int(vision.get("num_attention_heads", 12)),
            mlp_ratio=vision.get("intermediate_size", 3072) / vision_width,
            activation=_activation(vision, "vision_config"),
        ),
        text=TextTransformerConfig(
            context_length=int(text.get("max_position_embeddings", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
            width=int(text_width),
            layers=int(text.get("num_hidden_layers", 12)),
            heads=int(text.get("num_attention_heads", 8)),
            mlp_ratio=text.get("intermediate_size", 2048) / text_width,
            activation=_activation(text, "text_config"),
        ),
    )


def config_to_hf(config: CLIPConfig, bos_id: int, eos_id: int) -> dict[str, Any]:
    """config.json of a transformers `CLIPModel` with clip_jax's ViT architecture."""
    if config.vision.type != "vit":
        raise ValueError(
            "transformers has no ModifiedResNet CLIP image tower (CLIPModel is "
            "ViT-only): export ResNet models in open_clip format instead"
        )
    if config.vision.activation != config.text.activation:
        raise ValueError(
            "the towers use different activations, which CLIPConfig.hidden_act "
            "per tower supports but this exporter does not"
        )
    vision, text, dim = config.vision, config.text, config.embed_dim
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": dim,
        "logit_scale_init_value": config.init_logit_scale,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": text.width,
            "intermediate_size": int(round(text.width * text.mlp_ratio)),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "hidden_act": text.activation,
            "layer_norm_eps": LAYER_NORM_EPS,
            "attention_dropout": 0.0,
            "projection_dim": dim,
            # eos_token_id != 2 makes transformers pool at the first end-of-text token.
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": text.pad_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(round(vision.width * vision.mlp_ratio)),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_act": vision.activation,
            "layer_norm_eps": LAYER_NORM_EPS,
            "attention_dropout": 0.0,
            "projection_dim": dim,
        },
    }


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json: shorter side to `image_size` (bicubic), center crop, OpenAI
    mean/std, as clip_jax's evaluation pipeline does."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
        "do_convert_rgb": True,
    }


def bpe_tokenizer_files(context_length: int) -> dict[str, str]:
    """CLIP's BPE as transformers tokenizer files: {file name: text}.

    vocab.json and merges.txt are built from the vocabulary shipped in `clip_jax.tokenizers`
    exactly as OpenAI's tokenizer builds its table (256 bytes, their `</w>` forms, the merges,
    then the two special tokens, ids 49406/49407).
    """
    from clip_jax.tokenizers import bpe

    with gzip.open(bpe.DEFAULT_BPE_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : bpe.NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = list(bpe.bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    return {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
