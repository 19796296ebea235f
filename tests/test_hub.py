"""Pretrained weights by name (clip_jax.hub): both Hub layouts, names, revisions, errors, CLIs.

Offline throughout: each test builds a Hugging Face cache by hand in a temp dir (tests/hf_peer.py)
and points huggingface_hub at it with HF_HUB_OFFLINE=1. Peers are random-init open_clip and
transformers models; embeddings must match within 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import jax  # noqa: E402
from hf_peer import add_hub_repo, hf_encode, hf_repo_files, make_hf_clip, open_clip_repo_files  # noqa: E402
from open_clip_peer import jax_encode, make_small_model, random_images, random_tokens, torch_encode  # noqa: E402

from clip_jax import convert, export, hub, model_store  # noqa: E402

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
TEXT_CFG = dict(context_length=16, width=64, heads=2, layers=2)
VIT_CFG = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
RN_CFG = dict(image_size=64, layers=[1, 2, 1, 1], width=16, head_width=128)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub uses, offline. huggingface_hub reads
    HF_HUB_CACHE/HF_HUB_OFFLINE at import, so its constants are patched too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _open_clip_model(vision_cfg: dict, quick_gelu: bool, seed: int = 0, logit_scale=3.3):
    return make_small_model(
        48, vision_cfg, TEXT_CFG, quick_gelu=quick_gelu, seed=seed, logit_scale=logit_scale
    )


def _model_cfg(vision_cfg: dict, quick_gelu: bool | None) -> dict:
    cfg = {"embed_dim": 48, "vision_cfg": vision_cfg, "text_cfg": TEXT_CFG}
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    return cfg


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    assert np.std(ref) > 1e-3, f"{what}: reference output is degenerate"
    err = float(np.max(np.abs(ours - ref)))
    print(f"{what}: max abs error {err:.2e}, max abs value {np.abs(ref).max():.3g}")
    assert err < TOL, f"{what}: max abs error {err:.3g}"


def _check_parity(config, variables, encode_peer, image_size: int) -> None:
    images, tokens = random_images(3, image_size, seed=1), random_tokens(3, 16, seed=2)
    ref_image, ref_text = encode_peer(images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    _assert_close(image, ref_image, "encode_image")
    _assert_close(text, ref_text, "encode_text")


@pytest.mark.parametrize(
    "tower, weights",
    [("vit", "open_clip_model.safetensors"), ("resnet", "open_clip_pytorch_model.bin")],
)
def test_open_clip_layout_matches_open_clip(hub_cache, tower, weights):
    vision_cfg = VIT_CFG if tower == "vit" else RN_CFG
    model = _open_clip_model(vision_cfg, quick_gelu=True)
    files = open_clip_repo_files(model, _model_cfg(vision_cfg, True), weights)
    commit = add_hub_repo(hub_cache, "test-org/tiny-clip", files)

    config, variables, source = hub.load("hf-hub:test-org/tiny-clip")
    assert source == f"hf-hub:test-org/tiny-clip@{commit}"
    assert config.vision.type == tower and config.text.activation == "quick_gelu"
    _check_parity(
        config, variables, lambda i, t: torch_encode(model, i, t), vision_cfg["image_size"]
    )
    if tower == "resnet":
        # The hand-built repo is what open_clip itself reads ("local-dir:" of the snapshot).
        snapshot = hub_cache / "models--test-org--tiny-clip" / "snapshots" / commit
        peer = open_clip.create_model(f"local-dir:{snapshot}")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(peer.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_transformers_layout_matches_transformers(hub_cache, tmp_path, hidden_act):
    model = make_hf_clip(hidden_act)
    add_hub_repo(hub_cache, "test-org/hf-clip", hf_repo_files(model, tmp_path / "saved"))
    config, variables, _ = hub.load("hf-hub:test-org/hf-clip")
    assert config.text.activation == config.vision.activation == hidden_act
    assert (config.embed_dim, config.image_size, config.context_length) == (48, 32, 16)
    _check_parity(config, variables, lambda i, t: hf_encode(model, i, t), 32)
    assert float(variables["params"]["logit_scale"]) == pytest.approx(3.1)
    # Exported back to transformers (straight from the Hub reference): the same tensors.
    from safetensors.numpy import load_file

    out = export.export("hf-hub:test-org/hf-clip", "hf", tmp_path / "exported")
    saved = load_file(str(out / "model.safetensors"))
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(saved) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_open_clip_layout_is_preferred_and_clip_jax_load_embeds(hub_cache, tmp_path):
    """A repo with both layouts (like laion/...) reads open_clip's; `clip_jax.load` then embeds
    uint8 images and strings like open_clip does (OpenAI normalisation, open_clip.tokenize)."""
    import clip_jax
    from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD

    model = _open_clip_model(VIT_CFG, quick_gelu=False, seed=3)
    files = open_clip_repo_files(model, _model_cfg(VIT_CFG, False))
    files["config.json"] = "{not json: the transformers layout must not be read"
    add_hub_repo(hub_cache, "test-org/both", files)
    one_device = clip_jax.sharding.create_mesh(devices=jax.devices()[:1])
    loaded = clip_jax.load("hf-hub:test-org/both", batch_size=8, mesh=one_device)
    texts = ["a photo of a cat", "a diagram, drawn in pencil!"]
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = (images / np.float32(255) - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(
        OPENAI_STD, np.float32
    )
    with torch.no_grad():
        ref_text = model.encode_text(open_clip.tokenize(texts, context_length=16))
        ref_image = model.encode_image(
            torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32).copy())
        )
    ref_text = (ref_text / ref_text.norm(dim=-1, keepdim=True)).numpy()
    ref_image = (ref_image / ref_image.norm(dim=-1, keepdim=True)).numpy()
    _assert_close(loaded.encode_text(texts), ref_text, "clip_jax.load encode_text")
    _assert_close(loaded.encode_image(images), ref_image, "clip_jax.load encode_image")


def test_pretrained_name_uses_table_repo_and_quick_gelu(hub_cache):
    """pretrained:ViT-B-32/openai reads timm/vit_base_patch32_clip_224.openai; its config has no
    quick_gelu key here, so the table's QuickGELU applies (a wrong activation would fail)."""
    assert hub.parse("pretrained:ViT-B-32/openai") == (
        "timm/vit_base_patch32_clip_224.openai",
        None,
        True,
    )
    model = _open_clip_model(VIT_CFG, quick_gelu=True, seed=4)
    add_hub_repo(
        hub_cache,
        "timm/vit_base_patch32_clip_224.openai",
        open_clip_repo_files(model, _model_cfg(VIT_CFG, None)),
    )
    for reference in ("pretrained:ViT-B-32/openai", "hf-hub:timm/vit_base_patch32_clip_224.openai"):
        config, variables, _ = hub.load(reference)
        assert config.text.activation == "quick_gelu", reference
    _check_parity(config, variables, lambda i, t: torch_encode(model, i, t), 32)


