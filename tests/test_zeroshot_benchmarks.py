"""The CLIP paper's zero-shot benchmark suite (`clip_jax.evaluation.benchmarks`): the shipped
metadata against TFDS's own label metadata, and every benchmark end to end through the
zero-shot evaluator on `tfds.testing.mock_data` (no download) with a very small random model.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import benchmark_mocks
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_jax import sharding as sharding_lib
from clip_jax import tokenizers
from clip_jax.embedder import Embedder
from clip_jax.evaluate import EvalError, evaluate_benchmarks
from clip_jax.evaluation import benchmark, list_benchmarks
from clip_jax.evaluation.benchmark_runner import (
    format_benchmark_table,
    paper_model_for,
    run_benchmarks,
)
from clip_jax.evaluation.benchmarks import METRICS, PAPER_MODELS, resolve
from clip_jax.evaluation.templates import IMAGENET80
from clip_jax.evaluation.zeroshot import class_embeddings, remap_labels
from clip_jax.inference import preprocess_images
from clip_jax.models import (
    CLIPConfig,
    TextTransformerConfig,
    VisionTransformerConfig,
    create_model,
    get_model_config,
)

REPO = Path(__file__).resolve().parents[1]
# Small enough that ImageNet's 1,000 x 80 prompts embed in a few seconds on 2 CPU cores.
MICRO = CLIPConfig(
    embed_dim=16,
    vision=VisionTransformerConfig(image_size=16, patch_size=8, width=32, layers=1, heads=1),
    text=TextTransformerConfig(context_length=16, width=32, layers=1, heads=1),
)
BATCH = 512  # one compiled shape per tower; text batches of 512 prompts
# TFDS label names (from TFDS's code) that OpenAI's prompt list renames.
RENAMED = {
    "caltech101": {
        "car_side": "side of a car",
        "cougar_body": "body of a cougar cat",
        "cougar_face": "face of a cougar cat",
        "crocodile_head": "head of a  crocodile",  # sic, OpenAI's double space
        "faces": "off-center face",
        "faces_easy": "centered face",
        "flamingo_head": "head of a flamingo",
        "yin_yang": "yin and yang symbol",
    },
    "eurosat": {"HerbaceousVegetation": "brushland or shrubland", "SeaLake": "lake or sea"},
    "flowers102": {"ball moss": "air plant"},
}


def _norm(name: str) -> str:
    if name.startswith("/"):  # SUN397 "/j/jail/indoor"
        name = " ".join(name.strip("/").split("/")[1:])
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _open_clip_zero_shot_metadata():
    """open_clip's copy of OpenAI's ImageNet lists, read without importing open_clip (torch)."""
    import importlib.util

    package = importlib.util.find_spec("open_clip")
    path = os.path.join(package.submodule_search_locations[0], "zero_shot_metadata.py")
    spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mocked(tmp_path_factory):
    """Mocked TFDS (one mock for the module: mocks do not nest) with every benchmark prepared
    in a temp data_dir; builder info comes from TFDS's code."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with benchmark_mocks.mock_benchmarks(data_dir):
        for name in list_benchmarks():
            benchmark_mocks.prepare(name)
        yield data_dir


@pytest.fixture(scope="module")
def env():
    model = create_model(MICRO)
    variables = jax.jit(model.init_variables)(jax.random.key(0))
    mesh = sharding_lib.create_mesh()
    embedder = Embedder(model, variables, mesh, batch_size=BATCH)
    return model, variables, tokenizers.get("clip-bpe"), mesh, embedder, {}


