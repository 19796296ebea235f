"""Import OpenAI / open_clip PyTorch CLIP weights into clip_jax (Flax) variables.

The Flax models use OpenAI's parameter names (see `clip_jax.models.transformer`), so converting
is a renaming plus layout changes:
  * Dense kernels are [in, out] (torch Linear weights are [out, in]);
  * Conv kernels are [kh, kw, in, out] (torch: [out, in, kh, kw]);
  * LayerNorm/BatchNorm `scale` is torch's `weight`; BatchNorm running statistics
    (`running_mean`/`running_var`) go to the `batch_stats` collection as `mean`/`var`;
  * Flax module names `resblocks_{i}`, `layer{s}_{b}`, `downsample_conv`/`downsample_bn` are
    torch's `resblocks.{i}`, `layer{s}.{b}`, `downsample.0`/`downsample.1`.

The architecture is inferred from the tensor shapes, as open_clip's
`build_model_from_openai_state_dict` does. Two things cannot be read from weights:
  * attention heads: the OpenAI convention (64-wide heads; ResNet attention pool
    `width * 32 // 64`) is assumed unless a registry name (or a `CLIPConfig`) is given;
  * the transformer activation (QuickGELU or exact GELU): see `convert_state_dict`'s
    `quick_gelu` argument.

Command line (writes a converted directory, see `clip_jax.model_store`):

    python -m clip_jax.convert --model ViT-B-32 --input ViT-B-32.pt --output /ckpt/vit-b-32
    python -m clip_jax.convert --input pretrained:ViT-B-32/openai --output /ckpt/vit-b-32
    python -m clip_jax.convert --input hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K --output ...
    python -m clip_jax.convert --list-pretrained

(Hub references: see `clip_jax.hub`.)

No code from an input file ever runs: OpenAI's TorchScript archives are read without torch by
`clip_jax.torchscript` (tensors only; `torch.jit.load` would run the archive's code), and
`torch.save` files with `torch.load(weights_only=True)`. torch is needed only for the latter
and is imported lazily.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_jax import torchscript
from clip_jax.models import CLIPConfig, create_model, get_model_config
from clip_jax.models.config import (
    ModifiedResNetConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
)
from clip_jax.models.registry import set_activation

logger = logging.getLogger(__name__)

# Scalars that OpenAI's JIT archives keep in their state dict; they are architecture metadata,
# not parameters (open_clip drops them too). We check them against the inferred config.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Buffers that are not parameters: BatchNorm's update counter (flax uses a fixed momentum) and
# the text tower's causal mask (open_clip registers it non-persistent, but TorchScript archives
# keep every buffer; our attention builds the mask itself).
_IGNORED_SUFFIXES = (".num_batches_tracked", ".attn_mask")
_IGNORED_KEYS = ("attn_mask",)

TOKENIZER_NAME = "clip-bpe"  # OpenAI/open_clip CLIP models all use OpenAI's BPE


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------


def _import_torch(path: str | os.PathLike):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {os.fspath(path)!r} needs torch, which "
            f"is not installed: `pip install torch` (CPU build is enough), or "
            f"convert the file to .safetensors first"
        ) from e
    return torch


def is_torch_jit_archive(path: str | os.PathLike) -> bool:
    """True for a `torch.jit.save` archive (OpenAI's released CLIP `.pt` files).

    Both `torch.save` and `torch.jit.save` write zip files; only TorchScript archives hold a
    `constants.pkl` and `code/` (the serialised program).
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            name.endswith("/constants.pkl") or name == "constants.pkl"
            for name in archive.namelist()
        )


