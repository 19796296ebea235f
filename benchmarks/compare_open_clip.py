"""Times one full training step of clip_jax and of open_clip side by side on this machine.

    python benchmarks/compare_open_clip.py --model ViT-B-32 --batch 64

Same architecture, same global batch, same precision (float32 on CPU), same optimizer (AdamW),
full step (forward, loss, backward, update), after warm-up. The two frameworks alternate in one
process (`--repeats` rounds of `--steps` steps each) and the medians are compared. The first
`--warmup-rounds` alternating rounds are not timed: the first time each framework runs after
the other, the shared heap is still growing and page-faulting (measured: 0.45 s for a
tiny-vit step that settles at 0.24 s; RN50 needed two rounds). Prints one JSON line per
framework (with every round's time, so the spread is visible) and one with the ratio
clip_jax / open_clip (< 1: clip_jax faster). Needs the `test` extra (torch, open_clip_torch).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.modules.setdefault("triton", None)  # torch runs on CPU here; triton clashes with TF/JAX
import jax
import numpy as np
import open_clip
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_step import build_step  # noqa: E402  (same folder)

from clip_jax import host_memory, models  # noqa: E402


def open_clip_model(name: str) -> torch.nn.Module:
    """The open_clip twin of a clip_jax registry model (exact GELU, random init)."""
    config = models.get_model_config(name)
    if name in open_clip.list_models():
        return open_clip.create_model(name, pretrained=None)
    v, t = config.vision, config.text
    if v.type != "vit":
        raise ValueError(f"no open_clip twin for {name!r}")
    vision_cfg = {
        "image_size": v.image_size,
        "layers": v.layers,
        "width": v.width,
        "patch_size": v.patch_size,
        "head_width": v.width // v.heads,
    }
    text_cfg = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
    }
    return open_clip.model.CLIP(config.embed_dim, vision_cfg, text_cfg)


def cpu_name() -> str:
    """'AMD EPYC (family 26, model 2)': the ratio depends on the CPU, so the JSON names it."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        return platform.processor() or platform.machine()
    return (
        f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')})"
    )


def torch_step_fn(model: torch.nn.Module, batch: int, config):
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2
    )
    loss_fn = open_clip.ClipLoss()
    size, length = config.image_size, config.context_length
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, config.text.vocab_size - 1, (batch, length))
    tokens[:, -1] = config.text.vocab_size - 1

    def step():
        opt.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed alternating rounds")
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="untimed alternating rounds before the timed ones",
    )
    args = parser.parse_args()
    # Same process, so both frameworks run with the same allocator settings.
    malloc_tuned = host_memory.tune_for_xla_cpu(default=True)  # as RESULTS.md was measured
    torch.set_num_threads(os.cpu_count() or 1)
    config = models.get_model_config(args.model)

    jitted, state, data, _ = build_step(args.model, args.batch, "float32", None)
    compiled = jitted.lower(state, data).compile()
    state, out = compiled(state, data)  # warm-up
    jax.block_until_ready(out)
    torch_step = torch_step_fn(open_clip_model(args.model), args.batch, config)
    torch_step()  # warm-up

    jax_times, torch_times = [], []
    for round_index in range(args.warmup_rounds + args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = compiled(state, data)
        jax.block_until_ready(out)
        jax_s = (time.perf_counter() - t0) / args.steps
        t0 = time.perf_counter()
        for _ in range(args.steps):
            torch_step()
        torch_s = (time.perf_counter() - t0) / args.steps
        if round_index >= args.warmup_rounds:
            jax_times.append(jax_s)
            torch_times.append(torch_s)

    common = {
        "model": args.model,
        "batch": args.batch,
        "dtype": "float32",
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": os.cpu_count(),
        "malloc_tuned": malloc_tuned,
    }
    jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
    rounded = lambda times: [round(t, 4) for t in times]
    print(
        json.dumps(
            {"framework": "clip_jax", "step_s": jax_s, "round_step_s": rounded(jax_times), **common}
        )
    )
    print(
        json.dumps(
            {
                "framework": "open_clip",
                "step_s": torch_s,
                "round_step_s": rounded(torch_times),
                **common,
            }
        )
    )
    print(json.dumps({"ratio_clip_jax_over_open_clip": jax_s / torch_s, **common}))


if __name__ == "__main__":
    main()
