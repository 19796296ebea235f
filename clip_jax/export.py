"""Use a clip_jax model from PyTorch: export it in open_clip's or transformers' format.

    python -m clip_jax.export --from runs/tiny --format open_clip --output exported/tiny
    python -m clip_jax.export --from runs/tiny --step 2000 --format hf --output exported/tiny-hf

`--from` is a training workdir (its latest checkpoint, or `--step` / `WORKDIR@STEP`), a
`python -m clip_jax.convert` output directory, or a Hub reference (see `clip_jax.model_store`).

  * `--format open_clip` writes `open_clip_config.json` + `open_clip_model.safetensors`:
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exported/tiny")
    ViT and ModifiedResNet towers, BatchNorm running statistics included (BatchNorm's
    `num_batches_tracked` counters, which clip_jax does not keep, are written as 0).
  * `--format hf` writes a transformers CLIPModel directory (config.json, model.safetensors,
    CLIP BPE tokenizer files made from the vocabulary shipped in `clip_jax.tokenizers`,
    preprocessor_config.json):
        model = transformers.CLIPModel.from_pretrained("exported/tiny-hf")
        processor = transformers.CLIPProcessor.from_pretrained("exported/tiny-hf")
    transformers' CLIP has ViT towers only, so ResNet models are refused. It has no logit
    bias either: a SigLIP-trained bias is dropped with a warning (embeddings are unaffected).

Both formats need the model's tokenizer to be OpenAI's CLIP BPE (what open_clip and the
exported tokenizer files use). The output directory must not exist: it is written under a
temporary name and renamed when complete, so a failed export leaves nothing behind. Only
NumPy, safetensors and the standard library are used: torch is not needed to export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax import convert, hf_format, open_clip_format

logger = logging.getLogger(__name__)

FORMATS = ("open_clip", "hf")


class ExportError(ValueError):
    """The model cannot be exported in the asked format; the message is one line."""


def _save_safetensors(state_dict: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # transformers refuses safetensors files without the {"format": "pt"} metadata.
    save_file(
        {k: np.require(v, requirements="C") for k, v in state_dict.items()},
        str(path),
        metadata={"format": "pt"},
    )


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _write_open_clip(directory: Path, config, state_dict: dict[str, np.ndarray]) -> None:
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".running_mean")]:
        # open_clip's strict load_state_dict expects BatchNorm's update counter.
        state_dict[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    _write_json(
        directory / open_clip_format.CONFIG_FILE,
        {
            "model_cfg": open_clip_format.config_to_open_clip(config),
            "preprocess_cfg": open_clip_format.preprocess_to_open_clip(config.image_size),
        },
    )
    _save_safetensors(state_dict, directory / open_clip_format.WEIGHTS_FILE)


def _write_hf(directory: Path, config, state_dict: dict[str, np.ndarray], tokenizer) -> None:
    hf_config = hf_format.config_to_hf(config, tokenizer.sot_id, tokenizer.eot_id)
    if "logit_bias" in state_dict:
        logger.warning(
            "transformers' CLIPModel has no logit bias: the model's logit_bias %.4g "
            "is not exported (embeddings are unaffected)",
            float(state_dict["logit_bias"]),
        )
        state_dict = {k: v for k, v in state_dict.items() if k != "logit_bias"}
    _write_json(directory / hf_format.CONFIG_FILE, hf_config)
    _save_safetensors(hf_format.state_dict_to_hf(state_dict), directory / "model.safetensors")
    _write_json(
        directory / hf_format.PREPROCESSOR_FILE, hf_format.preprocessor_config(config.image_size)
    )
    for name, text in hf_format.bpe_tokenizer_files(config.context_length).items():
        (directory / name).write_text(text, encoding="utf-8")


def export(
    source: str | os.PathLike, fmt: str, output: str | os.PathLike, step: int | None = None
) -> Path:
    """Writes the model of `source` (workdir, converted dir or Hub reference) to `output` in
    `fmt` ("open_clip" or "hf"); returns the output directory.

    Raises ExportError (one line) for an unsupported model/format, FileExistsError when
    `output` exists, and `clip_jax.checkpoint.CheckpointError` for a bad source.
    """
    import jax

    from clip_jax import model_store, tokenizers

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    output = Path(output).absolute()
    if output.exists():
        raise FileExistsError(f"{output} already exists; export writes a new directory")
    restored = model_store.load_model(
        source, step, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    )
    if restored.tokenizer.strip().lower() not in tokenizers.CLIP_BPE_NAMES:
        raise ExportError(
            f"the model uses the tokenizer {restored.tokenizer!r}; open_clip and "
            f"transformers exports need OpenAI's CLIP BPE ('clip-bpe')"
        )
    if fmt == "hf" and restored.config.vision.type != "vit":
        raise ExportError(
            "transformers has no ModifiedResNet image tower (its CLIPModel is "
            "ViT-only): export ResNet models with --format open_clip"
        )
    state_dict = convert.to_state_dict(restored.variables)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        if fmt == "open_clip":
            _write_open_clip(tmp, restored.config, state_dict)
        else:
            _write_hf(tmp, restored.config, state_dict, tokenizers.get(restored.tokenizer))
        os.rename(tmp, output)  # fails rather than replace a directory created meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step_text = "" if restored.step is None else f" (step {restored.step})"
    logger.info("exported %s%s to %s (%s format)", source, step_text, output, fmt)
    return output


def main(argv: list[str] | None = None) -> None:
    """Command line; errors are one line on stderr (exit status 2: arguments, 1: export)."""
    from clip_jax.checkpoint import CheckpointError

    parser = convert.OneLineParser(
        prog="python -m clip_jax.export",
        description="Export a clip_jax model (training workdir or converted weights) for "
        "open_clip or transformers.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="training workdir, clip_jax.convert output, or hf-hub:/pretrained: reference",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="open_clip: open_clip_config.json + open_clip_model.safetensors; "
        "hf: transformers CLIPModel + CLIPProcessor files",
    )
    parser.add_argument("--output", required=True, help="new output directory")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a workdir (default: the latest)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # the "wrote ..." line below says what was done
    if os.path.exists(args.output):
        parser.fail(2, f"--output {args.output!r} already exists; export writes a new directory")
    from clip_jax import model_store

    try:
        model_store.locate(args.source)
    except CheckpointError as e:
        parser.fail(2, f"--from: {e}")
    try:
        directory = export(args.source, args.format, args.output, args.step)
    except (ExportError, CheckpointError, ValueError, OSError, ImportError) as e:
        parser.fail(1, str(e))
    print(f"wrote {directory} ({args.format} format)")


if __name__ == "__main__":
    main()
