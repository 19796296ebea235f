"""Proof on a really trained model: the default `demo` recipe (tiny ResNet CLIP, batch 128, its
learning rate, weight decay and augmentation) cut to 60 steps beats chance on held-out retrieval
and zero-shot classification, and the trainer logs its final evaluation against chance; the
evaluate CLI restores a checkpoint written on 1 device onto 2 and 8 devices; bad checkpoints give
one-line errors.

Reproduce the numbers by hand (README):
    python -m clip_jax.train --config configs/clip.py --workdir runs/demo60 \
        --config.total_steps=60 --config.optim.warmup_steps=10 --config.eval_every=60 \
        --config.checkpoint_every=0
    python -m clip_jax.evaluate --workdir runs/demo60
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clip_jax import checkpoint, evaluation, inference, model_store, models, tokenizers
from clip_jax import sharding as sharding_lib
from clip_jax.evaluate import EvalError, evaluate

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
# The default recipe (configs/clip.py:demo), only shorter; one evaluation, at the end.
TRAIN_FLAGS = [
    f"--config.total_steps={STEPS}",
    "--config.optim.warmup_steps=10",
    f"--config.eval_every={STEPS}",
    "--config.log_every=30",
    "--config.checkpoint_every=0",
]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], devices: int, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """The demo recipe's model trained on 1 device (the tests restore it on 8 and 2)."""
    path = str(tmp_path_factory.mktemp("trained") / "tiny")
    proc = _run(
        [
            "clip_jax.train",
            "--config",
            f"{REPO}/configs/clip.py:demo",
            "--workdir",
            path,
            *TRAIN_FLAGS,
        ],
        devices=1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(path, "checkpoints", str(STEPS)))
    # The final evaluation is logged against chance and the majority class.
    assert f"final evaluation (step {STEPS}): zeroshot: top-1 " in proc.stderr
    assert "vs chance 5.6% and majority class 9.3%" in proc.stderr
    assert f"final evaluation (step {STEPS}): retrieval: image->text R@1/5/10 " in proc.stderr
    return path


@pytest.fixture(scope="module")
def inprocess(workdir):
    """Zero-shot + retrieval in this process, on 8 devices."""
    assert jax.device_count() == 8
    mesh = sharding_lib.create_mesh()
    restored = model_store.load_model(workdir, sharding=sharding_lib.replicated(mesh))
    assert restored.step == STEPS and restored.kind == "workdir"
    leaf = restored.variables["params"]["logit_scale"]
    assert len(leaf.sharding.device_set) == 8  # restored onto all 8 devices
    config = evaluation.get_default_config()
    del config.evaluators["linear_probe"]  # exercised by the CLI test below
    model = models.create_model(restored.config)
    metrics, details = evaluation.evaluate_all(
        config, model, restored.variables, tokenizers.get(restored.tokenizer), mesh, STEPS
    )
    flat = evaluation.run_evaluators(
        config, model, restored.variables, tokenizers.get(restored.tokenizer), mesh, STEPS
    )
    assert set(flat) == set(metrics)
    return metrics, details


@pytest.mark.slow
def test_trained_model_beats_chance(inprocess):
    metrics, details = inprocess
    chance = details["retrieval"]["chance"]
    print("\nheld-out retrieval (800 images, 800 captions) and zero-shot (428 images, 18 classes)")
    for key in sorted(chance):
        print(
            f"  {key}: {100 * metrics['retrieval/' + key]:.2f}%  (chance {100 * chance[key]:.3f}%)"
        )
    zs = details["zeroshot"]
    print(
        f"  zeroshot top1: {100 * metrics['zeroshot/top1']:.2f}%  (chance "
        f"{100 * zs['chance_top1']:.2f}%, majority class "
        f"{100 * zs['majority_baseline_top1']:.2f}%); top5 {100 * metrics['zeroshot/top5']:.2f}%"
    )
    assert metrics["retrieval/num_images"] == 800 and metrics["zeroshot/num_examples"] == 428
    for k in (1, 5, 10):
        for direction in ("image_to_text", "text_to_image"):
            key = f"{direction}_R@{k}"
            # Clearly above chance in every direction (R@1 counts few hits, so a lower bar).
            factor = 3 if k > 1 else 2
            assert metrics[f"retrieval/{key}"] >= factor * chance[key], (key, metrics)
        both = (
            metrics[f"retrieval/image_to_text_R@{k}"] + metrics[f"retrieval/text_to_image_R@{k}"]
        ) / 2
        assert both >= 4 * chance[f"text_to_image_R@{k}"], (k, metrics)
    assert metrics["zeroshot/top1"] >= 2 * zs["chance_top1"], metrics
    assert metrics["zeroshot/top1"] >= zs["majority_baseline_top1"] + 0.03, metrics
    assert metrics["zeroshot/top5"] >= 5 * zs["chance_top1"] + 0.08, metrics


