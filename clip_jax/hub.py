"""Pretrained CLIP weights by name, from the Hugging Face Hub.

Wherever clip_jax takes a weights path it also takes

    hf-hub:ORG/NAME[@REVISION]      a Hub model repo (branch, tag or commit; default main)
    pretrained:ARCH/TAG             a well-known name, e.g. pretrained:ViT-B-32/openai
                                    (`python -m clip_jax.convert --list-pretrained`)

Two repo layouts are read: open_clip's (`open_clip_config.json` + `open_clip_model.safetensors`
or `open_clip_pytorch_model.bin`; preferred when both are present) and transformers' CLIP
(`config.json` of a `CLIPModel` + `model.safetensors` or `pytorch_model.bin`; ViT towers only).

Files are fetched with `huggingface_hub.hf_hub_download` into its usual cache, so
`HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE=1` and `HF_TOKEN` behave as with open_clip and
transformers. Nothing is downloaded at import time; only the files needed are downloaded (one
config, one weights file). Weights are read without running code from them (see
`clip_jax.convert`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from clip_jax import convert, hf_format, open_clip_format
from clip_jax.models import CLIPConfig

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
PRETRAINED_PREFIX = "pretrained:"
TOKENIZER = convert.TOKENIZER_NAME  # every supported layout uses OpenAI's CLIP BPE


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A well-known checkpoint: its Hub repo and whether it was trained with QuickGELU (used
    when the repo's config does not say)."""

    repo_id: str
    quick_gelu: bool = False