def test_pretrained_table_agrees_with_open_clip():
    """Each well-known name is open_clip's: same Hub repo, same QuickGELU, OpenAI mean/std."""
    from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD

    for name, entry in hub.PRETRAINED.items():
        cfg = open_clip.get_pretrained_cfg(*name.split("/"))
        assert cfg.get("hf_hub", "").rstrip("/") == entry.repo_id, name
        assert bool(cfg.get("quick_gelu", False)) == entry.quick_gelu, name
        assert tuple(cfg.get("mean", OPENAI_MEAN)) == OPENAI_MEAN, name
        assert tuple(cfg.get("std", OPENAI_STD)) == OPENAI_STD, name


def test_revisions(hub_cache):
    main = _open_clip_model(VIT_CFG, quick_gelu=False, logit_scale=1.0)
    tagged = _open_clip_model(VIT_CFG, quick_gelu=False, logit_scale=2.0)
    add_hub_repo(
        hub_cache, "test-org/versions", open_clip_repo_files(main, _model_cfg(VIT_CFG, False))
    )
    commit = add_hub_repo(
        hub_cache,
        "test-org/versions",
        open_clip_repo_files(tagged, _model_cfg(VIT_CFG, False)),
        ref="v1",
    )
    scale = {}
    for reference in (
        "hf-hub:test-org/versions",
        "hf-hub:test-org/versions@v1",
        f"hf-hub:test-org/versions@{commit}",
    ):
        _, variables, source = hub.load(reference)
        scale[reference] = float(variables["params"]["logit_scale"])
    assert list(scale.values()) == [1.0, 2.0, 2.0]
    assert source == f"hf-hub:test-org/versions@{commit}"
    with pytest.raises(
        hub.HubError, match="revision v2 of test-org/versions is not in the Hugging Face cache"
    ):
        hub.load("hf-hub:test-org/versions@v2")


