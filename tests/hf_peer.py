"""transformers' CLIPModel as a reference implementation, and a hand-built offline Hub cache.

Import only from tests that need torch/transformers (test-only dependencies).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch


def make_hf_clip(hidden_act: str = "quick_gelu", seed: int = 0, logit_scale: float = 3.1):
    """A random-init tiny transformers CLIPModel (ViT 32 px / patch 8, context 16) in eval mode."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tower = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act=hidden_act,
    )
    config = CLIPConfig(
        text_config=dict(tower, max_position_embeddings=16),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=48,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    return model


def _features(output) -> np.ndarray:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is projected.
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).numpy()


def hf_encode(model, images: np.ndarray | None, tokens: np.ndarray | None):
    """get_image_features([B, 3, H, W] float32) and get_text_features([B, L] ids) as numpy."""
    with torch.no_grad():
        image = (
            None
            if images is None
            else _features(model.get_image_features(pixel_values=torch.from_numpy(images)))
        )
        text = (
            None
            if tokens is None
            else _features(model.get_text_features(input_ids=torch.from_numpy(tokens).long()))
        )
    return image, text


def add_hub_repo(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes | str],
    ref: str = "main",
    commit: str | None = None,
) -> str:
    """Writes one snapshot of `repo_id` into a Hugging Face cache the way huggingface_hub lays
    it out (`models--ORG--NAME/refs/REF` holding the commit, `snapshots/COMMIT/FILE`).
    Returns the commit hash (derived from the content unless given)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    if commit is None:
        digest = hashlib.sha1(repo_id.encode() + ref.encode())
        for name in sorted(files):
            content = files[name]
            digest.update(content if isinstance(content, bytes) else content.encode())
        commit = digest.hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = snapshot / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


def open_clip_repo_files(
    model,
    model_cfg: dict,
    weights: str = "open_clip_model.safetensors",
    preprocess_cfg: dict | None = None,
) -> dict[str, bytes | str]:
    """The files of an open_clip Hub repo for `model` (an open_clip CLIP)."""
    import io

    from safetensors.torch import save

    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        data = save(state_dict)
    else:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        data = buffer.getvalue()
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg
        or {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    return {"open_clip_config.json": json.dumps(config), weights: data}


def hf_repo_files(model, tmp_dir: Path) -> dict[str, bytes]:
    """The files `CLIPModel.save_pretrained` writes (config.json, model.safetensors)."""
    model.save_pretrained(tmp_dir)
    return {p.name: p.read_bytes() for p in tmp_dir.iterdir() if p.is_file()}