def _read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """(state dict, whether the file is an OpenAI-style TorchScript archive).

    No code from the file runs: TorchScript archives are read by `clip_jax.torchscript` (tensors
    only, no torch needed), `torch.save` files by `torch.load(weights_only=True)`. Every failure
    is a one-line ValueError (or FileNotFoundError / ImportError) naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), False
    if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ValueError(
            f"unsupported checkpoint file {str(path)!r}: expected .pt, .pth, .bin, "
            f".ckpt (PyTorch) or .safetensors"
        )
    if is_torch_jit_archive(path):
        # OpenAI's CLIP releases: the whole TorchScript model; only its tensors are read.
        try:
            return torchscript.read_tensors(path), True
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise ValueError(
                f"cannot read the TorchScript archive {str(path)!r}: {_first_line(e)}"
            ) from e
    torch = _import_torch(path)
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: never load it anyway
        raise ValueError(
            f"refusing to read {str(path)!r}: it holds "
            f"{_refused_global(e)}, which is not a tensor or plain container, and "
            f"clip_jax never runs code from a checkpoint; save the weights as a "
            f"state dict of tensors or as .safetensors"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # damaged or not a torch file
        raise ValueError(
            f"cannot read {str(path)!r} as a PyTorch checkpoint: {_torch_error_text(e)}"
        ) from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a state dict")
    return dict(checkpoint), False


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _refused_global(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, e.g. 'builtins.open' (its own message goes
    on to suggest `weights_only=False`, i.e. running the file's code: never shown)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else "a pickled object"


def _torch_error_text(error: BaseException) -> str:
    """torch's error without its advice to load with `weights_only=False`."""
    text = " ".join(str(error).split())
    for marker in (" In PyTorch 2.6", " Re-running", " Weights only load failed"):
        text = text.split(marker)[0]
    if "weights_only" in text or not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    # The numpy reader needs no torch and reads bfloat16 too (as an ml_dtypes array).
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError(
            f"reading {str(path)!r} needs the `safetensors` package: `pip install safetensors`"
        ) from e
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # truncated or not a safetensors file
        raise ValueError(
            f"cannot read {str(path)!r} as .safetensors (damaged or truncated?): {_first_line(e)}"
        ) from e


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a CLIP state dict: {name: torch tensor or numpy array}.

    Supported: OpenAI's TorchScript archives (`.pt`), `torch.save` files (`.pt`/`.pth`/`.bin`/
    `.ckpt`, read with `weights_only=True`), and `.safetensors`. An open_clip training
    checkpoint `{"state_dict": ..., "epoch": ...}` is unwrapped; a DDP `module.` prefix is left
    for `convert_state_dict` to strip.
    """
    state_dict, _ = _read_checkpoint(path)
    return _unwrap(state_dict)


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # open_clip training checkpoints
    return dict(state_dict)


def to_numpy(value: Any, key: str) -> np.ndarray:
    """torch tensor / numpy array / scalar -> numpy; floating point becomes float32."""
    if hasattr(value, "detach"):  # a torch tensor (torch itself is not imported here)
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # also covers bfloat16, which numpy cannot hold
        value = value.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"state dict entry {key!r} is not an array ({type(value).__name__})"
        ) from e
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


class _Prepared(dict):
    """Marks a state dict already unwrapped, prefix-stripped and converted to numpy."""


def _prepare(state_dict: Mapping[str, Any]) -> "_Prepared":
    state_dict = _unwrap(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # DDP wrapper
    return _Prepared(
        {
            k: to_numpy(v, k)
            for k, v in state_dict.items()
            if not (k.endswith(_IGNORED_SUFFIXES) or k in _IGNORED_KEYS)
        }
    )


# ----------------------------------------------------------------------------------------------
# Architecture inference
# ----------------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(
            f"cannot infer the architecture: the state dict has no {key!r} "
            f"(is this an OpenAI/open_clip CLIP checkpoint?)"
        )
    return sd[key].shape


def _block_indices(sd: Mapping[str, np.ndarray], prefix: str) -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in sd if (m := pattern.match(k))}


def _count_blocks(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    indices = _block_indices(sd, prefix)
    if indices and indices != set(range(max(indices) + 1)):
        raise ValueError(f"blocks {prefix}N are not numbered 0..N-1: found {sorted(indices)}")
    return len(indices)


def _square_grid(tokens: int, key: str) -> int:
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise ValueError(
            f"{key} has {tokens} positions, not a square grid (+1 for the class/mean token)"
        )
    return grid


def infer_config(state_dict: Mapping[str, Any], quick_gelu: bool = False) -> CLIPConfig:
    """The architecture a state dict describes, with OpenAI's head conventions.

    `quick_gelu` picks the transformer activation (it cannot be read from weights).
    """
    sd = state_dict if isinstance(state_dict, _Prepared) else _prepare(state_dict)
    activation = "quick_gelu" if quick_gelu else "gelu"
    if "visual.proj" in sd:
        width, _, patch, patch_w = _shape(sd, "visual.conv1.weight")
        if patch != patch_w:
            raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
        grid = _square_grid(
            _shape(sd, "visual.positional_embedding")[0] - 1, "visual.positional_embedding"
        )
        vision = VisionTransformerConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=max(width // 64, 1),
            mlp_ratio=_shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0] / width,
            activation=activation,
        )
    elif "visual.attnpool.positional_embedding" in sd:
        width = _shape(sd, "visual.layer1.0.conv1.weight")[0]
        grid = _square_grid(
            _shape(sd, "visual.attnpool.positional_embedding")[0] - 1,
            "visual.attnpool.positional_embedding",
        )
        layers = tuple(_count_blocks(sd, f"visual.layer{stage}.") for stage in (1, 2, 3, 4))
        vision = ModifiedResNetConfig(
            image_size=grid * 32, layers=layers, width=width, heads=max(width * 32 // 64, 1)
        )
    else:
        raise ValueError(
            "cannot infer the image tower: the state dict has neither 'visual.proj' "
            "(ViT) nor 'visual.attnpool.positional_embedding' (ModifiedResNet)"
        )
    text_width = _shape(sd, "ln_final.weight")[0]
    text = TextTransformerConfig(
        context_length=_shape(sd, "positional_embedding")[0],
        vocab_size=_shape(sd, "token_embedding.weight")[0],
        width=text_width,
        layers=_count_blocks(sd, "transformer.resblocks."),
        heads=max(text_width // 64, 1),
        mlp_ratio=_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight")[0] / text_width,
        activation=activation,
    )
    logit_bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return CLIPConfig(
        embed_dim=_shape(sd, "text_projection")[1],
        vision=vision,
        text=text,
        init_logit_bias=logit_bias,
    )


# Fields a state dict cannot determine: they come from the reference config when one is given.
_NOT_IN_WEIGHTS = (
    "vision.heads",
    "text.heads",
    "vision.activation",
    "text.activation",
    "text.pad_id",
    "init_logit_scale",
    "init_logit_bias",
)


def config_differences(inferred: CLIPConfig, reference: CLIPConfig) -> list[str]:
    """Human-readable differences of the weight-determined fields, e.g. 'vision.width: 64 != 96'.

    Heads, activation and initial values are not compared (weights do not determine them); the
    presence of a logit bias is.
    """
    a = traverse_util.flatten_dict(inferred.to_dict(), sep=".")
    b = traverse_util.flatten_dict(reference.to_dict(), sep=".")
    diffs = [
        f"{key}: weights have {a.get(key)!r}, config has {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key not in _NOT_IN_WEIGHTS and a.get(key) != b.get(key)
    ]
    has_bias, wants_bias = (
        inferred.init_logit_bias is not None,
        reference.init_logit_bias is not None,
    )
    if has_bias != wants_bias:
        diffs.append(
            f"logit_bias: weights {'have' if has_bias else 'lack'} it, config "
            f"{'has' if wants_bias else 'lacks'} it"
        )
    return diffs


def _resolve_config(
    sd: _Prepared, model_name: str | CLIPConfig | None, quick_gelu: bool | None
) -> CLIPConfig:
    is_openai = any(k in sd for k in OPENAI_METADATA_KEYS)
    if quick_gelu is None:
        if is_openai or (isinstance(model_name, str) and model_name.endswith("-quickgelu")):
            quick_gelu = True
        elif model_name is not None:
            reference = (
                model_name if isinstance(model_name, CLIPConfig) else get_model_config(model_name)
            )
            quick_gelu = reference.text.activation == "quick_gelu"
        else:
            quick_gelu = False
    inferred = infer_config(sd, quick_gelu=quick_gelu)
    if model_name is None:
        config = inferred
    else:
        reference = (
            model_name if isinstance(model_name, CLIPConfig) else get_model_config(model_name)
        )
        diffs = config_differences(inferred, reference)
        if diffs:
            name = model_name if isinstance(model_name, str) else "the given config"
            raise ValueError(f"the state dict does not match {name}: {_listing(diffs, limit=30)}")
        config = set_activation(reference, "quick_gelu" if quick_gelu else "gelu")
        if inferred.init_logit_bias is not None:
            config = dataclasses.replace(config, init_logit_bias=inferred.init_logit_bias)
    _check_openai_metadata(sd, config)
    return config


def _check_openai_metadata(sd: Mapping[str, np.ndarray], config: CLIPConfig) -> None:
    expected = {
        "input_resolution": config.image_size,
        "context_length": config.context_length,
        "vocab_size": config.text.vocab_size,
    }
    for key, value in expected.items():
        if key in sd and int(sd[key]) != value:
            raise ValueError(
                f"state dict metadata {key}={int(sd[key])} contradicts the weights' "
                f"shapes ({key}={value})"
            )


# ----------------------------------------------------------------------------------------------
# Renaming
# ----------------------------------------------------------------------------------------------

_MODULE_RENAMES = (
    (re.compile(r"^resblocks_(\d+)$"), r"resblocks.\1"),
    (re.compile(r"^layer(\d+)_(\d+)$"), r"layer\1.\2"),
    (re.compile(r"^downsample_conv$"), "downsample.0"),
    (re.compile(r"^downsample_bn$"), "downsample.1"),
)


def torch_name(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """Flax variable path -> (torch state-dict key, layout change).

    `path` is e.g. ('params', 'image', 'transformer', 'resblocks_0', 'attn', 'in_proj',
    'kernel'); the layout change is one of 'none', 'linear' (transpose [out, in] -> [in, out])
    or 'conv' ([out, in, kh, kw] -> [kh, kw, in, out]).
    """
    if len(path) == 2:  # top-level parameters: logit_scale, logit_bias
        return path[1], "none"
    collection, tower, *modules, leaf = path
    prefix = {"image": ["visual"], "text": []}[tower]
    names = list(prefix)
    for module in modules:
        for pattern, replacement in _MODULE_RENAMES:
            if pattern.match(module):
                module = pattern.sub(replacement, module)
                break
        names.append(module)
    layout = "none"
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif leaf == "kernel":
        layout = {2: "linear", 4: "conv"}[ndim]
        leaf = "weight"
    elif leaf in ("scale", "embedding"):  # LayerNorm/BatchNorm scale, nn.Embed table
        leaf = "weight"
    if modules and modules[-1] == "in_proj":
        # torch.nn.MultiheadAttention stores the fused q,k,v projection as two raw parameters.
        names.pop()
        leaf = f"in_proj_{leaf}"
    return ".".join(names + [leaf]), layout


def _listing(items: list[str], limit: int = 8) -> str:
    """'a, b, c' on one line; past `limit` items, '... and N more'."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
    return array