def test_metadata_is_well_formed_and_matches_tfds_label_counts(mocked):
    names = list_benchmarks()
    assert names[0] == "imagenet1k" and len(names) == len(set(names)) == 19
    for name in names:
        b = benchmark(name)
        assert b.metric in METRICS, name
        assert all(b.classnames), name
        # OpenAI's ImageNet list names two pairs of classes alike (as the paper used it).
        repeated = {c for c in b.classnames if b.classnames.count(c) > 1}
        assert repeated == (
            {"missile", "sunglasses"}
            if name.startswith("imagenet") and b.num_classes == 1000
            else set()
        ), name
        assert all(t.count("{}") == 1 for t in b.templates), name
        assert set(b.paper) <= set(PAPER_MODELS) and all(0 < v < 100 for v in b.paper.values()), (
            name
        )
        label = tfds.builder(b.tfds_name).info.features[b.label_key]
        if b.class_indices is None:
            assert label.num_classes == b.num_classes, name
        else:  # ImageNet-A/-R: 200 of TFDS's 1,000 labels
            assert label.num_classes == 1000 and b.num_classes == 200, name
            assert sorted(b.class_indices) == list(b.class_indices), name
            assert 0 <= min(b.class_indices) and max(b.class_indices) < 1000, name


def test_classnames_follow_tfds_label_order(mocked):
    """OpenAI's names sit at the TFDS label they describe (several lists were reordered)."""
    imagenet = benchmark("imagenet1k")
    open_clip = _open_clip_zero_shot_metadata()
    assert imagenet.classnames == tuple(open_clip.IMAGENET_CLASSNAMES)
    assert (
        imagenet.templates
        == IMAGENET80
        == tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
    )
    checked = 0
    wnids = tfds.builder("imagenet2012").info.features["label"].names
    for name in ("imagenet_a", "imagenet_r"):
        b = benchmark(name)
        assert b.classnames == tuple(imagenet.classnames[i] for i in b.class_indices)
    # Two well-known members of each subset, by WordNet id.
    assert wnids[benchmark("imagenet_a").class_indices[0]] == "n01498041"  # stingray
    assert wnids[benchmark("imagenet_r").class_indices[0]] == "n01443537"  # goldfish
    for name in list_benchmarks():
        b = benchmark(name)
        tfds_names = tfds.builder(b.tfds_name).info.features[b.label_key].names
        if all(n.isdigit() for n in tfds_names) or tfds_names[0].startswith("n0"):
            continue  # names only known once prepared (CIFAR, STL-10...) or WordNet ids
        renamed = RENAMED.get(name, {})
        for tfds_name, ours in zip(tfds_names, b.classnames):
            if tfds_name in renamed:
                assert ours == renamed[tfds_name], (name, tfds_name, ours)
                continue
            a, o = _norm(tfds_name), _norm(ours)
            assert a in o or o in a or difflib.SequenceMatcher(None, a, o).ratio() >= 0.8, (
                name,
                tfds_name,
                ours,
            )
        checked += 1
    assert checked == 9


@pytest.mark.parametrize("name", list_benchmarks())
def test_benchmark_end_to_end(name, mocked, env):
    """The runner's score equals nearest-class-embedding accuracy computed directly."""
    model, variables, tokenizer, mesh, embedder, cache = env
    b = benchmark(name)
    record = run_benchmarks(
        [b],
        model,
        variables,
        tokenizer,
        mesh,
        mocked,
        batch_size=BATCH,
        paper_model="ViT-B-32",
        embedder=embedder,
        class_cache=cache,
    )
    assert not record["skipped"]
    r = record["results"][name]
    assert r["metrics"]["num_examples"] == benchmark_mocks.NUM_IMAGES
    assert r["num_classes"] == b.num_classes and r["num_templates"] == len(b.templates)
    assert r["paper_score"] == (pytest.approx(b.paper["ViT-B-32"] / 100) if b.paper else None)
    # Labels arrive (remapped to classifier rows for ImageNet-A/-R) under the right names.
    labels = benchmark_mocks.expected_labels(name)
    rows = remap_labels(labels, b.class_indices) if b.class_indices else labels
    counts = {n: c for n, c in r["details"]["class_counts"].items() if c}
    assert counts == {b.classnames[i]: int(c) for i, c in zip(*np.unique(rows, return_counts=True))}
    # Cached class embeddings are those of this benchmark's names and templates.
    probe = [b.classnames[i] for i in sorted({0, int(rows[0]), b.num_classes - 1})]
    fresh = class_embeddings(lambda t: embedder.embed_texts(t, tokenizer), probe, b.templates)
    np.testing.assert_allclose(np.stack([cache[(b.templates, c)] for c in probe]), fresh, atol=2e-5)
    # Accuracy from the same images embedded directly.
    images = [
        im if im.shape[-1] == 3 else np.repeat(im, 3, -1) for im in benchmark_mocks.images(name)
    ]
    image_emb = embedder.embed_images(preprocess_images(images, MICRO.image_size))
    class_emb = np.stack([cache[(b.templates, c)] for c in b.classnames])
    correct = (image_emb @ class_emb.T).argmax(1) == rows
    assert r["metrics"]["top1"] == pytest.approx(correct.mean())
    per_class = [correct[rows == c].mean() for c in np.unique(rows)]
    assert r["metrics"]["mean_per_class"] == pytest.approx(np.mean(per_class))
    assert r["score"] == r["metrics"][b.metric]


