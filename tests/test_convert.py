"""Weight import from OpenAI / open_clip: numerical parity with open_clip, errors, files, CLI.

All models are random-init (no downloads); open_clip runs in float32 eval mode on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import jax  # noqa: E402  (after importorskip, like the peer helpers)
from flax import traverse_util  # noqa: E402
from open_clip_peer import (  # noqa: E402
    jax_encode,
    make_small_model,
    random_images,
    random_tokens,
    randomize_batchnorm,
    torch_encode,
)

from clip_jax import convert, model_store  # noqa: E402
from clip_jax.checkpoint import CheckpointError  # noqa: E402
from clip_jax.models import get_model_config  # noqa: E402

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]

TINY_TEXT = dict(context_length=32, width=128, layers=2, heads=2)
TINY_VIT = dict(image_size=64, patch_size=8, width=128, layers=2)
# open_clip's attention-pool heads are width * 32 // head_width: 128-wide heads give tiny-rn's 4.
TINY_RN = dict(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=128)

# name: (embed_dim, vision_cfg, text_cfg, torch quick_gelu, convert model_name, convert quick_gelu)
SMALL_CASES = {
    "tiny-vit": (128, TINY_VIT, TINY_TEXT, False, "tiny-vit", None),
    "tiny-vit-quickgelu": (128, TINY_VIT, TINY_TEXT, True, "tiny-vit-quickgelu", None),
    # Not in the registry: everything inferred from shapes (heads by the 64-wide convention).
    "inferred-vit-quickgelu": (
        64,
        dict(image_size=32, patch_size=8, width=64, layers=2),
        dict(context_length=16, width=64, layers=2, heads=1),
        True,
        None,
        True,
    ),
    "tiny-rn": (128, TINY_RN, TINY_TEXT, False, "tiny-rn", None),
    # Several blocks per stage (exercises layer{s}_{b} numbering and non-downsampling blocks).
    "inferred-rn-deep-quickgelu": (
        64,
        dict(image_size=64, layers=(2, 3, 2, 2), width=8),
        dict(context_length=16, width=64, layers=1, heads=1),
        True,
        None,
        True,
    ),
}


def _load_converted(directory):
    """(config, variables) of a converted directory, on one device (fast on 8 CPU devices)."""
    loaded = model_store.load_model(
        directory, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    return loaded.config, loaded.variables


def _inputs(context_length: int, image_size: int, batch: int = 3):
    """Random images, random token rows and rows from open_clip's tokenizer."""
    images = random_images(batch, image_size, seed=1)
    texts = ["a photo of a cat", "a diagram of a transformer, drawn in pencil!"]
    tokenized = open_clip.tokenize(texts, context_length=context_length).numpy().astype(np.int32)
    tokens = np.concatenate([random_tokens(batch, context_length, seed=2), tokenized])
    return images, tokens


@pytest.fixture(scope="module", params=sorted(SMALL_CASES))
def small_case(request):
    embed, vision, text, torch_quick, name, quick = SMALL_CASES[request.param]
    model = make_small_model(embed, vision, text, quick_gelu=torch_quick)
    config, variables = convert.convert_state_dict(model.state_dict(), name, quick_gelu=quick)
    return request.param, model, config, variables


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    # Random-init outputs are O(0.1-10): a real mismatch is far above the tolerance.
    assert np.std(ref) > 1e-2, f"{what}: reference output is degenerate"
    err = float(np.max(np.abs(ours - ref)))
    print(f"{what}: max abs error {err:.2e}, max abs value {np.abs(ref).max():.3g}")
    assert err < TOL, f"{what}: max abs error {err:.3g} (reference scale {np.abs(ref).max():.3g})"


