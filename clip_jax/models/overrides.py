"""Architecture fields in the training config: `config.model.{embed_dim, vision.*, text.*}`.

A run names an architecture (`config.model.name`) and may replace any of its fields, e.g.

    --config.model.embed_dim=64 --config.model.vision.width=64 --config.model.text.layers=2

`add_fields(config.model)` adds every field of the registry's dataclasses
(`clip_jax/models/config.py`) as an unset (None) typed placeholder: unset means "the named
architecture's value". `vision.*` holds the fields of both image towers (ViT:
image_size, patch_size, width, layers, heads, mlp_ratio, activation; ModifiedResNet:
image_size, layers as 4 stage depths `'(3, 4, 6, 3)'`, width, heads); a field the named
tower lacks is an error naming it. `resolve(config.model)` gives the set fields as
`get_model_config` overrides.

Two fields are input sizes rather than architecture: `vision.image_size` and
`text.context_length` (`INPUT_SIZES`). They may also be set when the architecture comes from
loaded weights (`init_from`): the weights' positional embeddings then follow them (resized
image grid, truncated text context; `clip_jax/models/resize.py`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from clip_jax.models import config as config_lib
from clip_jax.models import registry

TOWERS = ("vision", "text")
# Fields the config cannot set: the tower type follows model.name; the towers are blocks.
_NOT_SETTABLE = ("type", "vision", "text")
# Input sizes: settable with init_from weights too (their positional embeddings are adapted).
INPUT_SIZES = ("vision.image_size", "text.context_length")
# Config keys that were replaced by an architecture field: named in unknown-key errors.
RENAMED = {
    "model.image_size": "model.vision.image_size",
    "model.context_length": "model.text.context_length",
}


def _placeholder_type(hint: Any) -> type:
    """The ConfigDict field type for a dataclass annotation: int, float, str, tuple."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):  # `float | None`: the non-None member
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return _placeholder_type(members[0]) if len(members) == 1 else object
    if origin is tuple:
        return tuple
    return hint


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: _placeholder_type(hints[f.name])
        for f in dataclasses.fields(cls)
        if f.name not in _NOT_SETTABLE
    }


def _merged(*types_by_field: dict[str, type]) -> dict[str, type]:
    """Union of the fields; a field typed differently by the towers (ViT `layers` int,
    ResNet `layers` tuple) takes any literal (`object`)."""
    out: dict[str, type] = {}
    for fields in types_by_field:
        for name, kind in fields.items():
            out[name] = kind if out.get(name, kind) is kind else object
    return out


FIELDS = {
    "": _field_types(config_lib.CLIPConfig),
    "vision": _merged(
        _field_types(config_lib.VisionTransformerConfig),
        _field_types(config_lib.ModifiedResNetConfig),
    ),
    "text": _field_types(config_lib.TextTransformerConfig),
}


def add_fields(model_block: ml_collections.ConfigDict) -> None:
    """Adds every architecture field to `model_block` (config.model), unset (None)."""
    for name, kind in FIELDS[""].items():
        model_block[name] = config_dict.placeholder(kind)
    for tower in TOWERS:
        model_block[tower] = ml_collections.ConfigDict(
            {name: config_dict.placeholder(kind) for name, kind in FIELDS[tower].items()}
        )


def set_fields(model_block) -> dict[str, Any]:
    """The architecture fields set in `model_block`, by dotted name ("vision.width": 64)."""
    out = {k: model_block[k] for k in FIELDS[""] if model_block.get(k) is not None}
    for tower in TOWERS:
        block = model_block.get(tower) or {}
        out.update({f"{tower}.{k}": v for k, v in block.items() if v is not None})
    return out


def input_sizes(model_block) -> tuple[int | None, int | None]:
    """(vision.image_size, text.context_length) set in `model_block`; None where unset."""
    changes = set_fields(model_block)
    return tuple(changes.get(key) for key in INPUT_SIZES)


def renamed_hint(key: str) -> str:
    """ " (now KEY)" when `key` (dotted, with or without "config.") was replaced; else ""."""
    new = RENAMED.get(key.removeprefix("config."))
    return f" (now {new})" if new else ""


def resolve(model_block) -> dict[str, Any]:
    """The fields set in `model_block` as `get_model_config(model_block.name, **overrides)`
    overrides ({"embed_dim": 64, "vision": {"width": 64}}), checked against the named
    architecture: raises ValueError naming the key (`config.model.vision.patch_size=8: ...`)."""
    name = model_block.name
    base = registry.get_model_config(name)
    changes = set_fields(model_block)
    overrides: dict[str, Any] = {}
    for key, value in changes.items():
        tower, _, field = key.rpartition(".")
        target = getattr(base, tower) if tower else base
        known = [f.name for f in dataclasses.fields(target) if f.name not in _NOT_SETTABLE]
        if field not in known:
            what = f"the {target.type} tower" if tower == "vision" else f"the {tower} tower"
            raise ValueError(
                f"config.model.{key}={value!r}: {what} of {name!r} has no such field; "
                f"it has {', '.join(known)}"
            )
        default = getattr(target, field)
        if default is not None:
            value = _check_type(key, value, type(default))
        (overrides.setdefault(tower, {}) if tower else overrides)[field] = value
    try:
        registry.get_model_config(name, **overrides)
    except ValueError as e:
        settings = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        raise ValueError(f"config.model ({name} with {settings}): {e}") from None
    return overrides


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is tuple and isinstance(value, (tuple, list)):
        return tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
        return value
    raise ValueError(f"config.model.{key}={value!r}: must be {expected.__name__}")
