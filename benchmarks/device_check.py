"""The prepared GPU check: train-step throughput/MFU/memory, attention variants, a profile
summary, the towers' breakdown and input-pipeline scaling, in one bounded run.

Run it through `benchmarks/device_check.sh` (which installs carried wheels first); see that
file's header for the command line. Every measurement runs in its own subprocess (a crash,
an out-of-memory or a hang costs that measurement only, and peak memory is per run) under a
total time budget: measurements run in priority order and the ones that no longer fit are
recorded as skipped. Output:
- stdout: one JSON line per result, each with "part" and "run";
- OUT/results.jsonl: the same lines; OUT/summary.md: the tables; OUT/runs.log: the last
  lines of each subprocess's stderr (a failure's telling line is also in its JSON row);
  OUT/trace.json.gz: the profiled step's perfetto trace if under 15 MiB (ui.perfetto.dev).
OUT is `--out`, else $OUT.

`--dry-run` runs the same parts on CPU at toy sizes (tiny-vit, batch 8, one step, one thread
count) so that the script is known to work before a GPU machine is available
(tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)
import profile_summary  # noqa: E402  (same folder; pure json parsing, no jax)

# The dry run's model: tiny-vit with one block per tower (compiles in half the time).
DRY_OVERRIDES = json.dumps({"vision": {"layers": 1}, "text": {"layers": 1}})
# Model GFLOP per sample (forward + backward of both towers and the loss), counted by
# train_step.py's XLA cost analysis on the development host (RESULTS.md): the fallback when
# the device image's CPU lowering gives no count (seen with jax 0.11.2).
FLOPS_PER_SAMPLE_GFLOP = {"ViT-B-16": 124.0, "ViT-B-32": 44.5}
LOG_LINES = 150
OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM", re.M)
ERROR_LINE = re.compile(r"^\w*(Error|Exception|Exhausted)\b.*|^E\d{4} .*", re.M)


@dataclasses.dataclass
class Run:
    """One measurement: a subprocess whose JSON stdout lines become result rows."""

    part: str
    name: str
    argv: list[str]
    cap_s: float  # its own timeout, cut to what the budget has left
    env: dict = dataclasses.field(default_factory=dict)
    retry_on_oom: "Run | None" = None
    profile_dir: str | None = None  # summarised with profile_summary after the run


def step_run(
    name: str,
    model: str,
    batch: int,
    impl: str,
    *,
    dry: bool,
    remat: str = "none",
    cap_s: float = 150,
    profile_dir: str | None = None,
) -> Run:
    argv = [
        os.path.join(BENCH, "train_step.py"),
        "--model",
        model,
        "--batch",
        str(batch),
        "--dtype",
        "float32" if dry else "bfloat16",
        "--attention-impl",
        impl,
        "--remat",
        remat,
    ]
    argv += (
        ["--steps", "1", "--warmup", "1", "--overrides", DRY_OVERRIDES]
        if dry
        else ["--steps", "10", "--warmup", "3"]
    )
    if model in FLOPS_PER_SAMPLE_GFLOP:  # skip the slow CPU-lowered count for large models
        argv += ["--flops-per-sample", str(FLOPS_PER_SAMPLE_GFLOP[model])]
    if profile_dir:
        argv += ["--profile", profile_dir, "--profile-steps", "2" if dry else "3"]
    return Run("train_step", name, argv, cap_s, profile_dir=profile_dir)


def plan(args, scratch: str) -> list[Run]:
    """All measurements, in priority order (the budget cuts from the end)."""
    dry = args.dry_run
    profile_dir = os.path.join(scratch, "profile")
    runs = [
        Run(
            "env",
            "env",
            [os.path.abspath(__file__), "--env-json"]
            + (["--matmul", "512"] if dry else ["--matmul", "8192"]),
            60,
        )
    ]
    attention_argv = [os.path.join(BENCH, "attention_variants.py")]
    if dry:
        attention_argv += [
            "--cases",
            "tiny-image",
            "--batch",
            "2",
            "--steps",
            "2",
            "--variants",
            "xla,xla_pad2,cudnn,cudnn_pad2,model_cudnn",
        ]
    else:
        attention_argv += ["--cases", "vit-b16,vit-b32,text", "--batch", "256", "--steps", "10"]
    runs.append(Run("attention", "attention_variants", attention_argv, 150))
    if dry:
        # One step run (cudnn falls back to XLA on CPU, so an "xla" run would repeat it).
        runs += [
            step_run("tiny-8-cudnn", "tiny-vit", 8, "cudnn", dry=True, profile_dir=profile_dir)
        ]
        runs[-1].env["XLA_FLAGS"] = " ".join(  # one trace event per XLA:CPU fusion
            [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true"]
        ).strip()
    else:
        b16_512 = step_run("B16-512-cudnn", "ViT-B-16", 512, "cudnn", dry=False)
        b16_512.retry_on_oom = step_run(
            "B16-512-cudnn-remat",
            "ViT-B-16",
            512,
            "cudnn",
            dry=False,
            remat="dots_with_no_batch_dims_saveable",
        )
        runs += [
            step_run("B16-256-xla", "ViT-B-16", 256, "xla", dry=False),
            step_run("B16-256-cudnn", "ViT-B-16", 256, "cudnn", dry=False, profile_dir=profile_dir),
            b16_512,
            step_run("B32-512-cudnn", "ViT-B-32", 512, "cudnn", dry=False),
            step_run("B32-512-xla", "ViT-B-32", 512, "xla", dry=False),
            step_run("B16-256-cudnn_padded", "ViT-B-16", 256, "cudnn_padded", dry=False),
            step_run("B32-256-cudnn", "ViT-B-32", 256, "cudnn", dry=False),
        ]
    breakdown = [os.path.join(BENCH, "step_breakdown.py"), "--attention-impl", "cudnn"]
    breakdown += (
        ["--model", "tiny-vit", "--batch", "4", "--steps", "1", "--overrides", DRY_OVERRIDES]
        if dry
        else ["--model", "ViT-B-16", "--batch", "256", "--dtype", "bfloat16", "--steps", "5"]
    )
    runs.append(Run("breakdown", "step_breakdown", breakdown, 120))
    if args.pipeline:
        cores = len(os.sched_getaffinity(0))
        threads = [1] if dry else [n for n in (2, 4, 8, 16) if n <= cores]
        data_dir = os.path.join(scratch, "pipeline_data")
        for n in threads:
            argv = [
                os.path.join(BENCH, "input_pipeline.py"),
                "--cases",
                "256px",
                "--threads",
                str(n),
                "--data-dir",
                data_dir,
            ]
            argv += ["--quick", "--rounds", "1"] if dry else ["--rounds", "2"]
            runs.append(Run("pipeline", f"pipeline-{n}threads", argv, 120))
    return runs


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def error_summary(stderr: str) -> str:
    """The most telling line of a failed run's stderr (the last exception or XLA error)."""
    matches = [m.group(0) for m in ERROR_LINE.finditer(stderr)]
    return (matches[-1] if matches else tail(stderr, 1))[:400]