def test_small_models_match_open_clip(small_case):
    name, model, config, variables = small_case
    images, tokens = _inputs(config.context_length, config.image_size)
    ref_image, ref_text = torch_encode(model, images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    _assert_close(image, ref_image, f"{name} encode_image")
    _assert_close(text, ref_text, f"{name} encode_text")
    expected_activation = "quick_gelu" if SMALL_CASES[name][3] else "gelu"
    assert config.text.activation == expected_activation
    if config.vision.type == "vit":
        assert config.vision.activation == expected_activation


def test_wrong_activation_is_detected():
    """Negative control: the parity check is sensitive to the activation choice, in both towers."""
    embed, vision, text, torch_quick, _, _ = SMALL_CASES["inferred-vit-quickgelu"]
    model = make_small_model(embed, vision, text, quick_gelu=torch_quick)
    config, variables = convert.convert_state_dict(model.state_dict(), quick_gelu=False)
    assert config.vision.activation == config.text.activation == "gelu"
    images, tokens = _inputs(config.context_length, config.image_size, batch=2)
    ref_image, ref_text = torch_encode(model, images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    assert np.max(np.abs(image - ref_image)) > 10 * TOL
    assert np.max(np.abs(text - ref_text)) > 10 * TOL


def test_logit_scale_and_batchnorm_stats_carry_over(small_case):
    _, model, config, variables = small_case
    sd = model.state_dict()
    assert float(variables["params"]["logit_scale"]) == pytest.approx(3.3)
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["logit_scale"]), sd["logit_scale"].numpy()
    )
    if config.vision.type != "resnet":
        assert "batch_stats" not in variables
        return
    stats = variables["batch_stats"]["image"]
    pairs = {
        ("bn1",): "visual.bn1",
        ("layer2_0", "bn3"): "visual.layer2.0.bn3",
        ("layer3_0", "downsample_bn"): "visual.layer3.0.downsample.1",
    }
    for path, key in pairs.items():
        node = stats
        for p in path:
            node = node[p]
        mean, var = sd[f"{key}.running_mean"].numpy(), sd[f"{key}.running_var"].numpy()
        # The train-mode passes moved them away from torch's 0/1 defaults.
        assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3
        np.testing.assert_array_equal(np.asarray(node["mean"]), mean)
        np.testing.assert_array_equal(np.asarray(node["var"]), var)
    # Every torch running stat is used exactly once (count matches the batch_stats leaves).
    n_torch = sum(k.endswith("running_mean") or k.endswith("running_var") for k in sd)
    assert len(traverse_util.flatten_dict(variables["batch_stats"])) == n_torch


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_models_match_open_clip(name):
    start = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    randomize_batchnorm(model, train_batches=1, image_size=224)
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
    config, variables = convert.convert_state_dict(model.state_dict(), name)
    assert config == get_model_config(name)
    images, tokens = random_images(2, 224, seed=3), random_tokens(1, 77, seed=4)
    tokens = np.concatenate([tokens, open_clip.tokenize(["a photo of a dog"]).numpy()])
    tokens = tokens.astype(np.int32)
    ref_image, ref_text = torch_encode(model, images, tokens)
    image, text = jax_encode(config, variables, images, tokens)
    _assert_close(image, ref_image, f"{name} encode_image")
    _assert_close(text, ref_text, f"{name} encode_text")
    assert float(variables["params"]["logit_scale"]) == pytest.approx(4.0)
    print(f"{name} parity test: {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------------
# Architecture inference and errors
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit_state_dict():
    return make_small_model(128, TINY_VIT, TINY_TEXT, quick_gelu=False).state_dict()


@pytest.fixture(scope="module")
def tiny_rn_state_dict():
    return make_small_model(128, TINY_RN, TINY_TEXT, quick_gelu=False).state_dict()


def test_inferred_config_equals_registry(tiny_vit_state_dict, tiny_rn_state_dict):
    inferred = convert.infer_config(tiny_vit_state_dict)
    assert inferred == get_model_config("tiny-vit")
    # tiny-rn's 4 attention-pool heads are not OpenAI's convention (16 * 32 // 64 = 8): only the
    # registry name can supply them; everything else is inferred identically.
    inferred = convert.infer_config(tiny_rn_state_dict)
    assert inferred.vision.heads == 8
    tiny_rn = get_model_config("tiny-rn")
    assert inferred.replace(vision=tiny_rn.vision) == tiny_rn
    assert convert.convert_state_dict(tiny_rn_state_dict, "tiny-rn")[0] == tiny_rn


def test_model_name_mismatch_lists_differences(tiny_vit_state_dict):
    with pytest.raises(ValueError) as info:
        convert.convert_state_dict(tiny_vit_state_dict, "ViT-B-32")
    message = str(info.value)
    assert "ViT-B-32" in message
    assert "vision.width: weights have 128, config has 768" in message
    assert "text.context_length: weights have 32, config has 77" in message
    with pytest.raises(ValueError, match="vision.type"):
        convert.convert_state_dict(tiny_vit_state_dict, "tiny-rn")


def test_missing_key_is_named(tiny_vit_state_dict):
    sd = dict(tiny_vit_state_dict)
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(
        ValueError,
        match=r"1 missing keys:\s+transformer\.resblocks\.1\.mlp\.c_fc"
        r"\.bias",
    ) as info:
        convert.convert_state_dict(sd, "tiny-vit")
    assert "unexpected" not in str(info.value)


def test_missing_architecture_key_is_named(tiny_vit_state_dict):
    sd = dict(tiny_vit_state_dict)
    del sd["ln_final.weight"]
    with pytest.raises(ValueError, match="no 'ln_final.weight'"):
        convert.convert_state_dict(sd)


def test_unexpected_key_is_named(tiny_vit_state_dict):
    sd = dict(tiny_vit_state_dict)
    sd["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 unexpected keys:\s+visual\.extra_head\.weight"):
        convert.convert_state_dict(sd, "tiny-vit")


def test_shape_mismatch_names_both_shapes(tiny_vit_state_dict):
    sd = dict(tiny_vit_state_dict)
    sd["transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError) as info:
        convert.convert_state_dict(sd, "tiny-vit")
    message = str(info.value)
    assert "1 shape mismatches" in message
    assert (
        "transformer.resblocks.0.attn.out_proj.weight: checkpoint (128, 64) (as Flax "
        "(64, 128)), model expects (128, 128)"
    ) in message


def test_ddp_prefix_fp16_and_openai_metadata(tiny_vit_state_dict):
    """OpenAI-style input: `module.` prefix, float16 weights, metadata scalars -> QuickGELU."""
    sd = {f"module.{k}": v.half() for k, v in tiny_vit_state_dict.items()}
    sd.update(
        {
            "module.input_resolution": torch.tensor(64),
            "module.context_length": torch.tensor(32),
            "module.vocab_size": torch.tensor(49408),
        }
    )
    config, variables = convert.convert_state_dict(sd)
    assert config == get_model_config("tiny-vit-quickgelu")
    leaves = jax.tree.leaves(variables)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["text"]["token_embedding"]["embedding"]),
        tiny_vit_state_dict["token_embedding.weight"].half().float().numpy(),
    )
    # Explicit quick_gelu wins over the metadata heuristic.
    assert convert.convert_state_dict(sd, quick_gelu=False)[0] == get_model_config("tiny-vit")
    sd["module.input_resolution"] = torch.tensor(224)
    with pytest.raises(ValueError, match="input_resolution=224 contradicts"):
        convert.convert_state_dict(sd)


