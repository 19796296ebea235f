"""Where a training step's time goes: times the parts of one CLIP step separately.

    python benchmarks/step_breakdown.py --model ViT-B-16 --batch 256 --dtype bfloat16

Prints one JSON line per part: image tower forward+backward, text tower forward+backward (each
with its model FLOPs and achieved FLOP/s), and a plain bf16 matmul of the MLP's shape as the
attainable reference on this device.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import metrics, models


def timed(fn, *args, steps=8, warmup=2) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def report(part: str, seconds: float, flops: float | None, **extra) -> None:
    row = {
        "part": part,
        "ms": 1e3 * seconds,
        "tflop": flops / 1e12 if flops else None,
        "tflop_per_s": flops / seconds / 1e12 if flops else None,
        **extra,
    }
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--attention-impl",
        default=None,
        help="an attention_impl (clip_jax.models.attention); default: JAX's",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed calls per part")
    parser.add_argument(
        "--overrides", default="", help="JSON object of model config overrides (see train_step.py)"
    )
    args = parser.parse_args()
    config = models.get_model_config(
        args.model, **(json.loads(args.overrides) if args.overrides else {})
    )
    model = models.create_model(config, dtype=args.dtype, attention_impl=args.attention_impl)
    variables = jax.jit(model.init_variables)(jax.random.key(0))
    params = variables["params"]
    b, size = args.batch, config.image_size
    images = jax.random.normal(jax.random.key(1), (b, size, size, 3), jnp.float32)
    tokens = jax.random.randint(jax.random.key(2), (b, config.context_length), 1, 1000)

    # FLOPs are counted on the model with XLA attention on the unpadded sequence (the model's
    # FLOPs), whatever --attention-impl runs.
    flops_model = models.create_model(config, dtype=args.dtype)

    def image_loss(p, x, m=model):
        return jnp.sum(m.apply({**variables, "params": p}, x, method=m.encode_image))

    def text_loss(p, t, m=model):
        return jnp.sum(m.apply({**variables, "params": p}, t, method=m.encode_text))

    abstract = lambda *xs: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), xs)
    for part, fn, data in (
        ("image_fwd_bwd", image_loss, images),
        ("text_fwd_bwd", text_loss, tokens),
    ):
        grad = jax.grad(fn)
        count = jax.grad(lambda p, x, fn=fn: fn(p, x, flops_model))
        report(
            part,
            timed(grad, params, data, steps=args.steps),
            metrics.model_flops(count, *abstract(params, data)),
            attention_impl=args.attention_impl or "default",
        )

    if config.vision.type == "vit":
        tokens_per_image = (size // config.vision.patch_size) ** 2 + 1
        width = config.vision.width
        a = jnp.ones((b * tokens_per_image, width), args.dtype)
        w = jnp.ones((width, 4 * width), args.dtype)
        matmul = lambda a, w: a @ w
        report(
            "matmul_reference",
            timed(matmul, a, w, steps=args.steps),
            2.0 * a.shape[0] * width * 4 * width,
            shape=[a.shape[0], width, 4 * width],
        )


if __name__ == "__main__":
    main()
