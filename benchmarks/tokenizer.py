"""Micro-benchmark of clip_jax tokenizers: prints JSON lines of texts/s.

    python benchmarks/tokenizer.py [--num-texts 10000] [--batch-size 256] [--rounds 5]
                                   [--threads 1 2] [--open-clip]

Texts are distinct synthetic captions of 5-30 Zipf-distributed words (so the BPE word caches
help as much as on real data, not more), in two sets: "ascii" (plain English) and "mixed" (30%
of captions carry one extra word such as "café", "東京", "🙂", "&amp;" or "don't", so ~13% need
ftfy's cleaning and the Python pre-tokeniser). Each timed round tokenises fresh captions, in
batches of --batch-size, after one untimed warm-up round. Lines report medians over --rounds
rounds of
- texts_per_s: wall clock (spread: min, max), what a pipeline sees on an idle machine;
- cpu_us_per_text: CPU time of the process (all threads) per text, steadier on a busy machine;
- gil_us_per_text (one caller only): the part of it spent outside the native batch call, i.e.
  holding the GIL. Concurrent callers (tf.data's parallel map) cannot tokenise faster than
  1e6 / gil_us_per_text texts/s in total, whatever the number of cores.

Each configuration runs in its own process, because the Rust tokenizer's thread pool is sized
once per process:
- "clip-bpe" with RAYON_NUM_THREADS=N for each N of --threads (one caller; the batch is spread
  over N rayon threads);
- "clip-bpe, 2 callers": TOKENIZERS_PARALLELISM=false (no rayon) and 2 Python threads each
  tokenising every other batch, as tf.data's parallel `numpy_function` calls do;
- "spm" (a SentencePiece model trained on the fly, vocab 8000) with num_threads=N.
With --open-clip, each process also times `open_clip.tokenize` (pure-Python BPE) on the same
captions, rounds interleaved with the others, and reports the ratio to it.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax import tokenizers  # noqa: E402

EXTRA = [
    "café",
    "naïve",
    "東京",
    "猫",
    "🙂",
    "&amp;",
    "it's",
    "don't",
    "2021",
    "42",
    "3.5",
    "A-B",
    "Hello,",
    "World!",
]


def word_pool() -> list[str]:
    """~20k English-looking words (whole-word entries of CLIP's vocabulary), most common first."""
    import gzip

    from clip_jax.tokenizers.bpe import DEFAULT_BPE_PATH, NUM_MERGES

    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    words = []
    for m in merges:
        w = m.replace(" ", "")
        if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 6:
            words.append(w[:-4])
    return words[:20000]


def captions(n: int, seed: int = 0, pool=None, extra: float = 0.3) -> list[str]:
    """Distinct captions of 5-30 Zipf-distributed words; a fraction `extra` gets an EXTRA word."""
    rng = random.Random(seed)
    pool = pool or word_pool()
    weights = [1.0 / (rank + 10) for rank in range(len(pool))]
    out = []
    for i in range(n):
        words = rng.choices(pool, weights, k=rng.randint(5, 30))
        if rng.random() < extra:
            words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRA))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "", "!", f" #{i}"]))
    return out


class NativeTimer:
    """Wraps the native batch calls of a tokenizer and sums the process CPU time spent in them
    (with one caller, that is the CPU time spent without the GIL)."""

    def __init__(self, tok):
        self.cpu_s = 0.0
        if isinstance(tok, tokenizers.ClipBPETokenizer):
            targets = [
                (tok._vocab.ascii, "encode_batch_fast"),
                (tok._vocab.pieces, "encode_batch_fast"),
            ]
        else:
            targets = [(tok._sp, "encode")]
        for obj, name in targets:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu_s += time.process_time() - t0

        return timed