def test_errors_are_one_line(hub_cache, tmp_path):
    def error(reference: str) -> str:
        with pytest.raises(hub.HubError) as info:
            hub.load(reference)
        message = str(info.value)
        assert "\n" not in message, message
        return message

    message = error("hf-hub:nobody/absent-model")
    assert "nobody/absent-model" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "unknown pretrained name 'ViT-Q-1/openai'" in error("pretrained:ViT-Q-1/openai")
    assert "expected hf-hub:ORG/NAME" in error("hf-hub:no-slash")

    model = _open_clip_model(VIT_CFG, quick_gelu=False)
    add_hub_repo(
        hub_cache,
        "test-org/layer-scale",
        open_clip_repo_files(model, _model_cfg(dict(VIT_CFG, ls_init_value=1e-5), False)),
    )
    assert "vision_cfg.ls_init_value=1e-05 is not supported" in error("hf-hub:test-org/layer-scale")
    add_hub_repo(
        hub_cache,
        "test-org/inception-norm",
        open_clip_repo_files(
            model, _model_cfg(VIT_CFG, False), preprocess_cfg={"mean": [0.5] * 3, "std": [0.5] * 3}
        ),
    )
    assert "normalises images with mean [0.5, 0.5, 0.5]" in error("hf-hub:test-org/inception-norm")
    # The config says 2 text layers, the weights have 1: named, on one line.
    files = open_clip_repo_files(model, _model_cfg(VIT_CFG, False))
    files["open_clip_config.json"] = json.dumps(
        {"model_cfg": _model_cfg(VIT_CFG, False) | {"text_cfg": dict(TEXT_CFG, layers=1)}}
    )
    add_hub_repo(hub_cache, "test-org/wrong-config", files)
    assert "text.layers: weights have 2, config has 1" in error("hf-hub:test-org/wrong-config")
    add_hub_repo(hub_cache, "test-org/no-weights", {"config.json": "{}"})
    assert "none of model.safetensors, pytorch_model.bin in the cache" in error(
        "hf-hub:test-org/no-weights"
    )
    # transformers layout: the mean/std of preprocessor_config.json are checked too.
    hf_files = hf_repo_files(make_hf_clip(), tmp_path / "saved")
    hf_files["preprocessor_config.json"] = json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    )
    add_hub_repo(hub_cache, "test-org/hf-inception-norm", hf_files)
    assert "normalises images with mean [0.5, 0.5, 0.5]" in error(
        "hf-hub:test-org/hf-inception-norm"
    )


def test_bare_pretrained_name_gets_a_hint(tmp_path, monkeypatch, capsys):
    """`ViT-B-32/openai` without `pretrained:` is a relative path that does not exist; the
    one-line errors of the library, convert and evaluate say how to name the weights."""
    from clip_jax.checkpoint import CheckpointError
    from clip_jax.evaluate import EvalError, _load

    monkeypatch.chdir(tmp_path)
    hint = "(pretrained weights are named pretrained:ViT-B-32/openai)"
    with pytest.raises(CheckpointError) as info:
        model_store.locate("ViT-B-32/openai")
    assert str(info.value) == f"ViT-B-32/openai does not exist {hint}"
    with pytest.raises(SystemExit):
        convert.main(["--input", "ViT-B-32/openai", "--output", str(tmp_path / "out")])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(f"--input 'ViT-B-32/openai': no such file {hint}"), line
    with pytest.raises(EvalError) as info:
        _load(str(tmp_path / "eval"), None, "ViT-B-32/openai", None)
    assert str(info.value) == f"--init_from ViT-B-32/openai does not exist {hint}"
    with pytest.raises(CheckpointError) as info:  # other missing paths: no hint
        model_store.locate("ViT-B-32/openai-x")
    assert str(info.value) == "ViT-B-32/openai-x does not exist"


def test_unreachable_hub_is_one_line_error(hub_cache, tmp_path, monkeypatch):
    """Online but without a connection, huggingface_hub reports files as missing from the
    cache: the error must say the Hub is unreachable (not that the repo lacks the files), and a
    repo already in the cache still loads."""
    import functools

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    # huggingface_hub retries a refused connection 5 times over ~23 s; once is enough here.
    monkeypatch.setattr(_http, "http_backoff", functools.partial(_http.http_backoff, max_retries=0))
    dead = "http://127.0.0.1:9"  # the discard port: connection refused at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    with pytest.raises(hub.HubError) as info:
        hub.fetch("hf-hub:nobody/absent-model")
    message = str(info.value)
    assert "\n" not in message and "nobody/absent-model" in message, message
    assert "the Hugging Face Hub cannot be reached" in message and str(hub_cache) in message
    assert "in the repo" not in message, message
    # A transformers-layout repo in the cache: open_clip_config.json cannot be asked for, but
    # config.json and the weights are found in the cache.
    add_hub_repo(hub_cache, "test-org/cached", hf_repo_files(make_hf_clip(), tmp_path / "saved"))
    files = hub.fetch("hf-hub:test-org/cached")
    assert files.layout == "transformers" and files.weights_path.name == "model.safetensors"


