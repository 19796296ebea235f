"""Micro-benchmark of clip_jax tokenizers: prints one JSON line of texts/s.

    python benchmarks/tokenizer.py [--num-texts 20000] [--batch-size 256] [--open-clip]

Texts are distinct synthetic captions of Zipf-distributed words (so the BPE word cache helps
as much as on real data, not more). "cold" is the first pass over the texts, "warm" a second
pass over the same texts. The SentencePiece model is trained on the fly (vocab 8000).
With --open-clip, open_clip.tokenize is timed on the same texts for reference.
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_jax import tokenizers  # noqa: E402

EXTRA = "café naïve 東京 猫 🙂 &amp; it's don't 2021 42 3.5 A-B Hello, World!".split()


def word_pool():
    """~20k English-looking words (whole-word entries of CLIP's vocabulary), most common first."""
    import gzip
    from clip_jax.tokenizers.bpe import DEFAULT_BPE_PATH
    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    words = []
    for m in merges:
        w = m.replace(" ", "")
        if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 6:
            words.append(w[:-4])
    return words[:20000]


def captions(n, seed=0, pool=None):
    """Distinct captions of Zipf-distributed words, so the BPE cache warms up as on real data."""
    rng = random.Random(seed)
    pool = pool or word_pool()
    weights = [1.0 / (rank + 10) for rank in range(len(pool))]
    out = []
    for i in range(n):
        words = rng.choices(pool, weights, k=rng.randint(5, 25))
        if rng.random() < 0.3:
            words.append(rng.choice(EXTRA))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "", "!", f" #{i}"]))
    return out


def texts_per_s(fn, texts, batch_size):
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        fn(texts[i:i + batch_size])
    return len(texts) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-texts", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--open-clip", action="store_true", help="also time open_clip.tokenize")
    args = parser.parse_args()

    pool = word_pool()
    texts = captions(args.num_texts, pool=pool)
    L = args.context_length
    result = {"benchmark": "tokenizer", "num_texts": len(texts), "batch_size": args.batch_size,
              "context_length": L, "python": platform.python_version()}

    bpe = tokenizers.get("clip-bpe")
    t0 = time.perf_counter()
    bpe("warm up the vocabulary load")
    result["clip_bpe_vocab_load_s"] = round(time.perf_counter() - t0, 3)
    result["clip_bpe_texts_per_s_cold"] = round(texts_per_s(lambda b: bpe(b, L), texts,
                                                            args.batch_size))
    result["clip_bpe_texts_per_s_warm"] = round(texts_per_s(lambda b: bpe(b, L), texts,
                                                            args.batch_size))
    bytes_texts = [t.encode() for t in texts]
    result["clip_bpe_texts_per_s_bytes"] = round(texts_per_s(lambda b: bpe(b, L), bytes_texts,
                                                             args.batch_size))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = tokenizers.train_sentencepiece(captions(5000, seed=1, pool=pool), 8000,
                                              os.path.join(tmp, "bench.model"))
        result["spm_train_s"] = round(time.perf_counter() - t0, 3)
        sp = tokenizers.get(path)
        result["spm_vocab_size"] = sp.vocab_size
        result["spm_texts_per_s"] = round(texts_per_s(lambda b: sp(b, L), texts,
                                                      args.batch_size))

    if args.open_clip:
        import open_clip
        open_clip.tokenize(["warm up"])
        # Same texts, both BPE caches empty.
        fresh = captions(args.num_texts, seed=2, pool=pool)
        result["open_clip_texts_per_s_cold"] = round(texts_per_s(
            lambda b: open_clip.tokenize(b, L), fresh, args.batch_size))
        bpe._vocab.token_ids.cache_clear()
        result["clip_bpe_texts_per_s_cold_same_texts"] = round(texts_per_s(
            lambda b: bpe(b, L), fresh, args.batch_size))
        result["open_clip_texts_per_s_warm"] = round(texts_per_s(
            lambda b: open_clip.tokenize(b, L), fresh, args.batch_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
