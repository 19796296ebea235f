"""Batched, sharded embedding of images and texts with frozen model variables.

Serves the inference API (`clip_jax.load`) and the evaluators (`clip_jax.evaluation`, also
run by the trainer every `eval_every` steps). One jitted function per tower, cached per
(model, mesh); jit compiles it once per variable layout, so the trainer's repeated evaluations
reuse the compiled programs (only the values change). The variables keep the layout they have
on the mesh: the trainer's FSDP-sharded parameters are all-gathered inside the program where
each weight is used (as the train step does), never copied replicated between evaluations;
weights from elsewhere (NumPy, one device, another mesh) are replicated once.
Batches are split over the mesh's data-parallel axes; the embeddings come back replicated so
every process holds all of them (evaluation sets are small enough). Every process reads the
whole evaluation set and places its own rows (`jax.make_array_from_callback`), which keeps
multi-host evaluation free of any gathering of strings or labels.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clip_jax import sharding as sharding_lib
from clip_jax.data.transforms import normalize_images
from clip_jax.models import l2_normalize


@functools.lru_cache(maxsize=8)
def jitted_towers(model, mesh: Mesh):
    """(image_fn, text_fn): jitted `(variables, uint8 [B,H,W,3]) -> float32 [B, D]` and
    `(variables, int32 [B, L]) -> float32 [B, D]`, L2-normalised, replicated outputs.

    The inputs keep the shardings they carry (variables: replicated or FSDP-sharded on `mesh`;
    batches: `sharding.batch_sharding(mesh)`), so no in_shardings are fixed here."""
    replicated = sharding_lib.replicated(mesh)

    def gather(variables):
        # FSDP-sharded weights are all-gathered where they are used; without the constraint
        # GSPMD would carry their feature-dim sharding into the activations (see
        # clip_jax.step's `gather`). A no-op for replicated variables.
        return jax.lax.with_sharding_constraint(variables, replicated)

    def image_fn(variables, images):
        x = normalize_images(images, model.dtype)
        return l2_normalize(model.apply(gather(variables), x, method=model.encode_image))

    def text_fn(variables, tokens):
        return l2_normalize(model.apply(gather(variables), tokens, method=model.encode_text))

    return jax.jit(image_fn, out_shardings=replicated), jax.jit(text_fn, out_shardings=replicated)


def place_variables(variables: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """`variables` on `mesh`: arrays already laid out on it keep their sharding (the trainer's
    FSDP-sharded parameters: no replicated copy); others are replicated over it."""
    replicated = sharding_lib.replicated(mesh)

    def place(x):
        on_mesh = isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
        return x if on_mesh and x.sharding.mesh == mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, variables)


def round_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's data-parallel device count."""
    shards = sharding_lib.num_batch_shards(mesh)
    if batch_size <= 0:
        raise ValueError(f"eval batch_size={batch_size} must be positive")
    return -(-batch_size // shards) * shards


class Embedder:
    """Embeds images and texts with fixed `variables` on `mesh`.

    Args:
      model: a `clip_jax.models.CLIP`.
      variables: its variables ({"params", "batch_stats"?}), placed by `place_variables`:
        arrays already on `mesh` (the trainer's, FSDP-sharded or not) are used as they are,
        anything else is replicated over `mesh`.
      mesh: device mesh (`clip_jax.sharding.create_mesh`).
      batch_size: rows per device call; rounded up to a multiple of the data-parallel devices.
    """

    def __init__(self, model, variables: dict[str, Any], mesh: Mesh, batch_size: int = 256):
        self.model = model
        self.mesh = mesh
        self.batch_size = round_batch_size(batch_size, mesh)
        self.variables = place_variables(variables, mesh)
        self._image_fn, self._text_fn = jitted_towers(model, mesh)
        self._batch_sharding = sharding_lib.batch_sharding(mesh)

    def _to_global(self, array: np.ndarray) -> jax.Array:
        # Every process holds the full batch; each places the rows its devices own.
        return jax.make_array_from_callback(
            array.shape, self._batch_sharding, lambda index: array[index]
        )

    def _run(self, fn, batch: np.ndarray) -> np.ndarray:
        out = fn(self.variables, self._to_global(batch))
        # Replicated output: any local shard is the whole array (also on multi-host meshes,
        # where the global array is not fully addressable from one process).
        return np.asarray(out.addressable_data(0))

    def _padded_batches(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """Slices `rows` into full batches (the last padded with zeros) -> (batch, n_real)."""
        b = self.batch_size
        for start in range(0, len(rows), b):
            chunk = rows[start : start + b]
            n = len(chunk)
            if n < b:
                pad = np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            yield chunk, n

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (already at the model's size) -> float32 [N, D], unit norm."""
        out = [self._run(self._image_fn, chunk)[:n] for chunk, n in self._padded_batches(images)]
        return _concat(out, self._dim())

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int32 [N, L] -> float32 [N, D], unit norm."""
        out = [
            self._run(self._text_fn, chunk)[:n]
            for chunk, n in self._padded_batches(np.asarray(tokens, np.int32))
        ]
        return _concat(out, self._dim())

    def embed_texts(self, texts: list[str], tokenizer) -> np.ndarray:
        """Strings -> float32 [N, D], unit norm (tokenised to the model's context length)."""
        tokens = tokenizer(list(texts), context_length=self.model.config.context_length)
        return self.embed_tokens(np.asarray(tokens, np.int32))

    def embed_dataset(
        self, batches: Iterable[dict[str, np.ndarray]], with_text: bool = True
    ) -> dict[str, np.ndarray]:
        """Runs over `clip_jax.data.build_eval_dataset` batches (numpy); drops padding rows.

        Returns: image float32 [N, D]; text float32 [N, D] (if `with_text` and the batches have
        tokens); label int32 [N]; key and caption: object arrays of str [N].
        """
        images, texts, labels, keys, captions = [], [], [], [], []
        for batch in batches:
            mask = np.asarray(batch["mask"], bool)
            if not mask.any():
                continue
            n = len(mask)
            if n != self.batch_size:
                raise ValueError(
                    f"dataset batch size {n} differs from the embedder's {self.batch_size}"
                )
            images.append(self._run(self._image_fn, batch["image"])[mask])
            if with_text and "text" in batch:
                texts.append(self._run(self._text_fn, batch["text"])[mask])
            labels.append(np.asarray(batch["label"], np.int32)[mask])
            keys.extend(_as_str(k) for k in np.asarray(batch["key"])[mask])
            captions.extend(_as_str(c) for c in np.asarray(batch["caption"])[mask])
        dim = self._dim()
        out = {
            "image": _concat(images, dim),
            "label": np.concatenate(labels) if labels else np.zeros((0,), np.int32),
            "key": np.asarray(keys, dtype=object),
            "caption": np.asarray(captions, dtype=object),
        }
        if texts:
            out["text"] = _concat(texts, dim)
        return out

    def _dim(self) -> int:
        return int(self.model.config.embed_dim)


def _as_str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _concat(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