def test_benchmark_as_a_config_evaluator(mocked, env):
    """`benchmark(name).zeroshot_block(dir)` in `config.eval` (the trainer's path) gives the
    runner's numbers, ImageNet-R's 200-of-1,000 label mapping included."""
    import ml_collections

    from clip_jax.evaluation import config as eval_config_lib
    from clip_jax.evaluation.runner import evaluate_all

    model, variables, tokenizer, mesh, embedder, cache = env
    config = eval_config_lib.get_default_config()
    config.batch_size = BATCH
    config.evaluators = ml_collections.ConfigDict()
    config.evaluators.imagenet_r = benchmark("imagenet_r").zeroshot_block(mocked)
    metrics, _ = evaluate_all(config, model, variables, tokenizer, mesh)
    record = run_benchmarks(
        [benchmark("imagenet_r")],
        model,
        variables,
        tokenizer,
        mesh,
        mocked,
        batch_size=BATCH,
        embedder=embedder,
        class_cache=cache,
    )
    ours = record["results"]["imagenet_r"]["metrics"]
    for key in ("top1", "top5", "mean_per_class", "num_examples"):
        assert metrics[f"imagenet_r/{key}"] == pytest.approx(ours[key]), key


def test_unprepared_benchmarks_are_skipped_with_the_build_command(mocked, env):
    model, variables, tokenizer, mesh, embedder, cache = env
    for name in ("imagenet1k", "resisc45"):
        benchmark_mocks.unprepare(name)
    try:
        record = run_benchmarks(
            resolve("imagenet1k,mnist,resisc45"),
            model,
            variables,
            tokenizer,
            mesh,
            mocked,
            batch_size=BATCH,
            embedder=embedder,
            class_cache=cache,
        )
    finally:
        for name in ("imagenet1k", "resisc45"):
            benchmark_mocks.prepare(name)
    assert list(record["results"]) == ["mnist"]
    skipped = record["skipped"]
    assert list(skipped) == ["imagenet1k", "resisc45"]
    assert skipped["imagenet1k"]["command"].startswith(
        f"tfds build imagenet2012 --data_dir {mocked} --manual_dir DIR (TFDS cannot download "
        f"it: manual_dir should contain two files: ILSVRC2012_img_train.tar and"
    )
    assert skipped["resisc45"]["command"].startswith(f"tfds build resisc45 --data_dir {mocked}")
    table = format_benchmark_table(record)
    assert f"skipped imagenet1k: imagenet2012 is not prepared in {mocked}; prepare it" in table
    assert table.splitlines()[2].split()[:3] == ["mnist", "mnist", "test"]