@pytest.mark.slow
def test_convert_cli_reads_hub_and_lists_pretrained(hub_cache, tmp_path, capsys):
    convert.main(["--list-pretrained"])
    listing = capsys.readouterr().out
    assert "pretrained:ViT-B-32/openai  ->  hf-hub:timm/vit_base_patch32_clip_224.openai" in listing
    assert len(listing.splitlines()) == len(hub.PRETRAINED)

    with pytest.raises(SystemExit) as info:
        convert.main(["--input", "hf-hub:nobody/absent-model", "--output", str(tmp_path / "o")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nobody/absent-model" in err and str(hub_cache) in err

    model = _open_clip_model(RN_CFG, quick_gelu=True)
    commit = add_hub_repo(
        hub_cache, "test-org/tiny-rn", open_clip_repo_files(model, _model_cfg(RN_CFG, True))
    )
    # A fresh process: the environment variables alone must steer huggingface_hub.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.convert",
            "--input",
            "hf-hub:test-org/tiny-rn",
            "--output",
            str(tmp_path / "converted"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "converted" / "model.json").read_text())
    assert meta["source"] == f"hf-hub:test-org/tiny-rn@{commit}"
    variables = model_store.load_model(
        tmp_path / "converted", sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ).variables
    reference = hub.load("hf-hub:test-org/tiny-rn")[1]
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(variables) == jax.tree.structure(reference)


def test_train_and_evaluate_accept_hub_references(hub_cache, tmp_path):
    import ml_collections
    from train_runs import get_config

    from clip_jax import evaluation, train, train_setup
    from clip_jax.evaluate import evaluate

    model = _open_clip_model(VIT_CFG, quick_gelu=True)
    add_hub_repo(hub_cache, "test-org/tiny", open_clip_repo_files(model, _model_cfg(VIT_CFG, True)))
    config = get_config(
        batch_size=8,
        total_steps=1,
        init_from="hf-hub:test-org/tiny",
        **{"data.source": "synthetic"},
    )
    train.validate_config(config)
    model_config, variables, tokenizer = train_setup.load_model(config)
    assert tokenizer == "clip-bpe" and model_config.text.activation == "quick_gelu"
    assert model_config.image_size == 32
    bad = get_config(init_from="hf-hub:nobody/absent", **{"data.source": "synthetic"})
    with pytest.raises(train.ConfigError, match=r"config\.init_from: .*nobody/absent"):
        train_setup.load_model(bad)

    eval_config = ml_collections.ConfigDict({"eval": evaluation.get_default_config()})
    for name in ("retrieval", "linear_probe"):
        del eval_config.eval.evaluators[name]
    eval_config.eval.evaluators.zeroshot.templates = "generic"
    metrics, path = evaluate(eval_config, str(tmp_path / "eval"), init_from="hf-hub:test-org/tiny")
    record = json.loads(Path(path).read_text())
    assert record["kind"] == "hub" and record["checkpoint"] == "hf-hub:test-org/tiny"
    # The same weights converted to a directory first evaluate identically.
    convert.convert_file("hf-hub:test-org/tiny", tmp_path / "converted")
    reference, _ = evaluate(
        eval_config, str(tmp_path / "eval2"), init_from=str(tmp_path / "converted")
    )
    timeless = [
        {k: v for k, v in m.items() if not k.endswith("seconds")} for m in (metrics, reference)
    ]
    assert timeless[0] == timeless[1] and "zeroshot/top1" in metrics


def test_patch_dropout_on_hub_resnet_weights_is_a_config_error(hub_cache, tmp_path):
    """A Hub reference's architecture is known once its files are read: patch dropout on its
    ResNet tower is a ConfigError (the CLI's one-line error) before the model is built or the
    workdir created."""
    from train_runs import get_config

    from clip_jax import train

    model = _open_clip_model(RN_CFG, quick_gelu=True)
    add_hub_repo(
        hub_cache, "test-org/tiny-rn", open_clip_repo_files(model, _model_cfg(RN_CFG, True))
    )
    config = get_config(
        batch_size=8,
        total_steps=1,
        init_from="hf-hub:test-org/tiny-rn",
        **{"data.source": "synthetic", "model.patch_dropout": 0.5},
    )
    with pytest.raises(train.ConfigError) as error:
        train.train(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    assert str(error.value) == (
        "config.model.patch_dropout=0.5: needs a ViT image tower; the init_from weights "
        "(hf-hub:test-org/tiny-rn) have a resnet tower"
    )
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_importing_clip_jax_downloads_nothing():
    """Every module that takes Hub references imports without huggingface_hub (or torch,
    transformers) and without opening a connection: downloads happen only when a reference is
    loaded."""
    code = (
        "import socket, sys\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('a connection was opened at import time')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "import clip_jax, clip_jax.convert, clip_jax.evaluate, clip_jax.evaluation\n"
        "import clip_jax.export, clip_jax.hub, clip_jax.inference, clip_jax.model_store\n"
        "import clip_jax.train, clip_jax.train_setup\n"
        "clip_jax.load, clip_jax.evaluation.benchmark\n"
        "heavy = ('huggingface_hub', 'transformers', 'torch', 'open_clip')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