def test_logit_bias_carries_over(tiny_vit_state_dict):
    sd = dict(tiny_vit_state_dict, logit_bias=torch.tensor(-7.5))
    config, variables = convert.convert_state_dict(sd)
    assert config.init_logit_bias == -7.5
    assert float(variables["params"]["logit_bias"]) == -7.5
    with pytest.raises(ValueError, match="logit_bias: weights have it, config lacks it"):
        convert.convert_state_dict(sd, "tiny-vit")


def test_every_flax_variable_has_a_distinct_torch_name():
    for name in ("RN50", "ViT-B-32", "tiny-rn"):
        model = convert.create_model(name)
        abstract = traverse_util.flatten_dict(
            jax.eval_shape(model.init_variables, jax.random.key(0))
        )
        names = [convert.torch_name(path, leaf.ndim)[0] for path, leaf in abstract.items()]
        assert len(set(names)) == len(names) == len(abstract)
    assert convert.torch_name(("params", "image", "layer3_1", "downsample_bn", "scale"), 1) == (
        "visual.layer3.1.downsample.1.weight",
        "none",
    )
    assert convert.torch_name(("batch_stats", "image", "bn2", "var"), 1) == (
        "visual.bn2.running_var",
        "none",
    )
    assert convert.torch_name(
        ("params", "text", "transformer", "resblocks_11", "attn", "in_proj", "kernel"), 2
    ) == ("transformer.resblocks.11.attn.in_proj_weight", "linear")


# ------------------------------------------------------------------------------------------------
# Checkpoint files, save/load, CLI
# ------------------------------------------------------------------------------------------------