# open_clip's pretrained.py names (`ARCH/TAG`) and Hub repos. Only checkpoints that use
# OpenAI's image normalisation (which clip_jax's pipelines apply) are listed.
PRETRAINED: dict[str, Pretrained] = {
    "RN50/openai": Pretrained("timm/resnet50_clip.openai", quick_gelu=True),
    "RN101/openai": Pretrained("timm/resnet101_clip.openai", quick_gelu=True),
    "RN50x4/openai": Pretrained("timm/resnet50x4_clip.openai", quick_gelu=True),
    "RN50x16/openai": Pretrained("timm/resnet50x16_clip.openai", quick_gelu=True),
    "RN50x64/openai": Pretrained("timm/resnet50x64_clip.openai", quick_gelu=True),
    "ViT-B-32/openai": Pretrained("timm/vit_base_patch32_clip_224.openai", quick_gelu=True),
    "ViT-B-16/openai": Pretrained("timm/vit_base_patch16_clip_224.openai", quick_gelu=True),
    "ViT-L-14/openai": Pretrained("timm/vit_large_patch14_clip_224.openai", quick_gelu=True),
    "ViT-L-14-336/openai": Pretrained("timm/vit_large_patch14_clip_336.openai", quick_gelu=True),
    "ViT-B-32/laion400m_e32": Pretrained(
        "timm/vit_base_patch32_clip_224.laion400m_e32", quick_gelu=True
    ),
    "ViT-B-32/laion2b_s34b_b79k": Pretrained("laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    "ViT-B-16/laion2b_s34b_b88k": Pretrained("laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "ViT-B-32/datacomp_xl_s13b_b90k": Pretrained("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    "ViT-L-14/datacomp_xl_s13b_b90k": Pretrained("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
}

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(ValueError):
    """A Hub reference cannot be resolved, fetched or read; the message is one line."""


def is_reference(source: Any) -> bool:
    """True for `hf-hub:...` and `pretrained:...` strings (not for local paths)."""
    return isinstance(source, str) and source.startswith((HF_HUB_PREFIX, PRETRAINED_PREFIX))


def name_hint(path: str) -> str:
    """A hint for messages about a path that does not exist: when `path` is a bare well-known
    name such as "ViT-B-32/openai", " (pretrained weights are named pretrained:NAME)"; else "".
    """
    if path in PRETRAINED:
        return f" (pretrained weights are named pretrained:{path})"
    return ""


def list_pretrained() -> list[str]:
    """'pretrained:ARCH/TAG -> hf-hub:REPO' lines, sorted by name."""
    return [
        f"{PRETRAINED_PREFIX}{name}  ->  {HF_HUB_PREFIX}{entry.repo_id}"
        for name, entry in sorted(PRETRAINED.items())
    ]


def parse(reference: str) -> tuple[str, str | None, bool | None]:
    """(repo id, revision or None, QuickGELU hint or None) of a reference; HubError if bad."""
    if reference.startswith(PRETRAINED_PREFIX):
        name = reference[len(PRETRAINED_PREFIX) :]
        if name not in PRETRAINED:
            raise HubError(
                f"unknown pretrained name {name!r}; known: "
                f"{', '.join(sorted(PRETRAINED))} (or use hf-hub:ORG/NAME)"
            )
        return PRETRAINED[name].repo_id, None, PRETRAINED[name].quick_gelu
    if not reference.startswith(HF_HUB_PREFIX):
        raise HubError(
            f"{reference!r} is not a Hub reference (hf-hub:ORG/NAME[@REVISION] or "
            f"pretrained:ARCH/TAG)"
        )
    repo_id, at, revision = reference[len(HF_HUB_PREFIX) :].partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise HubError(f"{reference!r}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    hint = next((e.quick_gelu for e in PRETRAINED.values() if e.repo_id == repo_id), None)
    return repo_id, revision or None, hint


@dataclasses.dataclass(frozen=True)
class HubFiles:
    """Local paths of one repo snapshot's config and weights."""

    reference: str
    repo_id: str
    commit: str  # the snapshot's commit hash
    layout: str  # "open_clip" or "transformers"
    config_path: Path
    weights_path: Path
    preprocessor_path: Path | None  # transformers' preprocessor_config.json, when present

    @property
    def source(self) -> str:
        """`hf-hub:ORG/NAME@COMMIT`: pins exactly what was read."""
        return f"{HF_HUB_PREFIX}{self.repo_id}@{self.commit}"


def _cache_location(repo_id: str) -> str:
    """Where huggingface_hub caches the repo (read at call time: tests and users may change
    `huggingface_hub.constants.HF_HUB_CACHE`)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(
        constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model")
    )


def _download(
    reference: str, repo_id: str, filename: str, revision: str | None, unreachable: list[str]
) -> Path | None:
    """The file's local path, or None when the repo (or, offline, the cache) lacks it.

    Online, huggingface_hub answers "not in the cache" also when the Hub cannot be reached (no
    network, a proxy, an outage); the reason is then appended to `unreachable` and None is
    returned, so that a layout already in the cache is still found and the final error can say
    that the Hub was unreachable rather than that the repo lacks the file. Once it was
    unreachable, only the cache is looked at: huggingface_hub retries an unreachable Hub for
    ~23 s per missing file (5 retries, 1-8 s apart).
    """
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError as e:
        raise ImportError(
            f"{reference} needs the `huggingface_hub` package: `pip install huggingface_hub`"
        ) from e
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, local_files_only=bool(unreachable)
            )
        )
    except errors.LocalEntryNotFoundError as e:  # not in the cache (offline or unreachable)
        if not _offline():
            unreachable.append(convert.one_line(e.__cause__ or e, 200))
        return None
    except errors.EntryNotFoundError:  # the repo has no such file
        return None
    except errors.RevisionNotFoundError as e:
        raise HubError(f"{reference}: the repo has no revision {revision!r}") from e
    except errors.RepositoryNotFoundError as e:  # also gated/private repos
        raise HubError(
            f"{reference}: no model repo {repo_id!r} on the Hugging Face Hub (if it "
            f"is private or gated, log in with `hf auth login` or set HF_TOKEN)"
        ) from e
    except (errors.HfHubHTTPError, OSError) as e:  # network, disk
        raise HubError(
            f"{reference}: cannot download {filename}: {convert.one_line(e, 300)}"
        ) from e


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch(reference: str) -> HubFiles:
    """Downloads (or finds in the cache) the config and weights of a Hub reference.

    Raises HubError with one line naming the repo (and, offline or when the Hub cannot be
    reached, the cache path) when the repo, revision or files are missing.
    """
    repo_id, revision, _ = parse(reference)
    location = _cache_location(repo_id)
    if _offline():
        if not os.path.isdir(location):
            raise HubError(
                f"{reference}: {repo_id} is not in the Hugging Face cache (no "
                f"{location}) and HF_HUB_OFFLINE=1 forbids downloading it"
            )
        rev = revision or "main"
        if not any(
            os.path.exists(os.path.join(location, sub, rev)) for sub in ("refs", "snapshots")
        ):
            raise HubError(
                f"{reference}: revision {rev} of {repo_id} is not in the Hugging Face "
                f"cache {location} and HF_HUB_OFFLINE=1 forbids downloading it"
            )
    unreachable: list[str] = []  # why the Hub could not be asked (online only)

    def where() -> str:
        if _offline():
            return f" in the cache {location} (HF_HUB_OFFLINE=1; revision {revision or 'main'})"
        if unreachable:
            return (
                f" in the cache {location}, and the Hugging Face Hub cannot be reached "
                f"({unreachable[0]}; HF_HUB_OFFLINE=1 uses the cache only)"
            )
        return " in the repo"

    for layout, config_name, weight_names in (
        ("open_clip", open_clip_format.CONFIG_FILE, open_clip_format.WEIGHT_FILES),
        ("transformers", hf_format.CONFIG_FILE, hf_format.WEIGHT_FILES),
    ):
        config_path = _download(reference, repo_id, config_name, revision, unreachable)
        if config_path is None:
            continue
        for weights_name in weight_names:
            weights_path = _download(reference, repo_id, weights_name, revision, unreachable)
            if weights_path is not None:
                break
        else:
            raise HubError(
                f"{reference}: {config_name} is there but none of "
                f"{', '.join(weight_names)}{where()}"
            )
        preprocessor = (
            _download(reference, repo_id, hf_format.PREPROCESSOR_FILE, revision, unreachable)
            if layout == "transformers"
            else None
        )
        return HubFiles(
            reference,
            repo_id,
            config_path.parent.name,
            layout,
            config_path,
            weights_path,
            preprocessor,
        )
    raise HubError(
        f"{reference}: neither {open_clip_format.CONFIG_FILE} (open_clip) nor "
        f"{hf_format.CONFIG_FILE} (transformers CLIPModel) of {repo_id}{where()}"
    )


def _read_json(path: Path, reference: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{reference}: cannot read {path.name}: {convert.one_line(e, 200)}") from e
    if not isinstance(value, dict):
        raise HubError(f"{reference}: {path.name} is not a JSON object")
    return value


def read(files: HubFiles, quick_gelu: bool | None = None) -> tuple[CLIPConfig, dict[str, Any]]:
    """(CLIPConfig from the repo's config, state dict in OpenAI/open_clip names)."""
    reference = files.reference
    config_json = _read_json(files.config_path, reference)
    try:
        if files.layout == "open_clip":
            if not isinstance(config_json.get("model_cfg"), dict):
                raise ValueError(f"{files.config_path.name} has no model_cfg")
            model_cfg = config_json["model_cfg"]
            config = open_clip_format.config_from_open_clip(model_cfg, quick_gelu)
            open_clip_format.check_preprocess(config_json.get("preprocess_cfg") or {}, reference)
            state_dict = convert.load_checkpoint_file(files.weights_path)
            if model_cfg.get("custom_text"):  # CustomTextCLIP keeps the text tower in `text.`
                state_dict = {
                    k[len("text.") :] if k.startswith("text.") else k: v
                    for k, v in state_dict.items()
                }
        else:
            config = hf_format.config_from_hf(config_json)
            if files.preprocessor_path is not None:
                processor = _read_json(files.preprocessor_path, reference)
                open_clip_format.check_preprocess(
                    {
                        "mean": processor.get("image_mean", hf_format.OPENAI_MEAN),
                        "std": processor.get("image_std", hf_format.OPENAI_STD),
                    },
                    reference,
                )
            state_dict = hf_format.state_dict_from_hf(
                {
                    k: convert.to_numpy(v, k)
                    for k, v in convert.load_checkpoint_file(files.weights_path).items()
                }
            )
    except (ValueError, OSError) as e:  # bad config or weights; a vanished cache file
        raise HubError(f"{reference}: {convert.one_line(e)}") from e
    return config, state_dict


def load(reference: str) -> tuple[CLIPConfig, dict[str, Any], str]:
    """(CLIPConfig, float32 Flax variables, pinned source `hf-hub:ORG/NAME@COMMIT`).

    The state dict must match the repo's config exactly (`convert.convert_state_dict` with the
    config as reference); the tokenizer is always OpenAI's CLIP BPE (`TOKENIZER`).
    """
    _, _, hint = parse(reference)
    files = fetch(reference)
    config, state_dict = read(files, quick_gelu=hint)
    try:
        config, variables = convert.convert_state_dict(
            state_dict, config, quick_gelu=config.text.activation == "quick_gelu"
        )
    except ValueError as e:
        raise HubError(f"{reference}: {convert.one_line(e)}") from e
    logger.info("loaded %s (%s layout, %s)", files.source, files.layout, files.weights_path.name)
    return config, variables, files.source