def run_batches(fn, texts: list[str], batch_size: int, callers: int) -> tuple[float, float]:
    """Tokenises `texts` in batches with `callers` Python threads; returns (wall s, CPU s)."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    cpu = time.process_time()
    start = time.perf_counter()
    if callers == 1:
        for b in batches:
            fn(b)
    else:
        threads = [
            threading.Thread(target=lambda k=k: [fn(b) for b in batches[k::callers]])
            for k in range(callers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.perf_counter() - start, time.process_time() - cpu


def worker(args) -> None:
    """One configuration (see the module docstring); prints one JSON line per caption set."""
    L, pool = args.context_length, word_pool()
    tmp = None
    if args.worker == "spm":
        tmp = tempfile.TemporaryDirectory()
        path = tokenizers.train_sentencepiece(
            captions(5000, seed=1, pool=pool), 8000, os.path.join(tmp.name, "bench.model")
        )
        tok = tokenizers.SentencePieceTokenizer(path, num_threads=args.threads)
    else:
        tok = tokenizers.get("clip-bpe")
    t0 = time.perf_counter()
    tok(["warm up: loads the vocabulary, builds the Rust tokenizers"], L)
    load_s = time.perf_counter() - t0
    native = NativeTimer(tok)
    fns = {"new": lambda b: tok(b, L)}
    if args.open_clip:
        import open_clip

        fns["open_clip"] = lambda b: open_clip.tokenize(b, L)
    med = statistics.median
    for name, extra in [("ascii", 0.0), ("mixed", 0.3)]:
        rates, cpu_us, gil_us = {k: [] for k in fns}, {k: [] for k in fns}, []
        for r in range(args.rounds + 1):  # round 0: untimed warm-up of the word caches
            texts = captions(
                args.num_texts, seed=1000 * r + int(extra * 10), pool=pool, extra=extra
            )
            for k, fn in fns.items():
                callers = args.callers if k == "new" else 1
                native_before = native.cpu_s
                wall, cpu = run_batches(fn, texts, args.batch_size, callers)
                if r:
                    rates[k].append(len(texts) / wall)
                    cpu_us[k].append(cpu / len(texts) * 1e6)
                    if k == "new":
                        gil_us.append((cpu - native.cpu_s + native_before) / len(texts) * 1e6)
        line = {
            "benchmark": "tokenizer",
            "tokenizer": args.worker,
            "captions": name,
            "threads": args.threads,
            "callers": args.callers,
            "load_s": round(load_s, 3),
            "texts_per_s": round(med(rates["new"])),
            "spread": [round(min(rates["new"])), round(max(rates["new"]))],
            "cpu_us_per_text": round(med(cpu_us["new"]), 1),
        }
        if args.callers == 1:
            line["gil_us_per_text"] = round(med(gil_us), 1)
        if "open_clip" in rates:
            line["open_clip_texts_per_s"] = round(med(rates["open_clip"]))
            line["open_clip_cpu_us_per_text"] = round(med(cpu_us["open_clip"]), 1)
            ratios = [a / b for a, b in zip(rates["new"], rates["open_clip"])]
            line["ratio_to_open_clip"] = round(med(ratios), 2)
        print(json.dumps(line), flush=True)
    if tmp is not None:
        tmp.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-texts", type=int, default=10000, help="captions per round")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--open-clip",
        action="store_true",
        help="also time open_clip.tokenize (the reference) in each process",
    )
    parser.add_argument("--worker", choices=["clip-bpe", "spm"], help=argparse.SUPPRESS)
    parser.add_argument("--callers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)

    print(
        json.dumps(
            {
                "benchmark": "tokenizer",
                "num_texts": args.num_texts,
                "batch_size": args.batch_size,
                "context_length": args.context_length,
                "rounds": args.rounds,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )
    common = [
        sys.executable,
        os.path.abspath(__file__),
        "--num-texts",
        str(args.num_texts),
        "--batch-size",
        str(args.batch_size),
        "--context-length",
        str(args.context_length),
        "--rounds",
        str(args.rounds),
    ]
    common += ["--open-clip"] if args.open_clip else []
    runs = [("clip-bpe", n, 1, {"RAYON_NUM_THREADS": str(n)}) for n in args.threads]
    runs.append(("clip-bpe", 1, 2, {"TOKENIZERS_PARALLELISM": "false"}))
    runs += [("spm", n, 1, {}) for n in args.threads]
    for name, threads, callers, env in runs:
        subprocess.run(
            common + ["--worker", name, "--threads", str(threads), "--callers", str(callers)],
            env={**os.environ, **env},
            check=True,
        )


if __name__ == "__main__":
    main()
