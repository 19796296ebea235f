"""Command line for clip_jax tokenizers.

    python -m clip_jax.tokenizers train --input captions.txt --vocab-size 32000 --output spm.model
    python -m clip_jax.tokenizers encode --tokenizer clip-bpe "a photo of a cat" "a dog"
    python -m clip_jax.tokenizers encode --tokenizer spm.model --context-length 16 "a dog"
    python -m clip_jax.tokenizers decode --tokenizer clip-bpe 320 1125 539 320 2368

`encode` prints one line of space-separated ids per text (read from stdin, one per line, when
no text is given): the ids of `encode()` without special tokens, or with `--context-length N`
the full padded row the model sees. `train` prints a JSON summary of the model.
"""

from __future__ import annotations

import argparse
import json
import sys

from clip_jax import tokenizers


def _train(args) -> int:
    out = tokenizers.train_sentencepiece(
        args.input,
        args.vocab_size,
        args.output,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        normalization_rule_name=args.normalization_rule_name,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.num_threads,
        verbose=args.verbose,
    )
    tok = tokenizers.SentencePieceTokenizer(out)
    print(
        json.dumps(
            {
                "output": out,
                "vocab_size": tok.vocab_size,
                "pad_id": tok.pad_id,
                "eot_id": tok.eot_id,
                "model_type": args.model_type,
            }
        )
    )
    return 0


def _encode(args) -> int:
    tok = tokenizers.get(args.tokenizer)
    texts = args.texts if args.texts else [line.rstrip("\n") for line in sys.stdin]
    for text in texts:
        if args.context_length is None:
            ids = tok.encode(text)
        else:
            ids = tok([text], context_length=args.context_length)[0].tolist()
        print(" ".join(map(str, ids)))
    return 0


def _decode(args) -> int:
    tok = tokenizers.get(args.tokenizer)
    print(tok.decode(args.ids, skip_special_tokens=not args.keep_special))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_jax.tokenizers",
        description="clip_jax tokenizers: train, encode, decode",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a SentencePiece model on captions")
    p.add_argument("--input", required=True, help="text file, one caption per line")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--normalization-rule-name",
        default="nmt_nfkc",
        help="SentencePiece normalizer, e.g. nmt_nfkc, nmt_nfkc_cf (case folding)",
    )
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=10_000_000,
        help="captions sampled for training at most",
    )
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    p.set_defaults(fn=_train)

    p = sub.add_parser("encode", help="print the ids of texts")
    p.add_argument("--tokenizer", default="clip-bpe", help="clip-bpe, openai, or a .model path")
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="print the padded row of this length instead of the bare ids",
    )
    p.add_argument("texts", nargs="*", help="texts (default: lines of stdin)")
    p.set_defaults(fn=_encode)

    p = sub.add_parser("decode", help="print the text of ids")
    p.add_argument("--tokenizer", default="clip-bpe", help="clip-bpe, openai, or a .model path")
    p.add_argument(
        "--keep-special",
        action="store_true",
        help="do not stop at end-of-text nor drop start/padding tokens",
    )
    p.add_argument("ids", nargs="+", type=int)
    p.set_defaults(fn=_decode)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