@pytest.mark.slow
def test_cli_restores_on_two_devices_and_writes_json(workdir, inprocess):
    before = {p: p.stat().st_mtime_ns for p in Path(workdir).rglob("*")}
    proc = _run(
        ["clip_jax.evaluate", "--config", f"{REPO}/configs/clip.py", "--workdir", workdir],
        devices=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zeroshot/top1" in proc.stdout and f"eval_{STEPS}.json" in proc.stdout
    path = Path(workdir) / f"eval_{STEPS}.json"
    record = json.loads(path.read_text())
    assert record["step"] == STEPS and record["num_devices"] == 2
    metrics = record["metrics"]
    assert 0 <= metrics["linear_probe/top1"] <= 1 and metrics["linear_probe/num_test"] > 100
    print(
        f"\nlinear probe top1 {100 * metrics['linear_probe/top1']:.2f}% (chance "
        f"{100 * record['details']['linear_probe']['chance_top1']:.2f}%)"
    )
    # Above chance, but no proof of learning: random-init features already give ~28% here.
    assert metrics["linear_probe/top1"] >= 2 * record["details"]["linear_probe"]["chance_top1"]
    # Same results on 2 devices as on 8 (at most one image / caption flips on a float tie).
    for key, value in inprocess[0].items():
        if not key.endswith("/seconds"):
            assert metrics[key] == pytest.approx(value, abs=2.5e-3), key
    assert set(record["details"]["zeroshot"]["per_class_top1"]) == set(
        evaluation.data.classnames_for(
            evaluation.data.source_spec({"source": "demo", "split": "classify"}, "x")
        )
    )
    # Nothing else in the workdir was written.
    after = {p: p.stat().st_mtime_ns for p in Path(workdir).rglob("*")}
    assert {p for p in after if p not in before} == {path}
    assert all(after[p] == t for p, t in before.items() if p != path)


@pytest.mark.slow
def test_cli_missing_step_is_a_one_line_error(workdir):
    proc = _run(["clip_jax.evaluate", "--workdir", workdir, "--step", "7"], devices=1)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"clip_jax.evaluate: error: no checkpoint for step 7 in "
        f"{os.path.join(workdir, 'checkpoints')}; available steps: [{STEPS}]"
    )
    assert not (Path(workdir) / "eval_7.json").exists()


# orbax's async reader reports the damaged read once more from a closed event loop.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_and_mismatched_checkpoints(workdir, tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(None, str(tmp_path / "missing"))
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged, ignore=shutil.ignore_patterns("eval_*.json"))
    for f in (damaged / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # truncate every array data file
            f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(
        EvalError,
        match=rf"^damaged checkpoint: step {STEPS} in .*: unreadable"
        r"( metadata)? \(\w+: [^\n]*$",
    ):
        evaluate(None, str(damaged))
    mismatched = tmp_path / "mismatched"
    shutil.copytree(workdir, mismatched, ignore=shutil.ignore_patterns("eval_*.json"))
    meta = mismatched / "checkpoints" / str(STEPS) / "meta" / "metadata"
    edited = json.loads(meta.read_text().replace('"embed_dim": 128', '"embed_dim": 64'))
    meta.write_text(json.dumps(edited))
    # An edited metadata file fails its checksum ...
    with pytest.raises(EvalError, match=r"damaged checkpoint: .*: metadata checksum mismatch"):
        evaluate(None, str(mismatched))
    # ... and one whose checksum matches but whose arrays do not fit its model config is named.
    meta.write_text(json.dumps(dict(edited, meta_checksum=checkpoint.meta_checksum(edited))))
    with pytest.raises(EvalError, match=r"does not match its model config: 3 shape mismatch"):
        evaluate(None, str(mismatched))
    assert not list(damaged.glob("eval_*.json")) and not list(mismatched.glob("eval_*.json"))


@pytest.mark.slow
def test_load_api_agrees_with_the_evaluator(workdir, inprocess):
    model = inference.load(workdir)
    assert model.step == STEPS
    spec = evaluation.data.source_spec({"source": "demo", "split": "classify"}, "x")
    images, labels = [], []
    for batch in evaluation.data.eval_batches(
        spec,
        image_size=64,
        tokenizer=None,
        context_length=32,
        batch_size=256,
        resize_method="bicubic",
        with_text=False,
    ):
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    classnames = evaluation.data.classnames_for(spec)
    probs = model.classify(images, classnames, templates="generic")
    top1 = float((probs.argmax(axis=1) == labels).mean())
    assert top1 == pytest.approx(inprocess[0]["zeroshot/top1"], abs=2.5e-3)
