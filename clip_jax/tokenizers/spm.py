"""SentencePiece tokenizers: load a `.model`, and train one from captions.

Rows are `encode(text) + [eos]` right-padded with 0; no start token is added (`sot_id` is
None). A text too long for `context_length` is cut to `context_length - 1` ids and still ends
with eos. The model must reserve id 0 for padding and define an eos id; models trained by
`train_sentencepiece` (or `python -m clip_jax.tokenizers train`) use

    0 <pad>    1 <unk>    2 </s> (eos)    no bos

Texts are passed to SentencePiece as they are (its own normalizer, NFKC by default, applies);
unlike the CLIP BPE there is no ftfy/HTML cleaning or lower-casing.

Batches are encoded by SentencePiece's native batch call (`encode(list, num_threads=...)`),
which releases the GIL and spreads the texts over `num_threads` C++ threads (-1, the default:
one per core).

Note for text towers: unlike CLIP's BPE, eos is not the largest id, so the end-of-text position
must be found as the first `ids == eot_id` or the last non-zero position, not as `argmax(ids)`.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import sentencepiece

from clip_jax.tokenizers.base import DEFAULT_CONTEXT_LENGTH, Text, Tokenizer, as_str

PAD_ID, UNK_ID, EOS_ID, BOS_ID = 0, 1, 2, -1


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` with pad id 0 and an eos id (see the module docstring).

    `num_threads`: threads encoding each batch (-1: one per core)."""

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        num_threads: int = -1,
    ):
        super().__init__(context_length)
        if (
            isinstance(num_threads, bool)
            or not isinstance(num_threads, int)
            or num_threads == 0
            or num_threads < -1
        ):
            raise ValueError(f"num_threads must be -1 (one per core) or >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"SentencePiece model file not found: {self.model_path}")
        with open(self.model_path, "rb") as f:
            self._load(f.read())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise ValueError(f"not a SentencePiece model: {self.model_path} ({e})") from None
        if sp.pad_id() != 0 or sp.eos_id() < 0:
            raise ValueError(
                f"{self.model_path}: clip_jax needs a SentencePiece model with pad id 0 and an eos"
                f" id (this one has pad_id={sp.pad_id()}, eos_id={sp.eos_id()}, where -1 means"
                " none); train one with `python -m clip_jax.tokenizers train`"
            )
        self._sp = sp

    # Pickles carry the serialized model, so they load where the .model file is absent.
    def __getstate__(self):
        return {
            "context_length": self.context_length,
            "model_path": self.model_path,
            "proto": self._proto,
            "num_threads": self.num_threads,
        }

    def __setstate__(self, state):
        self.context_length = state["context_length"]
        self.num_threads = state.get("num_threads", -1)
        self.model_path = state["model_path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eot_id(self) -> int:
        return self._sp.eos_id()

    @property
    def sot_id(self) -> Optional[int]:
        return None

    def encode(self, text: Text) -> list[int]:
        return self._sp.encode(as_str(text), out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One native call for the batch: C++ threads, GIL released.
        return (
            self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)
            if texts
            else []
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; by default cut at the first eos and skipping pad. Control pieces (pad,
        eos, bos) never produce text; with `skip_special_tokens=False` text after eos is kept."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1).tolist()]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:10]}")
        if skip_special_tokens:
            if self.eot_id in ids:
                ids = ids[: ids.index(self.eot_id)]
            ids = [i for i in ids if i != self.pad_id]
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, context_length={self.context_length})"


def _iter_lines(lines: Iterable) -> Iterable[str]:
    for line in lines:
        line = as_str(line).strip("\r\n")
        if line.strip():
            yield line


def train_sentencepiece(
    lines_or_path: Union[str, os.PathLike, Iterable[Union[str, bytes]]],
    vocab_size: int,
    output: Union[str, os.PathLike],
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    normalization_rule_name: str = "nmt_nfkc",
    input_sentence_size: int = 10_000_000,
    num_threads: Optional[int] = None,
    verbose: bool = False,
    **trainer_kwargs,
) -> str:
    """Trains a SentencePiece model for clip_jax and writes it to `output` (a `.model` file).

    `lines_or_path`: a text file with one caption per line, or an iterable of captions. At
    most `input_sentence_size` captions (sampled at random) are used. Ids are laid out as
    pad=0, unk=1, eos=2, no bos, and `hard_vocab_limit=False`, so a corpus too small for
    `vocab_size` yields a smaller vocabulary instead of failing. Extra keyword arguments go to
    `sentencepiece.SentencePieceTrainer.train` (e.g. `byte_fallback=True`, `split_digits=True`).
    Returns `output` as a string.
    """
    output = os.fspath(output)
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, (int, np.integer))
        or vocab_size < 4
    ):
        raise ValueError(f"vocab_size must be an int >= 4, got {vocab_size!r}")
    options = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        character_coverage=character_coverage,
        normalization_rule_name=normalization_rule_name,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        hard_vocab_limit=False,
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=True,
        num_threads=num_threads or min(os.cpu_count() or 1, 16),
    )
    options.update(trainer_kwargs)
    if isinstance(lines_or_path, (str, os.PathLike)):
        path = os.fspath(lines_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file not found: {path}")
        options["input"] = path
    elif isinstance(lines_or_path, (bytes, bytearray)):
        raise TypeError("lines_or_path must be a path or an iterable of captions, not bytes")
    else:
        options["sentence_iterator"] = iter(_iter_lines(lines_or_path))
    model = io.BytesIO()
    log = None if verbose else open(os.devnull, "w")
    try:
        sentencepiece.SentencePieceTrainer.train(model_writer=model, logstream=log, **options)
    finally:
        if log is not None:
            log.close()
    # Write next to the target and rename, so a reader never sees a half-written model.
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".spm-", suffix=".model.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return output
