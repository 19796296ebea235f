"""Attention kernels side by side: XLA vs cuDNN, unpadded vs padded, at the towers' shapes.

    python benchmarks/attention_variants.py --batch 256 --dtype bfloat16

For each case (vit-b16: 197 tokens, 12 heads; vit-b32: 50 tokens; text: 77 tokens, 8 heads,
causal; head dim 64) and each variant, prints one JSON line: whether the variant compiled
(cuDNN may refuse a length: the error's first line is kept), the padded length, forward and
forward+backward time (median), and the largest absolute differences of the output and of
dq/dk/dv from (a) the plain XLA variant in the same dtype and (b) a float32 XLA reference at
"highest" matmul precision, plus NaN/inf counts. cuDNN's backward has had NaN bugs at awkward
lengths, hence the gradient checks.

Variants: xla, xla_pad2, xla_pad64 (XLA on the padded sequence: the cost of padding alone),
cudnn (the sequence as is), cudnn_pad2, cudnn_pad64, and model_cudnn: what
`model.attention_impl="cudnn"` picks (`clip_jax.models.attention.cudnn_plan`).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models import attention

# name: (sequence length, heads, head dim, causal)
CASES = {
    "vit-b16": (197, 12, 64, False),
    "vit-b32": (50, 12, 64, False),
    "text": (77, 8, 64, True),
    # tiny-vit's towers (the dry run): 65 image tokens, 32 text tokens
    "tiny-image": (65, 2, 64, False),
    "tiny-text": (32, 2, 64, True),
}
VARIANTS = ("xla", "xla_pad2", "xla_pad64", "cudnn", "cudnn_pad2", "cudnn_pad64", "model_cudnn")


def variant_fn(variant: str, causal: bool, seq: int):
    """(fn(q, k, v) -> out, the sequence length it runs at) for `variant`."""
    if variant == "model_cudnn":
        return (
            lambda q, k, v: attention.dot_product_attention(
                q, k, v, causal=causal, implementation="cudnn"
            )
        ), None
    impl = attention.parse_implementation(variant)
    length = seq if impl.pad_multiple is None else attention.padded_length(seq, impl.pad_multiple)
    return (
        lambda q, k, v: attention.padded_attention(
            q, k, v, causal=causal, length=length, implementation=impl.backend
        )
    ), length


def fwd_bwd(fn):
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return run


def median_time(compiled, args, steps: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def max_abs(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def nonfinite(tree) -> int:
    return int(
        sum(int(jnp.sum(~jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(tree))
    )


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_case(name: str, batch: int, dtype: str, variants, steps: int) -> None:
    seq, heads, head_dim, causal = CASES[name]
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    with jax.default_matmul_precision("highest"):
        ref_fn = jax.jit(
            fwd_bwd(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=causal, implementation="xla"
                )
            )
        )
        ref_out, ref_grads = ref_fn(q, k, v, ct)
    args = tuple(x.astype(dtype) for x in (q, k, v, ct))
    base = None
    for variant in variants:
        fn, length = variant_fn(variant, causal, seq)
        row = {
            "benchmark": "attention_variants",
            "case": name,
            "variant": variant,
            "batch": batch,
            "seq": seq,
            "heads": heads,
            "head_dim": head_dim,
            "causal": causal,
            "dtype": dtype,
            "length": length,
            "backend": jax.default_backend(),
        }
        if variant == "model_cudnn":
            row["length"] = attention.cudnn_plan(shape, str(jnp.dtype(dtype)), causal, None)
            row["plan"] = "xla (cuDNN refused)" if row["length"] is None else "cudnn"
        try:
            start = time.perf_counter()
            compiled_fb = jax.jit(fwd_bwd(fn)).lower(*args).compile()
            compiled_f = jax.jit(fn).lower(*args[:3]).compile()
            row["compile_s"] = time.perf_counter() - start
            out, grads = compiled_fb(*args)
        except Exception as e:  # noqa: BLE001  (a refused/failed variant is a result: recorded)
            row.update(status="failed", error=first_line(e))
            print(json.dumps(row), flush=True)
            continue
        row.update(
            status="ok",
            fwd_ms=1e3 * median_time(compiled_f, args[:3], steps),
            fwd_bwd_ms=1e3 * median_time(compiled_fb, args, steps),
            nonfinite=nonfinite((out, grads)),
            max_abs_out_vs_f32=max_abs(out, ref_out),
            max_abs_grad_vs_f32=max(max_abs(g, r) for g, r in zip(grads, ref_grads)),
            max_abs_ref_grad=max(float(jnp.max(jnp.abs(r))) for r in ref_grads),
        )
        if variant == "xla":
            base = (out, grads)
        elif base is not None:
            row["max_abs_out_vs_xla"] = max_abs(out, base[0])
            row["max_abs_grad_vs_xla"] = max(max_abs(g, r) for g, r in zip(grads, base[1]))
        print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default="vit-b16,vit-b32,text",
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(cases) - set(CASES)) + sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(
            f"unknown cases/variants {unknown}; cases: {list(CASES)}, variants: {list(VARIANTS)}"
        )
    if "xla" in variants:  # the comparison base runs first
        variants.remove("xla")
        variants.insert(0, "xla")
    for case in cases:
        run_case(case, args.batch, args.dtype, variants, args.steps)


if __name__ == "__main__":
    main()
