"""Recipe search for the default demo run, by HELD-OUT RETRIEVAL only.

    PYTHONPATH=. python benchmarks/demo_recipe.py --steps 250 --eval-every 50 \
        --candidate base: --candidate lr2e-3:optim.lr=0.002 \
        --candidate aug:data.aug_scale=(0.6,1.0) ...

Each candidate is `name:key=value,key=value` (dotted keys of `configs/clip.py:<--variant>`,
default tiny, values as on the command line). Every candidate trains with the real trainer
(`python -m clip_jax.train`, one subprocess at a time, the same seed) for `--steps` steps with a
warmup of 10% of them, and is evaluated every `--eval-every` steps with the retrieval evaluator
ALONE on the demo `heldout` split, then its final weights are scored on the zero-shot proxy
that `benchmarks/demo_templates.py` builds from the same `heldout` split (images whose caption
names exactly one category word): the zero-shot `classify` split is a test set and is never
looked at here.

Accuracy at a given step count does not depend on the machine's load; step time does, so
compare `seconds` only between candidates run in the same window.

Prints one JSON line per candidate: overrides, the retrieval curve (image->text and
text->image R@1/5/10 and their mean at each evaluation), train seconds, the final loss and
`heldout_zeroshot`: the proxy's [top-1, mean-per-class] % per template set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A config file that is configs/clip.py with only the held-out retrieval evaluator.
_RETRIEVAL_ONLY = """
import importlib.util
_spec = importlib.util.spec_from_file_location("clip_config", {config!r})
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config(variant="demo"):
    c = _module.get_config(variant)
    for name in list(c.eval.evaluators.keys()):
        if name != "retrieval":
            del c.eval.evaluators[name]
    return c
"""


def parse_candidate(text: str) -> tuple[str, list[str]]:
    """`"name:a=1,b.c=(0.5,1.0)"` -> `("name", ["--config.a=1", "--config.b.c=(0.5,1.0)"])`;
    commas inside parentheses belong to the value."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"candidate {text!r} has no name before ':'")
    flags, depth, current = [], 0, ""
    for ch in rest + ",":
        if ch == "," and depth == 0:
            if current.strip():
                if "=" not in current:
                    raise ValueError(f"candidate {name}: {current!r} is not key=value")
                flags.append(f"--config.{current.strip()}")
            current = ""
            continue
        depth += ch in "([" and 1 or 0
        depth -= ch in ")]" and 1 or 0
        current += ch
    return name, flags


def run(name: str, flags: list[str], args, config_path: str) -> dict:
    workdir = os.path.join(args.workdir, name)
    steps = args.steps
    for flag in flags:  # a candidate may change the step count (e.g. half the batch)
        if flag.startswith("--config.total_steps="):
            steps = int(flag.split("=", 1)[1])
    command = [
        sys.executable,
        "-m",
        "clip_jax.train",
        "--config",
        f"{config_path}:{args.variant}",
        "--workdir",
        workdir,
        f"--config.total_steps={steps}",
        f"--config.optim.warmup_steps={max(1, steps // 10)}",
        f"--config.eval_every={args.eval_every}",
        "--config.checkpoint_every=0",
        f"--config.log_every={args.eval_every}",
        *flags,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"name": name, "flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    curve = []
    for row in rows:
        if "retrieval/image_to_text_R@10" in row:
            r = {k.split("/", 1)[1]: round(100 * v, 2) for k, v in row.items() if "_R@" in k}
            r["mean_recall"] = round(100 * row["retrieval/mean_recall"], 2)
            curve.append({"step": row["step"], **r})
    losses = [row["loss"] for row in rows if "loss" in row]
    proxy = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "demo_templates.py"), workdir],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proxy.returncode != 0:
        heldout_zeroshot = {"error": proxy.stderr.strip().splitlines()[-1:]}
    else:
        scores = json.loads(proxy.stdout.strip().splitlines()[-1])
        heldout_zeroshot = {k: v for k, v in scores.items() if isinstance(v, list)}
    return {
        "name": name,
        "flags": flags,
        "steps": steps,
        "seconds": round(seconds, 1),
        "final_loss": round(losses[-1], 4) if losses else None,
        "curve": curve,
        "heldout_zeroshot": heldout_zeroshot,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help="configs/clip.py variant to start from")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--workdir", default="", help="runs go here (default: a temp folder)")
    parser.add_argument("--candidate", action="append", required=True, help="name:key=value,...")
    args = parser.parse_args()
    candidates = [parse_candidate(c) for c in args.candidate]
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        config_path = os.path.join(tmp, "retrieval_only.py")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(_RETRIEVAL_ONLY.format(config=str(REPO / "configs" / "clip.py")))
        for name, flags in candidates:
            print(json.dumps(run(name, flags, args, config_path)), flush=True)


if __name__ == "__main__":
    main()