def test_resolve_and_unknown_names():
    assert [b.name for b in resolve("all")] == list_benchmarks()
    assert [b.name for b in resolve(" cifar10, mnist,cifar10")] == ["cifar10", "mnist"]
    with pytest.raises(ValueError, match="unknown benchmark.s. imagenet, cifar11; choose"):
        resolve("imagenet,cifar10,cifar11")
    with pytest.raises(ValueError, match="unknown benchmark 'x'"):
        benchmark("x")


def test_remap_labels():
    np.testing.assert_array_equal(remap_labels(np.array([7, 3, 7]), (3, 7)), [1, 0, 1])
    with pytest.raises(ValueError, match=r"1 image\(s\) have labels outside the 2 classes"):
        remap_labels(np.array([3, 4]), (3, 7))


def test_class_cache_embeds_each_class_once():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        rng = np.random.default_rng(len(calls))
        return rng.normal(size=(len(texts), 4)).astype(np.float32)

    cache = {}
    first = class_embeddings(embed, ["a", "b", "c"], ("x {}", "y {}"), cache)
    second = class_embeddings(embed, ["c", "a", "d"], ("x {}", "y {}"), cache)
    assert calls == [["x a", "y a", "x b", "y b", "x c", "y c"], ["x d", "y d"]]
    np.testing.assert_array_equal(second[:2], first[[2, 0]])
    np.testing.assert_allclose(np.linalg.norm(second, axis=1), 1.0, rtol=1e-6)


def test_paper_model_detection():
    for name in PAPER_MODELS:
        openai = get_model_config(f"{name}-quickgelu")
        assert paper_model_for(openai, f"/cache/hub/timm--{name}.openai/model.pt") == name
        assert paper_model_for(openai, "/cache/laion2b/open_clip_model.safetensors") is None
    assert paper_model_for(get_model_config("ViT-B-32"), "/x/OpenAI/ViT-B-32.pt") == "ViT-B-32"
    assert paper_model_for(get_model_config("RN101"), "/x/openai/RN101.pt") is None
    assert paper_model_for(MICRO, "/x/openai/micro.pt") is None


def test_paper_numbers_for_openai_pretrained_names():
    """Weights named `pretrained:ARCH/openai` are recorded as `hf-hub:timm/...openai@COMMIT`
    (model.json "source", `LoadedModel.origin`); with the config such a repo carries (open_clip's
    own `ARCH-quickgelu` model config, read as its open_clip_config.json is) the paper column
    is detected for each of the paper's models, and not for LAION weights of the same shape."""
    import importlib.util

    from clip_jax import hub, open_clip_format

    package = importlib.util.find_spec("open_clip")
    if package is None:
        pytest.skip("open_clip is not installed (test extra)")
    configs = Path(package.submodule_search_locations[0]) / "model_configs"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in PAPER_MODELS:
        model_cfg = json.loads((configs / f"{name}-quickgelu.json").read_text())
        config = open_clip_format.config_from_open_clip(model_cfg)
        repo_id = hub.PRETRAINED[f"{name}/openai"].repo_id
        assert paper_model_for(config, f"hf-hub:{repo_id}@{commit}") == name
        if name == "ViT-B-32":
            laion = hub.PRETRAINED["ViT-B-32/laion2b_s34b_b79k"].repo_id
            assert paper_model_for(config, f"hf-hub:{laion}@{commit}") is None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """The micro model as converted weights whose recorded source mentions openai."""
    from clip_jax import model_store

    variables = jax.jit(create_model(MICRO).init_variables)(jax.random.key(0))
    return str(
        model_store.save_converted(
            tmp_path_factory.mktemp("conv") / "micro",
            MICRO,
            variables,
            source="/weights/openai/micro.pt",
        )
    )


