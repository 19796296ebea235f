"""Padded attention (the cuDNN path's length fix) gives unpadded attention's outputs and
gradients; attention_impl parsing; the cuDNN plan falls back to XLA where cuDNN is absent."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import models
from clip_jax.models import attention


def _qkv(seq, heads=2, head_dim=8, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], shape, jnp.float32)
    return q, k, v, cotangent


def _out_and_grads(fn, q, k, v, cotangent):
    """Output and (dq, dk, dv) for `cotangent`, jitted (eager dispatch is slow on a busy CPU)."""

    @jax.jit
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return run(q, k, v, cotangent)


@pytest.mark.parametrize(
    "seq,length,causal",
    [
        (197, 198, False),
        (197, 256, False),  # ViT-B/16 image tower: even / multiple of 64
        (77, 78, True),
        (77, 128, True),  # text tower (causal)
        (5, 8, False),
        (5, 8, True),
    ],
)
def test_padded_attention_matches_unpadded_outputs_and_gradients(seq, length, causal):
    q, k, v, ct = _qkv(seq)
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
        q,
        k,
        v,
        ct,
    )
    out, grads = _out_and_grads(
        lambda q, k, v: attention.padded_attention(
            q, k, v, causal=causal, length=length, implementation="xla"
        ),
        q,
        k,
        v,
        ct,
    )
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert float(jnp.max(jnp.abs(ref))) > 1e-3, name  # a gradient that can differ
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_padding_without_the_mask_would_change_the_result():
    """The check above can fail: padded keys that are not masked out do change the output."""
    q, k, v, _ = _qkv(7)
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    unmasked = jax.nn.dot_product_attention(*(jnp.pad(x, pad) for x in (q, k, v)))[:, :7]
    ref = jax.nn.dot_product_attention(q, k, v)
    assert float(jnp.max(jnp.abs(unmasked - ref))) > 1e-3


@pytest.mark.parametrize(
    "name,expected",
    [
        (None, (None, None)),
        ("", (None, None)),
        ("xla", ("xla", None)),
        ("cudnn", ("cudnn", None)),
        ("cudnn_padded", ("cudnn", 64)),
        ("cudnn_pad2", ("cudnn", 2)),
        ("xla_pad64", ("xla", 64)),
    ],
)
def test_parse_implementation(name, expected):
    assert tuple(attention.parse_implementation(name)) == expected


@pytest.mark.parametrize("name", ["flash", "cudnn_pad0", "cudnn_pad", "xla_padded_8", "CUDNN"])
def test_parse_implementation_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="attention_impl="):
        attention.parse_implementation(name)


def test_padded_length():
    assert [
        attention.padded_length(n, m)
        for n, m in [(197, 2), (197, 64), (77, 2), (77, 64), (50, 2), (64, 64)]
    ] == [198, 256, 78, 128, 50, 64]


def test_cudnn_falls_back_to_xla_without_a_gpu(caplog):
    attention.cudnn_plan.cache_clear()
    q, k, v, _ = _qkv(9)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        out = attention.dot_product_attention(q, k, v, causal=False, implementation="cudnn")
        attention.dot_product_attention(q, k, v, causal=False, implementation="cudnn")
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-6)
    assert sum("using XLA attention" in r.message for r in caplog.records) == 1  # cached


def test_cudnn_plan_tries_even_then_multiple_of_64(monkeypatch):
    """Where cuDNN refuses odd lengths (jax 0.11.2 on an H100: 'Q 197, KV 197'), the plan
    pads to the first length it accepts; with padding forced it goes straight there."""
    tried = []

    def fake_padded(q, k, v, *, causal, length, implementation):
        tried.append(length)
        if length % 2:
            raise NotImplementedError(f"Unsupported sequence length Q {length}, KV {length}.")
        return q

    monkeypatch.setattr(attention, "padded_attention", fake_padded)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention.cudnn_plan.cache_clear()
    try:
        shape = (2, 197, 2, 8)
        assert attention.cudnn_plan(shape, "bfloat16", False, None) == 198
        assert tried == [197, 198]
        tried.clear()
        assert attention.cudnn_plan(shape, "bfloat16", False, 64) == 256
        assert tried == [256]
        tried.clear()
        assert attention.cudnn_plan((2, 77, 2, 8), "bfloat16", True, 1) is None  # all refused
        assert tried == [77]
    finally:
        attention.cudnn_plan.cache_clear()


def test_model_outputs_unchanged_by_padding():
    """The whole CLIP model through the Transformer's call site: image sequence 17 -> 18,
    text 9 -> 10 (causal), both towers padded. (Gradients: the attention-level test above.)"""
    config = models.get_model_config(
        "tiny-vit",
        embed_dim=32,
        vision=dict(image_size=32, width=32, layers=1),
        text=dict(context_length=9, width=32, layers=1, vocab_size=500),
    )
    images = jax.random.uniform(jax.random.key(1), (2, config.image_size, config.image_size, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, config.context_length), 1, 499)
    ref_model = models.create_model(config)
    variables = jax.jit(ref_model.init_variables)(jax.random.key(0))
    ref = jax.jit(ref_model.apply)(variables, images, tokens)
    out = jax.jit(models.create_model(config, attention_impl="xla_pad2").apply)(
        variables, images, tokens
    )
    for key in ("image_embeddings", "text_embeddings"):
        assert float(jnp.max(jnp.abs(ref[key]))) > 1e-2
        np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=0, err_msg=key)


def test_cudnn_plans_are_reported(monkeypatch):
    monkeypatch.setattr(
        attention, "padded_attention", lambda q, k, v, *, causal, length, implementation: q
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_PLANS", {})
    attention.cudnn_plan.cache_clear()
    try:
        attention.cudnn_plan((2, 77, 2, 8), "bfloat16", True, 2)
    finally:
        attention.cudnn_plan.cache_clear()
    assert attention.cudnn_plans() == [
        {
            "shape": [2, 77, 2, 8],
            "dtype": "bfloat16",
            "causal": True,
            "pad_multiple": 2,
            "length": 78,
        }
    ]