def test_checkpoint_file_formats(tmp_path, tiny_vit_state_dict):
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch_file

    reference = convert.convert_state_dict(tiny_vit_state_dict, "tiny-vit")[1]
    ref_leaves = jax.tree.leaves(reference)

    def check(path, **kwargs):
        config, variables = convert.convert_state_dict(
            convert.load_checkpoint_file(path), "tiny-vit", **kwargs
        )
        for a, b in zip(jax.tree.leaves(variables), ref_leaves):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return config

    arrays = {k: v.numpy() for k, v in tiny_vit_state_dict.items()}
    save_file(arrays, str(tmp_path / "m.safetensors"))
    check(tmp_path / "m.safetensors")
    # bfloat16 files (common on the Hub) read without torch and come back float32.
    save_torch_file(
        {k: v.bfloat16() for k, v in tiny_vit_state_dict.items()},
        str(tmp_path / "bf16.safetensors"),
    )
    _, variables = convert.convert_state_dict(
        convert.load_checkpoint_file(tmp_path / "bf16.safetensors"), "tiny-vit"
    )
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["image"]["proj"]),
        tiny_vit_state_dict["visual.proj"].bfloat16().float().numpy(),
    )
    # An open_clip training checkpoint: {"epoch", "state_dict"} with DDP's module. prefix.
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny_vit_state_dict.items()}},
        tmp_path / "epoch_3.pt",
    )
    assert not convert.is_torch_jit_archive(tmp_path / "epoch_3.pt")
    check(tmp_path / "epoch_3.pt")
    torch.save(dict(tiny_vit_state_dict), tmp_path / "open_clip_pytorch_model.bin")
    check(tmp_path / "open_clip_pytorch_model.bin")
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match="unsupported checkpoint file"):
        convert.load_checkpoint_file(tmp_path / "m.npz")
    with pytest.raises(FileNotFoundError):
        convert.load_checkpoint_file(tmp_path / "absent.pt")


def test_torchscript_archive_defaults_to_quick_gelu(tmp_path):
    """OpenAI's releases are TorchScript archives; they need QuickGELU."""
    model = make_small_model(
        64,
        dict(image_size=32, patch_size=8, width=64, layers=1),
        dict(context_length=16, width=64, layers=1, heads=1),
        quick_gelu=True,
    )
    images, tokens = _inputs(16, 32, batch=2)
    traced = torch.jit.trace(
        model, (torch.from_numpy(images), torch.from_numpy(tokens).long()), check_trace=False
    )
    torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    assert convert.is_torch_jit_archive(tmp_path / "ViT-tiny.pt")
    config, directory = convert.convert_file(tmp_path / "ViT-tiny.pt", tmp_path / "out")
    assert config.text.activation == config.vision.activation == "quick_gelu"
    config, variables = _load_converted(directory)
    ref = torch_encode(model, images, tokens)
    ours = jax_encode(config, variables, images, tokens)
    _assert_close(ours[0], ref[0], "jit encode_image")
    _assert_close(ours[1], ref[1], "jit encode_text")


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "x.pt").write_bytes(b"not really a checkpoint")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        convert.load_checkpoint_file(tmp_path / "x.pt")


def test_save_and_load_converted(tmp_path, tiny_rn_state_dict):
    config, variables = convert.convert_state_dict(tiny_rn_state_dict, "tiny-rn")
    directory = model_store.save_converted(tmp_path / "ckpt", config, variables, source="unit-test")
    meta = json.loads((directory / "model.json").read_text())
    assert meta["tokenizer"] == "clip-bpe" and meta["source"] == "unit-test"
    loaded_config, loaded = _load_converted(directory)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="overwrite"):
        model_store.save_converted(directory, config, variables)
    model_store.save_converted(directory, config, variables, overwrite=True)

    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        _load_converted(tmp_path / "nowhere")
    (directory / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        _load_converted(directory)
    # A config that does not fit the stored arrays fails the restore's shape check.
    wrong = config.replace(embed_dim=64)
    (directory / "model.json").write_text(
        json.dumps({"model_config": wrong.to_dict(), "tokenizer": "clip-bpe"})
    )
    with pytest.raises(CheckpointError, match="cannot restore") as error:
        _load_converted(directory)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_round_trip(tmp_path):
    model = make_small_model(128, TINY_RN, TINY_TEXT, quick_gelu=True, seed=5)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.convert",
            "--model",
            "tiny-rn",
            "--input",
            str(tmp_path / "tiny.pt"),
            "--output",
            str(out),
            "--quick-gelu",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    config, variables = _load_converted(out)
    assert config == get_model_config("tiny-rn-quickgelu")
    images, tokens = _inputs(config.context_length, config.image_size, batch=2)
    ref = torch_encode(model, images, tokens)
    ours = jax_encode(config, variables, images, tokens)
    _assert_close(ours[0], ref[0], "cli encode_image")
    _assert_close(ours[1], ref[1], "cli encode_text")


# ------------------------------------------------------------------------------------------------
# CLI errors: one line on stderr, exit status 2 (arguments) or 1 (the file); no code runs
# ------------------------------------------------------------------------------------------------


def _cli_error(argv: list[str], capsys) -> tuple[int, str]:
    """Runs `convert.main(argv)`, which must fail; (exit status, its one-line message)."""
    with pytest.raises(SystemExit) as info:
        convert.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m clip_jax.convert: error: "), lines[0]
    # torch's own advice to load with weights_only=False (running the file) never shows.
    assert "weights_only" not in lines[0]
    return info.value.code, lines[0]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, tiny_vit_state_dict):
    """Good and broken input files, built once."""
    from safetensors.numpy import save_file
    from unsafe_checkpoints import Opener

    root = tmp_path_factory.mktemp("cli")
    arrays = {k: v.numpy() for k, v in tiny_vit_state_dict.items()}
    save_file(arrays, str(root / "good.safetensors"))
    data = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file(
        {k: v for k, v in arrays.items() if k != "ln_final.bias"}, str(root / "missing.safetensors")
    )
    torch.save(dict(tiny_vit_state_dict), root / "good.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": Opener(str(root / "pickle-marker"))}, root / "pickled-code.pt")
    (root / "output").mkdir()
    (root / "output" / "keep.txt").write_text("existing")
    return root


