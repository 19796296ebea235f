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
    row = {"part": part, "ms": 1e3 * seconds, "tflop": flops / 1e12 if flops else None,
           "tflop_per_s": flops / seconds / 1e12 if flops else None, **extra}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    config = models.get_model_config(args.model)
    model = models.create_model(config, dtype=args.dtype)
    variables = jax.jit(model.init_variables)(jax.random.key(0))
    params = variables["params"]
    b, size = args.batch, config.image_size
    images = jax.random.normal(jax.random.key(1), (b, size, size, 3), jnp.float32)
    tokens = jax.random.randint(jax.random.key(2), (b, config.context_length), 1, 1000)

    def image_loss(p, x):
        return jnp.sum(model.apply({**variables, "params": p}, x, method=model.encode_image))

    def text_loss(p, t):
        return jnp.sum(model.apply({**variables, "params": p}, t, method=model.encode_text))

    abstract = lambda *xs: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), xs)
    for part, fn, data in (("image_fwd_bwd", image_loss, images),
                           ("text_fwd_bwd", text_loss, tokens)):
        grad = jax.grad(fn)
        report(part, timed(grad, params, data),
               metrics.model_flops(grad, *abstract(params, data)))

    if config.vision.type == "vit":
        tokens_per_image = (size // config.vision.patch_size) ** 2 + 1
        width = config.vision.width
        a = jnp.ones((b * tokens_per_image, width), args.dtype)
        w = jnp.ones((width, 4 * width), args.dtype)
        matmul = lambda a, w: a @ w
        report("matmul_reference", timed(matmul, a, w),
               2.0 * a.shape[0] * width * 4 * width, shape=[a.shape[0], width, 4 * width])


if __name__ == "__main__":
    main()
