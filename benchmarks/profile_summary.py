"""Top ops/kernels by time from a `jax.profiler` trace, without TensorBoard or xprof.

    python benchmarks/profile_summary.py TRACE_DIR [--top 15] [--steps N]

TRACE_DIR is the `logdir` given to `jax.profiler.trace(logdir, create_perfetto_trace=True)`
(or any folder below it). Reads the Chrome-trace json the profiler writes next to the
xplane.pb: `perfetto_trace.json.gz` (written with create_perfetto_trace=True) or
`<host>.trace.json.gz`; both hold complete ("X") events with pid/tid and process/thread name
metadata.

Which events count:
- GPU traces: the device processes ("/device:GPU:0"). Their "XLA Ops" line holds one event
  per HLO op (fusion, custom call, ...): the "top ops" table. The other lines except "XLA
  Modules"/"Steps" (the CUDA streams) hold the kernels: the "top kernels" table.
- CPU traces (the dry run): the host's XLA:CPU worker threads, where XLA_FLAGS=
  --xla_cpu_enable_xprof_traceme=true records one event per fusion; runtime wrappers
  (names with "::" or starting with "$") and the Python thread are left out.
Categories (gemm, attention, conv, collective, copy, other) are guessed from the names with
the regexes in CATEGORIES: a rough split, printed as such.

Prints JSON lines ({"kind": "profile_op" | "profile_category" | "profile_info", ...}).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

CATEGORIES = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|cublas|matmul|\bdot\b|dot[._]|ynn_fusion", re.I)),
    ("conv", re.compile(r"conv", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all_reduce|all-gather|reduce-scatter", re.I)),
    ("copy", re.compile(r"memcpy|memset|^copy|transpose", re.I)),
)
DEVICE_SKIP_LINES = re.compile(r"^(XLA Modules|Steps|Source|Framework|TensorFlow Ops)", re.I)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def find_trace(path: str) -> str:
    """The newest perfetto/Chrome trace json under `path` (a file is returned as is)."""
    if os.path.isfile(path):
        return path
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        found = glob.glob(os.path.join(path, "**", pattern), recursive=True)
        if found:
            return max(found, key=os.path.getmtime)
    raise FileNotFoundError(f"no perfetto_trace.json.gz or *.trace.json.gz under {path}")


def load_events(trace_path: str) -> tuple[list[dict], dict, dict]:
    """(complete events, {pid: process name}, {(pid, tid): thread name})."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e], processes, threads


def count_steps(events: list[dict], name: str = "train") -> int:
    """Step annotations (`jax.profiler.StepTraceAnnotation(name, ...)`) in the trace."""
    return sum(1 for e in events if e["name"] == name and "step_num" in e.get("args", {}))


def summarize(path: str, top: int = 15, steps: int | None = None) -> list[dict]:
    """JSON-able rows: the top `top` op names (and kernels on GPU) by total time, category
    totals, and one info row (trace file, platform, steps, busy time per step)."""
    trace = find_trace(path)
    events, processes, threads = load_events(trace)
    steps = steps or count_steps(events) or 1
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    if devices:
        platform = "device"
        for e in events:
            if e["pid"] not in devices:
                continue
            line = threads.get((e["pid"], e["tid"]), "")
            if line == "XLA Ops":
                groups["op"].append(e)
            elif not DEVICE_SKIP_LINES.match(line):
                groups["kernel"].append(e)
    else:
        platform = "host"
        for e in events:
            line = threads.get((e["pid"], e["tid"]), "")
            name = e["name"]
            if line == "python" or "::" in name or name.startswith("$"):
                continue
            groups["op"].append(e)
    rows = []
    for level, evs in groups.items():
        totals, counts = collections.Counter(), collections.Counter()
        for e in evs:
            totals[e["name"]] += float(e["dur"])
            counts[e["name"]] += 1
        busy = sum(totals.values())
        by_category = collections.Counter()
        for name, us in totals.items():
            by_category[category(name)] += us
        for name, us in totals.most_common(top):
            rows.append(
                {
                    "kind": "profile_op",
                    "level": level,
                    "name": name,
                    "category": category(name),
                    "per_step_ms": us / 1e3 / steps,
                    "count_per_step": counts[name] / steps,
                    "share": us / busy,
                }
            )
        for label, us in by_category.most_common():
            rows.append(
                {
                    "kind": "profile_category",
                    "level": level,
                    "category": label,
                    "per_step_ms": us / 1e3 / steps,
                    "share": us / busy,
                }
            )
    rows.insert(
        0,
        {
            "kind": "profile_info",
            "trace": trace,
            "platform": platform,
            "steps": steps,
            "busy_ms_per_step": {
                level: sum(float(e["dur"]) for e in evs) / 1e3 / steps
                for level, evs in groups.items()
            },
            "events": {level: len(evs) for level, evs in groups.items()},
        },
    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the profiler logdir, a folder below it or a trace file")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps in the trace (default: count 'train' step annotations)",
    )
    args = parser.parse_args(argv)
    for row in summarize(args.path, args.top, args.steps):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