def test_evaluate_benchmarks_table_json_and_paper_column(mocked, converted, tmp_path):
    """What `--benchmarks cifar10,pcam,food101 --paper_model ViT-B-32` does, in-process."""
    workdir = str(tmp_path / "out")
    benchmark_mocks.unprepare("food101")
    try:
        record, path = evaluate_benchmarks(
            None,
            workdir,
            "cifar10,pcam,food101",
            mocked,
            init_from=converted,
            paper_model="ViT-B-32",
        )
    finally:
        benchmark_mocks.prepare("food101")
    lines = format_benchmark_table(record).splitlines()
    table = "\n".join(lines)
    assert lines[0].split() == [
        "benchmark",
        "dataset",
        "metric",
        "classes",
        "images",
        "score",
        "paper",
        "ViT-B-32",
        "diff",
    ], table
    cifar, pcam, mean = lines[2].split(), lines[3].split(), lines[4].split()
    assert cifar[:6] == ["cifar10", "cifar10", "test", "top1", "10", "5"], table
    assert cifar[7] == "91.3" and float(cifar[8]) == pytest.approx(float(cifar[6]) - 91.3), table
    assert pcam[:6] == ["pcam", "patch_camelyon", "test", "top1", "2", "5"], table
    assert pcam[7] == "58.4", table
    assert mean[:3] == ["mean", "2", "benchmarks"], table
    assert float(mean[4]) == pytest.approx((91.3 + 58.4) / 2, abs=0.051), table
    assert lines[5] == (
        f"skipped food101: food101 is not prepared in {mocked}; prepare it with: "
        f"tfds build food101 --data_dir {mocked}"
    ), table
    assert path == os.path.join(workdir, "benchmarks_converted.json")
    saved = json.loads(Path(path).read_text())
    assert saved["paper_model"] == "ViT-B-32" and saved["kind"] == "converted"
    assert sorted(saved["results"]) == ["cifar10", "pcam"] and list(saved["skipped"]) == ["food101"]
    assert saved["results"]["cifar10"]["paper_score"] == pytest.approx(0.913)
    assert saved["summary"]["num_evaluated"] == 2
    # Without --paper_model a converted file whose source mentions openai but whose architecture
    # is not one of OpenAI's gets no paper column.
    record, _ = evaluate_benchmarks(None, workdir, "pcam", mocked, init_from=converted)
    assert record["paper_model"] is None and "paper" not in format_benchmark_table(record)
    # Bad input: one line, exit status 1 (`_benchmarks_main` turns EvalError into that line).
    with pytest.raises(EvalError, match=r"^--benchmarks: unknown benchmark\(s\) cifar11; "):
        evaluate_benchmarks(None, workdir, "cifar11", mocked, init_from=converted)
    with pytest.raises(EvalError, match="^--benchmarks needs --tfds_data_dir"):
        evaluate_benchmarks(None, workdir, "all", None, init_from=converted)
    with pytest.raises(EvalError, match="^--paper_model 'ViT-B-33': the paper has numbers for"):
        evaluate_benchmarks(
            None, workdir, "all", mocked, init_from=converted, paper_model="ViT-B-33"
        )


@pytest.mark.slow
def test_cli_lists_unprepared_benchmarks_without_downloading(converted, tmp_path):
    """The real command line on an empty TFDS data_dir: every benchmark skipped, exit 0."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    (tmp_path / "tfds").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_jax.evaluate",
            "--workdir",
            str(tmp_path / "out"),
            "--init_from",
            converted,
            "--benchmarks",
            "imagenet1k,sun397",
            "--tfds_data_dir",
            str(tmp_path / "tfds"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[2] == "(no benchmark evaluated)", proc.stdout
    assert lines[3].startswith(
        f"skipped imagenet1k: imagenet2012 is not prepared in {tmp_path}"
        f"/tfds; prepare it with: tfds build imagenet2012 --data_dir "
    )
    assert lines[4].endswith(f"tfds build sun397/standard-part1-120k --data_dir {tmp_path}/tfds")
    assert lines[5] == f"wrote {tmp_path}/out/benchmarks_converted.json"
    assert not os.listdir(tmp_path / "tfds")  # nothing downloaded or prepared there
