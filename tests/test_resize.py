"""Loading weights at another image size / text context: parity of the positional-embedding
resize with open_clip, text truncation, and the trainer continuing at a new size."""

import types

import jax
import numpy as np
import pytest
from train_runs import SMALL_MODEL, get_config

from clip_jax import model_store, models, train
from clip_jax.models import resize


@pytest.mark.parametrize("old,new", [(7, 14), (14, 7), (7, 10), (16, 14)])
def test_resize_pos_embed_matches_open_clip(old, new):
    """Up (112 -> 224 px at patch 16), down, and non-integer factors."""
    import open_clip_peer  # noqa: F401  (test-only torch import, offline settings)
    import torch
    from open_clip.model import resize_pos_embed as open_clip_resize

    pos = np.random.default_rng(old * 100 + new).normal(size=(1 + old * old, 48))
    pos = pos.astype(np.float32)
    state_dict = {"visual.positional_embedding": torch.from_numpy(pos.copy())}
    fake_model = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(new, new)))
    open_clip_resize(state_dict, fake_model)
    want = state_dict["visual.positional_embedding"].numpy()
    got = resize.resize_pos_embed(pos, new)
    assert got.shape == want.shape == (1 + new * new, 48) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], pos[0])  # class token kept
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Not a trivial agreement: a plain (non-antialiased, a = -0.75) bicubic differs.
    plain = torch.nn.functional.interpolate(
        torch.from_numpy(pos[1:].reshape(1, old, old, 48)).permute(0, 3, 1, 2),
        size=(new, new),
        mode="bicubic",
        align_corners=False,
    )
    plain = plain.permute(0, 2, 3, 1).reshape(-1, 48).numpy()
    assert np.abs(plain - want[1:]).max() > 1e-3


def test_adapt_variables_and_errors():
    config = models.get_model_config("tiny-vit")
    variables = jax.eval_shape(models.CLIP(config).init_variables, jax.random.key(0))
    variables = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), variables)
    target = resize.with_input_sizes(config, image_size=32, context_length=16)
    adapted = resize.adapt_variables(variables, target)
    want = jax.eval_shape(models.CLIP(target).init_variables, jax.random.key(0))
    assert jax.tree.map(np.shape, adapted) == jax.tree.map(lambda x: x.shape, want)
    assert (
        adapted["params"]["text"]["token_embedding"]
        is variables["params"]["text"]["token_embedding"]
    )  # untouched leaves are shared
    assert resize.adapt_variables(variables, config) == variables
    # ResNet: the attention pool's grid (size / 32) is resized.
    rn = models.get_model_config("tiny-rn")
    rn_vars = jax.eval_shape(models.CLIP(rn).init_variables, jax.random.key(0))
    rn_vars = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), rn_vars)
    rn_adapted = resize.adapt_variables(rn_vars, resize.with_input_sizes(rn, image_size=128))
    assert rn_adapted["params"]["image"]["attnpool"]["positional_embedding"].shape == (17, 512)

    with pytest.raises(ValueError, match="can only be shortened"):
        resize.adapt_variables(variables, resize.with_input_sizes(config, context_length=64))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        resize.with_input_sizes(config, image_size=60)
    with pytest.raises(ValueError, match="square grid"):
        resize.resize_pos_embed(np.zeros((11, 4), np.float32), 3)


def test_trainer_continues_converted_weights_at_another_size(tmp_path):
    """Weights of a 32 px / context 32 model train at 64 px / context 16, set with the nested
    architecture keys: the first step's learning rate is 0 (warmup), so the saved parameters
    are the adapted ones exactly."""
    base = models.get_model_config("tiny-vit", **SMALL_MODEL)
    low = resize.with_input_sizes(base, image_size=32)
    variables = jax.tree.map(
        np.asarray, jax.jit(models.CLIP(low).init_variables)(jax.random.key(1))
    )
    model_store.save_converted(tmp_path / "low", low, variables)
    # The architecture comes from the converted weights; only the input sizes are set.
    on_synthetic = {"data.source": "synthetic", "batch_size": 8, "total_steps": 1}
    config = get_config(
        init_from=str(tmp_path / "low"),
        **on_synthetic,
        **{"model.vision.image_size": 64, "model.text.context_length": 16},
    )
    train.train(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    loaded = model_store.load_model(str(tmp_path / "w"))
    trained = loaded.variables
    assert loaded.config.vision.image_size == 64
    assert loaded.config.text.context_length == 16
    want = resize.adapt_variables(variables, resize.with_input_sizes(low, 64, 16))
    for path in (("image", "positional_embedding"), ("text", "positional_embedding")):
        got = np.asarray(trained["params"][path[0]][path[1]])
        np.testing.assert_allclose(got, want["params"][path[0]][path[1]], atol=1e-7)
    assert got.shape == (16, 64)
    assert trained["params"]["image"]["positional_embedding"].shape == (1 + 8 * 8, 64)
    # Not a copy of the 32 px grid: the class token is kept, the grid interpolated.
    low_pos = variables["params"]["image"]["positional_embedding"]
    np.testing.assert_array_equal(trained["params"]["image"]["positional_embedding"][0], low_pos[0])


def test_input_sizes_with_init_from_are_checked_from_the_description(tmp_path):
    """What the init_from weights cannot take is a ConfigError naming the key, found from their
    model.json alone (the stand-in arrays fit no model: nothing else is read)."""
    model_store.save_converted(
        tmp_path / "vit",
        models.get_model_config("tiny-vit"),  # 64 px, patch 8, context 32
        {"params": {"x": np.zeros(2, np.float32)}},
    )
    source = str(tmp_path / "vit")
    for overrides, message in (
        (
            {"model.text.context_length": 40},
            "config.model.text.context_length=40: longer than "
            f"the 32 text positions of the init_from weights ({source}); a context can only be "
            "shortened",
        ),
        (
            {"data.context_length": 40},
            "config.data.context_length=40 is longer than the model's "
            "text context config.model.text.context_length=32 (unset: the init_from weights' own)",
        ),
        (
            {"data.context_length": 20, "model.text.context_length": 16},
            "config.data.context_length=20 is longer than the model's text context "
            "config.model.text.context_length=16; ",
        ),
        (
            {"model.vision.image_size": 60},
            "config.model.vision.image_size=60: image_size 60 is "
            "not divisible by patch_size 8 (the vit tower of the init_from weights)",
        ),
        ({"model.vision.image_size": 0}, "config.model.vision.image_size=0: must be a positive"),
        (
            {"model.vision.width": 32},
            "config.model.vision.width=32: architecture fields must stay unset with init_from",
        ),
    ):
        bad = get_config(init_from=source, **{"data.source": "synthetic", **overrides})
        with pytest.raises(train.ConfigError) as error:
            train.validate_config(bad)
        assert str(error.value).startswith(message), str(error.value)
    # Sizes it can take pass: a smaller grid and a shorter context.
    train.validate_config(
        get_config(
            init_from=source,
            **{"data.source": "synthetic", "model.vision.image_size": 32},
            **{"model.text.context_length": 16, "data.context_length": 8},
        )
    )
