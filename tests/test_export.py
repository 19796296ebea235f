"""Export to open_clip and transformers (clip_jax.export): exact round trips, embedding parity,
a trained workdir, refusals. Random-init peers, no downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from hf_peer import hf_encode  # noqa: E402
from open_clip_peer import jax_encode, make_small_model, random_images, random_tokens, torch_encode  # noqa: E402

from clip_jax import convert, export, model_store, tokenizers  # noqa: E402
from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD  # noqa: E402

TOL = 1e-4
TEXT_CFG = dict(context_length=16, width=64, heads=2, layers=2)
VIT_CFG = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
RN_CFG = dict(image_size=64, layers=[1, 2, 1, 1], width=16, head_width=128)
TEXTS = [
    "a photo of a cat",
    "Hello, World! it's 3.5 dogs",
    "a very long sentence that will surely be cut off by the context length",
]


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    assert np.std(ref) > 1e-3, f"{what}: reference output is degenerate"
    err = float(np.max(np.abs(ours - ref)))
    print(f"{what}: max abs error {err:.2e}, max abs value {np.abs(ref).max():.3g}")
    assert err < TOL, f"{what}: max abs error {err:.3g}"


def _converted(tmp_path: Path, vision_cfg: dict, quick_gelu: bool):
    """(open_clip model, config, variables, converted dir) for a random-init tiny model."""
    model = make_small_model(
        48, vision_cfg, TEXT_CFG, quick_gelu=quick_gelu, seed=7, logit_scale=2.9
    )
    config, variables = convert.convert_state_dict(model.state_dict(), quick_gelu=quick_gelu)
    directory = model_store.save_converted(tmp_path / "converted", config, variables)
    return model, config, variables, directory


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_open_clip_export_round_trips_exactly(tmp_path, tower):
    from safetensors.numpy import load_file

    vision_cfg = VIT_CFG if tower == "vit" else RN_CFG
    original, config, variables, directory = _converted(tmp_path, vision_cfg, tower == "vit")
    out = export.export(directory, "open_clip", tmp_path / "exported")
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    saved = load_file(str(out / "open_clip_model.safetensors"))
    assert saved["logit_scale"].shape == ()  # 0-d stays 0-d, as open_clip stores it

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    reference, loaded = original.state_dict(), model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        if key.endswith("num_batches_tracked"):  # a counter clip_jax does not keep: written 0
            assert int(loaded[key]) == 0 and key in saved
            continue
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == OPENAI_MEAN and tuple(normalize.std) == OPENAI_STD

    images = random_images(2, config.image_size, seed=5)
    tokens = open_clip.tokenize(TEXTS, context_length=16).numpy().astype(np.int32)
    ref_image, ref_text = torch_encode(model, images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    _assert_close(image, ref_image, f"{tower} open_clip export encode_image")
    _assert_close(text, ref_text, f"{tower} open_clip export encode_text")


def test_hf_export_loads_in_transformers(tmp_path):
    import clip_jax

    _, config, variables, directory = _converted(tmp_path, VIT_CFG, quick_gelu=True)
    out = export.export(directory, "hf", tmp_path / "hf")
    model = transformers.CLIPModel.from_pretrained(out).eval()
    processor = transformers.CLIPProcessor.from_pretrained(out)

    images, tokens = random_images(3, 32, seed=1), random_tokens(3, 16, seed=2)
    ref_image, ref_text = hf_encode(model, images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    _assert_close(image, ref_image, "hf export encode_image")
    _assert_close(text, ref_text, "hf export encode_text")

    # The exported tokenizer gives clip_jax's ids (transformers pads with end-of-text, 49407).
    ours = tokenizers.get("clip-bpe")(TEXTS, context_length=16)
    theirs = np.asarray(
        processor.tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True)[
            "input_ids"
        ]
    )
    np.testing.assert_array_equal(np.where(ours == 0, 49407, ours), theirs)
    # End to end: processor + CLIPModel against clip_jax.load on the same strings and pixels.
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    inputs = processor(
        text=TEXTS,
        images=list(pixels),
        return_tensors="pt",
        padding="max_length",
        max_length=16,
        truncation=True,
    )
    expected = (
        (pixels / np.float32(255) - np.asarray(OPENAI_MEAN, np.float32))
        / np.asarray(OPENAI_STD, np.float32)
    ).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(inputs["pixel_values"].numpy(), expected, atol=1e-5)
    with torch.no_grad():
        output = model(**inputs)
    one_device = clip_jax.sharding.create_mesh(devices=jax.devices()[:1])
    loaded = clip_jax.load(str(directory), batch_size=8, mesh=one_device)
    _assert_close(loaded.encode_text(TEXTS), output.text_embeds.numpy(), "processor text")
    _assert_close(loaded.encode_image(pixels), output.image_embeds.numpy(), "processor image")


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        export.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m clip_jax.export: error: "), lines
    return info.value.code, lines[0]


def test_refusals_are_one_line(tmp_path, capsys):
    _, _, _, directory = _converted(tmp_path, RN_CFG, quick_gelu=False)
    code, message = _cli(
        ["--from", str(directory), "--format", "hf", "--output", str(tmp_path / "hf")], capsys
    )
    assert code == 1 and "transformers has no ModifiedResNet image tower" in message
    assert not (tmp_path / "hf").exists()
    assert not any(p.name.startswith(".hf.tmp") for p in tmp_path.iterdir())

    (tmp_path / "taken").mkdir()
    code, message = _cli(
        ["--from", str(directory), "--format", "open_clip", "--output", str(tmp_path / "taken")],
        capsys,
    )
    assert code == 2 and "already exists" in message
    with pytest.raises(FileExistsError):
        export.export(directory, "open_clip", tmp_path / "taken")
    code, message = _cli(
        [
            "--from",
            str(tmp_path / "absent"),
            "--format",
            "open_clip",
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "does not exist" in message
    code, message = _cli(
        ["--from", str(directory), "--format", "onnx", "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "invalid choice: 'onnx'" in message
    code, message = _cli(
        [
            "--from",
            str(directory),
            "--format",
            "open_clip",
            "--step",
            "3",
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 1 and "converted weights, which have no steps" in message


def test_trained_workdir_exports_and_reloads(tmp_path, capsys):
    """Train the tiny config 2 steps (checkpoints 1 and 2); export the latest in both formats
    (one through the command line) and step 1 with --step; the latest reloads with clip_jax's
    embeddings in open_clip and transformers."""
    from safetensors.numpy import load_file
    from train_runs import get_config

    from clip_jax import train

    config = get_config(
        batch_size=8, total_steps=2, checkpoint_every=1, **{"data.source": "synthetic"}
    )
    workdir = tmp_path / "run"
    train.train(config, str(workdir), devices=jax.devices()[:1])
    loaded = model_store.load_model(str(workdir))
    assert loaded.step == 2
    variables, model_config = loaded.variables, loaded.config

    export.main(["--from", str(workdir), "--format", "open_clip", "--output", str(tmp_path / "oc")])
    assert f"wrote {tmp_path / 'oc'}" in capsys.readouterr().out
    export.export(workdir, "hf", tmp_path / "hf")
    # Default: the latest checkpoint, exactly; --step 1: the other one (step 2 changed weights).
    export.main(
        [
            "--from",
            str(workdir),
            "--step",
            "1",
            "--format",
            "open_clip",
            "--output",
            str(tmp_path / "s1"),
        ]
    )
    latest = convert.to_state_dict(variables)
    exported = load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
    step1 = load_file(str(tmp_path / "s1" / "open_clip_model.safetensors"))
    assert set(exported) == set(step1) == set(latest)
    for key, value in latest.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert any(not np.array_equal(step1[k], latest[k]) for k in latest)

    images = random_images(2, model_config.image_size, seed=3)
    tokens = open_clip.tokenize(TEXTS, context_length=model_config.context_length).numpy()
    image, text = jax_encode(model_config, variables, images, tokens.astype(np.int32))
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    oc_image, oc_text = torch_encode(oc_model, images, tokens)
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    hf_image, hf_text = hf_encode(hf_model, images, tokens)
    for name, ours, theirs in (
        ("open_clip image", image, oc_image),
        ("open_clip text", text, oc_text),
        ("transformers image", image, hf_image),
        ("transformers text", text, hf_text),
    ):
        _assert_close(ours, theirs, f"trained {name}")
    saved = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["vision_cfg"]["image_size"] == model_config.image_size