def execute(run: Run, timeout: float, log) -> list[dict]:
    """Runs one measurement; returns its rows (a failure is one row with status/error)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **run.env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    base = {"part": run.part, "run": run.name}
    try:
        proc = subprocess.run(
            [sys.executable, *run.argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.monotonic() - start
    # One log file for all runs: $OUT brings back at most 8 files.
    log.write(
        f"\n===== {run.name}: rc={rc}, {seconds:.1f} s\n$ {' '.join(run.argv)}\n"
        f"{tail(stderr, LOG_LINES)}\n"
    )
    log.flush()
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line from a killed run: the failure row says why
            if "part" in data:  # step_breakdown's own key
                data["part_name"] = data.pop("part")
            rows.append({**base, **data})
    if rc != 0:
        status = "timeout" if rc is None else ("oom" if OOM.search(stderr) else "failed")
        rows.append(
            {
                **base,
                "status": status,
                "rc": rc,
                "seconds": round(seconds, 1),
                "error": error_summary(stderr)
                if rc is not None
                else f"killed after {timeout:.0f} s",
            }
        )
    for row in rows:
        row.setdefault("run_seconds", round(seconds, 1))
    return rows


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out


def plan_text(row: dict) -> str | None:
    """'197->198, 77->78' from a train_step row's cuDNN plans (None: none made)."""
    plans = {(p["shape"][1], p["length"]) for p in row.get("attention_plans") or []}
    if not plans:
        return None
    return ", ".join(f"{t}->{'xla' if n is None else n}" for t, n in sorted(plans))