@pytest.mark.parametrize(
    "case, status, expected",
    [
        ("missing input", 2, r"--input '.*absent\.pt': no such file"),
        (
            "existing output",
            2,
            r"--output '.*output' already exists and is not empty; pass "
            r"--overwrite",
        ),
        ("unknown model", 2, r"--model: unknown model 'ViT-Q-99'"),
        ("missing argument", 2, r"the following arguments are required: --output"),
        ("truncated safetensors", 1, r"cannot read '.*truncated\.safetensors' as \.safetensors"),
        ("truncated torch file", 1, r"cannot read '.*truncated\.pt' as a PyTorch checkpoint"),
        ("missing key", 1, r"1 missing keys: ln_final\.bias"),
        (
            "wrong architecture",
            1,
            r"does not match ViT-B-32: .*vision\.width: weights have 128, "
            r"config has 768",
        ),
        (
            "pickled code",
            1,
            r"refusing to read '.*pickled-code\.pt': it holds (io|builtins)\.open, "
            r"which is not a tensor",
        ),
    ],
)
def test_cli_errors_are_one_line(cli_files, capsys, case, status, expected):
    root, out = cli_files, str(cli_files / "out")
    argv = {
        "missing input": ["--input", str(root / "absent.pt"), "--output", out],
        "existing output": ["--input", str(root / "good.pt"), "--output", str(root / "output")],
        "unknown model": ["--model", "ViT-Q-99", "--input", str(root / "good.pt"), "--output", out],
        "missing argument": ["--input", str(root / "good.pt")],
        "truncated safetensors": ["--input", str(root / "truncated.safetensors"), "--output", out],
        "truncated torch file": ["--input", str(root / "truncated.pt"), "--output", out],
        "missing key": ["--input", str(root / "missing.safetensors"), "--output", out],
        "wrong architecture": [
            "--model",
            "ViT-B-32",
            "--input",
            str(root / "good.pt"),
            "--output",
            out,
        ],
        "pickled code": ["--input", str(root / "pickled-code.pt"), "--output", out],
    }[case]
    code, message = _cli_error(argv, capsys)
    assert code == status, message
    assert re.search(expected, message), message
    assert not (root / "out").exists()  # nothing written on failure
    assert not (root / "pickle-marker").exists()


@pytest.mark.slow
def test_cli_torchscript_code_never_runs(tmp_path):
    """The reported attack, end to end: `--input evil.pt` (a TorchScript archive whose loading
    creates a file) fails in one line and the file is never created."""
    from unsafe_checkpoints import EvilModule, save_scripted

    archive = save_scripted(EvilModule(str(tmp_path / "marker")), tmp_path / "evil.pt")
    assert convert.is_torch_jit_archive(archive)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.convert",
            "--input",
            str(archive),
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "custom pickled state" in result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "marker").exists()
    assert not (tmp_path / "out").exists()