def to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> OpenAI / open_clip state dict: the inverse of `convert_state_dict`.

    Returns {torch name: contiguous float32 NumPy array} in torch layouts ([out, in] Linear
    weights, [out, in, kh, kw] convs; BatchNorm `running_mean`/`running_var` from
    `batch_stats`). BatchNorm's `num_batches_tracked` counters are not part of clip_jax's
    variables and are not included.
    """
    state_dict = {}
    for path, leaf in traverse_util.flatten_dict(dict(variables)).items():
        array = np.asarray(jax.device_get(leaf), np.float32)
        key, layout = torch_name(path, array.ndim)
        state_dict[key] = np.array(_to_torch_layout(array, layout), order="C")
    return state_dict


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model_name: str | CLIPConfig | None = None,
    quick_gelu: bool | None = None,
) -> tuple[CLIPConfig, dict[str, Any]]:
    """OpenAI / open_clip PyTorch state dict -> (CLIPConfig, Flax variables).

    Args:
      state_dict: {name: torch tensor or numpy array}, as `model.state_dict()` or
        `load_checkpoint_file` give it (float16/bfloat16 weights are upcast). A DDP `module.`
        prefix and an open_clip `{"state_dict": ...}` wrapper are removed.
      model_name: optional registry name (e.g. "ViT-B-32") or `CLIPConfig`. When given, the
        architecture inferred from the shapes must equal it (a ValueError lists each difference)
        and it supplies what weights cannot tell (attention heads). Without it, heads follow
        OpenAI's convention (head width 64; ResNet attention pool `width * 32 // 64`).
      quick_gelu: the transformer activation, which weights cannot tell. True: QuickGELU
        (OpenAI's released weights and open_clip's `-quickgelu` models need it); False: exact
        GELU (open_clip's own configs). None picks QuickGELU when the state dict carries OpenAI's
        metadata keys (`input_resolution`, ...: OpenAI JIT archives) or `model_name` ends with
        `-quickgelu`, else the activation of `model_name`'s config, else exact GELU. A wrong
        choice does not fail here: it silently changes the outputs, so pass it explicitly when
        you know it.

    Returns:
      The config and `{"params": {"image", "text", "logit_scale"[, "logit_bias"]}` plus
      `"batch_stats"` for ResNets}` holding float32 `jax.Array`s; use with
      `create_model(config)`.

    Raises:
      ValueError: the state dict does not fill every Flax variable exactly once; the message
        lists missing keys, unexpected keys and shape mismatches (both shapes).
    """
    sd = _prepare(state_dict)
    config = _resolve_config(sd, model_name, quick_gelu)
    model = create_model(config)
    abstract = jax.eval_shape(model.init_variables, jax.random.key(0))
    flat_abstract = traverse_util.flatten_dict(abstract)

    expected: dict[str, tuple[tuple[str, ...], str]] = {}
    for path, leaf in flat_abstract.items():
        key, layout = torch_name(path, leaf.ndim)
        if key in expected:  # a naming bug would make two Flax variables read one tensor
            raise AssertionError(f"{key!r} maps to both {expected[key][0]} and {path}")
        expected[key] = (path, layout)

    present = set(sd) - set(OPENAI_METADATA_KEYS)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    mismatched, flat = [], {}
    for key, (path, layout) in expected.items():
        if key not in sd:
            continue
        value = _to_flax_layout(sd[key], layout)
        want = flat_abstract[path].shape
        if value.shape != want:
            mismatched.append(
                f"{key}: checkpoint {tuple(sd[key].shape)} (as Flax "
                f"{tuple(value.shape)}), model expects {tuple(want)} for "
                f"{'/'.join(path)}"
            )
            continue
        flat[path] = jnp.asarray(value, dtype=flat_abstract[path].dtype)
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {title}: {_listing(items)}"
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ValueError("the state dict does not match the model: " + "; ".join(problems))
    return config, traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def convert_file(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_name: str | None = None,
    quick_gelu: bool | None = None,
    overwrite: bool = False,
) -> tuple[CLIPConfig, Path]:
    """Read a checkpoint file, convert it and save it with `model_store.save_converted`.

    `input_path` may also be a Hub reference (`hf-hub:ORG/NAME[@REV]`, `pretrained:ARCH/TAG`,
    see `clip_jax.hub`); its config fixes the architecture, so `model_name` and `quick_gelu`
    must then be None. `quick_gelu=None` means QuickGELU for OpenAI TorchScript archives (their
    released weights need it), otherwise as in `convert_state_dict`.
    """
    # hub imports convert; orbax is imported only when saving.
    from clip_jax import hub, model_store

    if hub.is_reference(input_path):
        if model_name is not None or quick_gelu is not None:
            raise ValueError(
                f"{input_path}: the repo's config sets the architecture and "
                f"activation; --model/--quick-gelu apply to checkpoint files only"
            )
        config, variables, source = hub.load(input_path)
        directory = model_store.save_converted(
            output_dir, config, variables, source, overwrite, tokenizer=TOKENIZER_NAME
        )
        return config, directory
    state_dict, is_jit = _read_checkpoint(input_path)
    if quick_gelu is None and is_jit:
        quick_gelu = True
    config, variables = convert_state_dict(state_dict, model_name, quick_gelu=quick_gelu)
    directory = model_store.save_converted(
        output_dir,
        config,
        variables,
        os.path.abspath(input_path),
        overwrite,
        tokenizer=TOKENIZER_NAME,
    )
    return config, directory


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr: `fail(status, message)`; usage errors
    exit with status 2."""

    def error(self, message: str):
        self.fail(2, f"{message} (see --help)")

    def fail(self, status: int, message: str):
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        sys.exit(status)


def one_line(error: BaseException | str, limit: int = 800) -> str:
    """An error message squeezed onto one line (whitespace runs become one space)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> None:
    """Command line. Every error is one line on stderr: exit status 2 for bad arguments
    (missing input, existing output, unknown --model), 1 when the file cannot be converted."""
    parser = OneLineParser(
        prog="python -m clip_jax.convert",
        description="Convert an OpenAI / open_clip PyTorch CLIP checkpoint to a clip_jax orbax "
        "checkpoint directory. No code from the input file is run.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="registry name to check the weights against (e.g. ViT-B-32, "
        "RN50-quickgelu); default: infer the architecture from the weights",
    )
    parser.add_argument(
        "--input",
        help="checkpoint: OpenAI .pt (TorchScript), .pt/.pth/.bin/.ckpt "
        "(torch.save), .safetensors, or a Hub reference "
        "hf-hub:ORG/NAME[@REVISION] / pretrained:ARCH/TAG",
    )
    parser.add_argument("--output", help="output directory")
    parser.add_argument(
        "--list-pretrained",
        action="store_true",
        help="list the pretrained:ARCH/TAG names and their Hub repos, then exit",
    )
    parser.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="QuickGELU (OpenAI weights) vs exact GELU; default: QuickGELU for "
        "OpenAI TorchScript archives and -quickgelu names, else the model's",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    args = parser.parse_args(argv)
    from clip_jax import hub  # hub imports convert

    if args.list_pretrained:
        print("\n".join(hub.list_pretrained()))
        return
    missing = [f"--{name}" for name in ("input", "output") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    # orbax logs every save step at INFO through absl; keep the CLI output to what matters.
    logging.basicConfig(level=logging.WARNING)
    logger.setLevel(logging.INFO)
    if hub.is_reference(args.input):
        if args.model is not None or args.quick_gelu is not None:
            parser.fail(
                2,
                f"--input {args.input}: the repo's config sets the architecture; "
                f"--model/--quick-gelu apply to checkpoint files only",
            )
        try:
            hub.parse(args.input)
        except hub.HubError as e:
            parser.fail(2, f"--input: {e}")
    elif not os.path.isfile(args.input):
        parser.fail(2, f"--input {args.input!r}: no such file{hub.name_hint(args.input)}")
    output = Path(args.output)
    if output.exists() and not args.overwrite and (not output.is_dir() or any(output.iterdir())):
        parser.fail(
            2,
            f"--output {args.output!r} already exists and is not empty; pass "
            f"--overwrite to replace it",
        )
    if args.model is not None:
        try:
            get_model_config(args.model)
        except ValueError as e:
            parser.fail(2, f"--model: {e}")
    try:
        config, directory = convert_file(
            args.input, args.output, args.model, args.quick_gelu, args.overwrite
        )
    except (ValueError, OSError, ImportError) as e:
        parser.fail(1, str(e))
    print(
        f"wrote {directory} ({config.vision.type}, embed_dim {config.embed_dim}, image "
        f"{config.image_size}px, activation {config.text.activation})"
    )


if __name__ == "__main__":
    main()