def summary(rows: list[dict], args, seconds: float) -> str:
    lines = [f"# clip_jax device check{' (dry run, CPU)' if args.dry_run else ''}", ""]
    env = next((r for r in rows if r["part"] == "env" and "jax" in r), None)
    if env:
        lines += [
            f"jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax {env.get('flax')}, "
            f"cuDNN {env.get('cudnn')}, device {env.get('device_kind')} x"
            f"{env.get('device_count')}, {env.get('cpu_count')} CPU cores; "
            f"bf16 matmul {env.get('matmul_n')}^3: "
            f"{fmt(env.get('matmul_tflop_per_s'))} TFLOP/s. "
            f"Total {seconds:.0f} s.",
            "",
        ]
    steps = [r for r in rows if r["part"] == "train_step"]
    if steps:
        lines += ["## Train step (synthetic inputs on device; bf16, float32 in the dry run)", ""]
        lines += table(
            [
                "run",
                "model",
                "batch",
                "attention",
                "cuDNN lengths",
                "remat",
                "status",
                "step ms",
                "samples/s",
                "MFU",
                "peak GiB",
                "compile s",
            ],
            [
                [
                    r["run"],
                    r.get("model"),
                    r.get("batch"),
                    r.get("attention_impl"),
                    plan_text(r),
                    r.get("remat"),
                    r.get("status", "ok"),
                    r["step_s"] * 1e3 if r.get("step_s") else None,
                    r.get("samples_per_s"),
                    f"{100 * r['mfu']:.1f}%" if r.get("mfu") else None,
                    r.get("peak_memory_gib"),
                    r.get("compile_s"),
                ]
                for r in steps
            ],
        )
        lines += [""]
    attn = [r for r in rows if r["part"] == "attention"]
    if attn:
        lines += [
            "## Attention variants (forward + backward, max |diff| vs XLA same dtype "
            "and vs float32 XLA)",
            "",
        ]
        lines += table(
            [
                "case",
                "variant",
                "length",
                "status",
                "fwd ms",
                "fwd+bwd ms",
                "grad vs xla",
                "grad vs f32",
                "out vs f32",
                "non-finite",
                "error",
            ],
            [
                [
                    r.get("case", r["run"]),
                    r.get("variant"),
                    r.get("length"),
                    r.get("status"),
                    r.get("fwd_ms"),
                    r.get("fwd_bwd_ms"),
                    r.get("max_abs_grad_vs_xla"),
                    r.get("max_abs_grad_vs_f32"),
                    r.get("max_abs_out_vs_f32"),
                    r.get("nonfinite"),
                    r.get("error"),
                ]
                for r in attn
            ],
        )
        lines += [""]
    parts = [r for r in rows if r["part"] == "breakdown"]
    if parts:
        lines += ["## Where the step goes (towers forward + backward)", ""]
        lines += table(
            ["part", "ms", "TFLOP", "TFLOP/s", "status / error"],
            [
                [
                    r.get("part_name", r.get("run")),
                    r.get("ms"),
                    r.get("tflop"),
                    r.get("tflop_per_s"),
                    r.get("error", r.get("status")),
                ]
                for r in parts
            ],
        )
        lines += [""]
    prof = [r for r in rows if r["part"] == "profile"]
    if prof:
        info = next((r for r in prof if r.get("kind") == "profile_info"), {})
        lines += [
            f"## Profile ({info.get('platform')}, {info.get('steps')} steps; busy ms per "
            f"step {fmt(info.get('busy_ms_per_step'))})",
            "",
        ]
        cats = [r for r in prof if r.get("kind") == "profile_category"]
        lines += table(
            ["level", "category (guessed from names)", "ms/step", "share"],
            [
                [r["level"], r["category"], r["per_step_ms"], f"{100 * r['share']:.1f}%"]
                for r in cats
            ],
        )
        lines += [""]
        ops = [r for r in prof if r.get("kind") == "profile_op"]
        lines += table(
            ["level", "name", "category", "ms/step", "calls/step", "share"],
            [
                [
                    r["level"],
                    r["name"][:80],
                    r["category"],
                    r["per_step_ms"],
                    r["count_per_step"],
                    f"{100 * r['share']:.1f}%",
                ]
                for r in ops
            ],
        )
        lines += [""]
    pipe = [r for r in rows if r["part"] == "pipeline"]
    if pipe:
        lines += ["## Input pipeline scaling (256 px JPEG -> 224, batch 128)", ""]
        lines += table(
            ["threads", "pipeline", "samples/s", "per core", "cpu ms/sample", "status / error"],
            [
                [
                    r["run"],
                    r.get("pipeline", r.get("kind")),
                    r.get("samples_per_s"),
                    r.get("samples_per_s_per_core"),
                    r.get("cpu_ms_per_sample"),
                    r.get("error", r.get("status")),
                ]
                for r in pipe
                if r.get("kind") in ("throughput", None)
            ],
        )
        lines += [""]
    other = [
        r
        for r in rows
        if r.get("status") in ("skipped", "failed", "timeout", "oom")
        and r["part"] not in ("train_step", "attention")
    ]
    if other:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {r['part']} / {r['run']}: {r['status']}: {r.get('error', '')}" for r in other]
        lines += [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers run as subprocesses / by device_check.sh
# --------------------------------------------------------------------------------------------
def env_json(matmul: int) -> None:
    """One JSON line: versions, device, cuDNN, cores, and a bf16 matmul's TFLOP/s."""
    import jax
    import jax.numpy as jnp

    row = {
        "kind": "env",
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
    }
    for dist in (
        "jaxlib",
        "flax",
        "optax",
        "numpy",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
        "tensorflow",
        "tensorflow-cpu",
        "ml-collections",
    ):
        try:
            row[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            row[dist] = None
    try:
        from jax._src.lib import cuda_versions  # private: may move between releases

        row["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except (ImportError, AttributeError) as e:
        row["cudnn"] = f"unknown ({e})"
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        row["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    stats = jax.devices()[0].memory_stats() or {}
    row["memory_limit_gib"] = stats.get("bytes_limit", 0) / 2**30 or None
    a = jax.random.normal(jax.random.key(0), (matmul, matmul), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (matmul, matmul), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    times.sort()
    row["matmul_n"] = matmul
    row["matmul_tflop_per_s"] = 2 * matmul**3 / times[len(times) // 2] / 1e12
    print(json.dumps(row), flush=True)


def missing_wheels(folder: str) -> None:
    """Prints the wheels in `folder` whose distribution is not installed (one per line):
    device_check.sh installs only those, so the machine's own packages are never shadowed."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".whl"):
            continue
        dist = name.split("-")[0]
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            print(os.path.join(folder, name))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes (a smoke run)")
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total seconds for all measurements (default 500; dry run 600)",
    )
    parser.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="skip the input-pipeline scaling part",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts to run (env, attention, train_step, "
        "breakdown, pipeline); default: all",
    )
    parser.add_argument("--env-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--missing-wheels", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.env_json:
        return env_json(args.matmul)
    if args.missing_wheels:
        return missing_wheels(args.missing_wheels)
    if not args.out:
        parser.error("no results folder: pass --out DIR or set $OUT")
    budget = args.budget_s or (600.0 if args.dry_run else 500.0)
    start = time.monotonic()
    deadline = start + budget
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # One process per measurement on one GPU: let it take the card's memory.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.pipeline and importlib.util.find_spec("tensorflow") is None:
        args.pipeline = False
        skipped_pipeline = True
    else:
        skipped_pipeline = False
    only = {p for p in args.only.split(",") if p}
    scratch = tempfile.mkdtemp(prefix="device_check_")
    rows: list[dict] = []
    results = open(os.path.join(args.out, "results.jsonl"), "w")
    log = open(os.path.join(args.out, "runs.log"), "w")

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        results.write(line + "\n")
        results.flush()

    if skipped_pipeline and (not only or "pipeline" in only):
        emit(
            {
                "part": "pipeline",
                "run": "pipeline",
                "status": "skipped",
                "error": "tensorflow is not installed here (its wheel, ~260 MiB, is over the "
                "64 MiB a device call carries): the input pipeline needs tf.data",
            }
        )
    try:
        queue = [r for r in plan(args, scratch) if not only or r.part in only]
        while queue:
            run = queue.pop(0)
            left = deadline - time.monotonic()
            if left < min(run.cap_s, 30 if not args.dry_run else 5):
                emit(
                    {
                        "part": run.part,
                        "run": run.name,
                        "status": "skipped",
                        "error": f"time budget ({budget:.0f} s) spent",
                    }
                )
                continue
            for row in execute(run, min(run.cap_s, left), log):
                emit(row)
            last = rows[-1]
            if last.get("status") == "oom" and run.retry_on_oom:
                queue.insert(0, run.retry_on_oom)
            if run.profile_dir and os.path.isdir(run.profile_dir):
                try:
                    for row in profile_summary.summarize(run.profile_dir, top=15):
                        emit({"part": "profile", "run": run.name, **row})
                    trace = profile_summary.find_trace(run.profile_dir)
                    if os.path.getsize(trace) < 15 * 2**20:  # $OUT brings back <= 16 MiB/file
                        shutil.copy(trace, os.path.join(args.out, "trace.json.gz"))
                except (OSError, ValueError, KeyError) as e:
                    emit(
                        {
                            "part": "profile",
                            "run": run.name,
                            "status": "failed",
                            "error": f"{type(e).__name__}: {e}",
                        }
                    )
    finally:
        results.close()
        log.close()
        text = summary(rows, args, time.monotonic() - start)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(text + "\n")
        print("\n" + text, flush=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
