"""Zero-shot parity with open_clip on converted random-init weights.

The same uint8 demo images (the eval pipeline's output) and class names go through open_clip
(torch: OpenAI mean/std normalisation, `open_clip.tokenize`, the usual prompt-ensemble
classifier) and through our zero-shot evaluator and `clip_jax.load(...).classify`; the
predictions must be identical.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from open_clip_peer import make_small_model  # noqa: E402

from clip_jax import convert, evaluation, model_store, tokenizers  # noqa: E402
from clip_jax import sharding as sharding_lib  # noqa: E402
from clip_jax.data import demo_classnames  # noqa: E402
from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from clip_jax.evaluate import EvalError, evaluate  # noqa: E402
from clip_jax.evaluation import data as eval_data  # noqa: E402
from clip_jax.evaluation.templates import get_templates  # noqa: E402
from clip_jax.inference import load  # noqa: E402
from clip_jax.models import create_model  # noqa: E402

TEXT = dict(context_length=32, width=128, layers=2, heads=2)
VISION = dict(image_size=64, patch_size=8, width=128, layers=2)
TEMPLATES = "generic"


def _demo_classify():
    """uint8 [N, 64, 64, 3] images and int labels of the demo classify split, as our eval
    pipeline delivers them."""
    spec = eval_data.source_spec({"source": "demo", "split": "classify"}, "test")
    images, labels = [], []
    for batch in eval_data.eval_batches(
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
    return np.concatenate(images), np.concatenate(labels)


def _open_clip_zeroshot(model, images: np.ndarray, classnames, templates):
    """open_clip's recipe: normalised image features against per-class mean text features."""
    x = (images.astype(np.float32) / 255.0 - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(
        OPENAI_STD, np.float32
    )
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        img = img / img.norm(dim=-1, keepdim=True)
        weights = []
        for name in classnames:
            tokens = open_clip.tokenize(
                [t.format(name) for t in templates], context_length=TEXT["context_length"]
            )
            emb = model.encode_text(tokens)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            weights.append(mean / mean.norm())
        scores = img @ torch.stack(weights).T
        probs = (model.logit_scale.exp() * scores).softmax(dim=-1)
    return scores.numpy(), probs.numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch_model = make_small_model(128, VISION, TEXT, quick_gelu=False, seed=1)
    config, variables = convert.convert_state_dict(torch_model.state_dict(), "tiny-vit")
    directory = model_store.save_converted(
        tmp_path_factory.mktemp("oc") / "tiny", config, variables
    )
    images, labels = _demo_classify()
    classnames = demo_classnames()
    scores, probs = _open_clip_zeroshot(torch_model, images, classnames, get_templates(TEMPLATES))
    return str(directory), images, labels, classnames, scores, probs


def test_load_classify_matches_open_clip(setup):
    directory, images, _, classnames, ref_scores, ref_probs = setup
    model = load(directory, batch_size=128)
    probs = model.classify(images, classnames, TEMPLATES)
    ref_pred = ref_scores.argmax(axis=1)
    # A meaningful comparison: the random model does not predict one class for everything.
    assert len(np.unique(ref_pred)) >= 3, np.bincount(ref_pred)
    np.testing.assert_array_equal(probs.argmax(axis=1), ref_pred)
    np.testing.assert_allclose(probs, ref_probs, atol=2e-4)


def test_zeroshot_evaluator_matches_open_clip(setup):
    directory, _, labels, classnames, ref_scores, _ = setup
    mesh = sharding_lib.create_mesh()
    restored = model_store.load_model(directory, sharding=sharding_lib.replicated(mesh))
    block = evaluation.config.zeroshot_block(source="demo", split="classify")
    block.templates = TEMPLATES
    result = evaluation.evaluate_zeroshot(
        create_model(restored.config),
        restored.variables,
        tokenizers.get(restored.tokenizer),
        mesh,
        block,
    )
    ref_pred = ref_scores.argmax(axis=1)
    correct = ref_pred == labels
    assert result.metrics["num_examples"] == len(labels)
    assert result.metrics["top1"] == pytest.approx(correct.mean(), abs=1e-9)
    top5 = (ref_scores > np.take_along_axis(ref_scores, labels[:, None], 1)).sum(1) < 5
    assert result.metrics["top5"] == pytest.approx(top5.mean(), abs=1e-9)
    for c, name in enumerate(classnames):
        expected = correct[labels == c].mean()
        assert result.details["per_class_top1"][name] == pytest.approx(expected, abs=1e-9), name
    predicted = {n: int((ref_pred == c).sum()) for c, n in enumerate(classnames)}
    assert result.details["predicted_counts"] == predicted


def test_cli_evaluate_init_from_converted_weights(setup, tmp_path):
    directory, _, labels, _, ref_scores, _ = setup
    config = ml_collections.ConfigDict({"eval": evaluation.get_default_config()})
    del config.eval.evaluators["retrieval"], config.eval.evaluators["linear_probe"]
    config.eval.evaluators.zeroshot.templates = TEMPLATES
    metrics, path = evaluate(config, str(tmp_path / "out"), init_from=directory)
    assert path == str(tmp_path / "out" / "eval_converted.json")
    record = json.loads(open(path, encoding="utf-8").read())
    assert record["kind"] == "converted" and record["step"] is None
    expected = float((ref_scores.argmax(axis=1) == labels).mean())
    assert metrics["zeroshot/top1"] == pytest.approx(expected, abs=1e-9)
    assert record["metrics"]["zeroshot/top1"] == metrics["zeroshot/top1"]
    with pytest.raises(EvalError, match="--step applies to workdir checkpoints"):
        evaluate(config, str(tmp_path / "out"), step=3, init_from=directory)
    with pytest.raises(EvalError, match="is not a converted checkpoint"):
        evaluate(config, str(tmp_path / "out"), init_from=str(tmp_path))
