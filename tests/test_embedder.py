"""The embedder evaluates FSDP-sharded parameters where they lie (as the trainer's in-training
evaluation passes them): no replicated copy, and the same embeddings and evaluation metrics as
with replicated parameters. Runs on the 8 virtual CPU devices of conftest.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from clip_jax import evaluation, sharding, tokenizers
from clip_jax.embedder import Embedder
from clip_jax.models import create_model, get_model_config


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8
    # One layer per tower: fewer compile seconds; the parameter layout is what matters here.
    model = create_model(get_model_config("tiny-vit", vision={"layers": 1}, text={"layers": 1}))
    variables = jax.device_get(jax.jit(model.init_variables)(jax.random.key(3)))
    mesh = sharding.create_mesh(data=1, fsdp=8)
    specs = sharding.param_specs(mesh, variables["params"])
    fsdp = {
        "params": jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), variables["params"], specs
        )
    }
    return model, variables, fsdp, mesh


def test_fsdp_parameters_are_used_in_place(setup):
    model, _, fsdp, mesh = setup
    leaves = jax.tree.leaves(fsdp)
    sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert len(sharded) > len(leaves) // 2  # the test is about sharded parameters
    embedder = Embedder(model, fsdp, mesh, batch_size=16)
    for given, used in zip(leaves, jax.tree.leaves(embedder.variables)):
        assert used is given  # no copy, no replication
    # Weights from elsewhere (host arrays, another mesh) are replicated over the mesh.
    other_mesh = sharding.create_mesh()
    moved = jax.device_put(fsdp["params"]["logit_scale"], sharding.replicated(other_mesh))
    placed = Embedder(model, {"params": {"x": moved}}, mesh).variables["params"]["x"]
    assert placed.sharding == sharding.replicated(mesh)


def test_fsdp_and_replicated_parameters_give_the_same_evaluation(setup):
    model, variables, fsdp, mesh = setup
    replicated = Embedder(model, variables, mesh, batch_size=16)
    sharded = Embedder(model, fsdp, mesh, batch_size=16)
    assert replicated.variables["params"]["logit_scale"].sharding.is_fully_replicated
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    tokenizer = tokenizers.get("clip-bpe")
    texts = ["a red square", "a photo of a dog", "clip art of a tree"]
    np.testing.assert_allclose(
        sharded.embed_images(images), replicated.embed_images(images), atol=1e-6
    )
    np.testing.assert_allclose(
        sharded.embed_texts(texts, tokenizer), replicated.embed_texts(texts, tokenizer), atol=1e-6
    )

    config = evaluation.get_default_config()
    config.batch_size = 64
    for name in ("retrieval", "linear_probe"):  # same embedder path; zero-shot is enough
        del config.evaluators[name]
    # What clip_jax.train's `_evaluate` runs: the train state's params as they are sharded.
    got = evaluation.run_evaluators(config, model, fsdp, tokenizer, mesh, step=1)
    want = evaluation.run_evaluators(config, model, variables, tokenizer, mesh, step=1)
    assert got["zeroshot/num_examples"] == 428
    for key, value in want.items():
        if not key.endswith("/seconds"):
            assert got[key] == pytest.approx(value, abs=1e-9), key
