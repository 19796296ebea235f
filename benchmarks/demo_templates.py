"""Zero-shot prompt templates for the demo, compared on the HELDOUT split only.

    PYTHONPATH=. python benchmarks/demo_templates.py runs/demo [runs/other ...]

The zero-shot `classify` split is a test set, so templates cannot be chosen on it. This builds
a proxy from the demo `heldout` split the way `classify` was built (tools/build_demo.py): an
image whose caption (title or keywords) names exactly one of `CLASSES` gets that class; classes
with at least 5 such images are kept (456 images, 17 classes; "computer" is 48% of them, so
mean-per-class accuracy is the criterion). Each template set of
`clip_jax.evaluation.templates` plus one more caption-style set (`EXTRA_SETS`) is scored with
every given workdir's latest model.

Prints one JSON line per workdir: {set: [top-1 %, mean-per-class %]}, chance and majority.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np

from clip_jax import model_store, models, sharding, tokenizers
from clip_jax.data import config as data_config
from clip_jax.embedder import Embedder
from clip_jax.evaluation import data as data_lib
from clip_jax.evaluation.templates import TEMPLATE_SETS
from clip_jax.evaluation.zeroshot import class_embeddings, zeroshot_metrics

# Category words frequent among the held-out captions' keywords. A few are also `classify`
# class names (bird, fruit, insect); only held-out images are read.
CLASSES = (
    "computer", "flag", "sign", "symbol", "food", "people", "animal", "plant", "transport",
    "music", "tool", "toy", "weather", "sports", "holiday", "office", "beverage", "fruit",
    "bird", "clothing", "vehicle", "insect", "decoration", "mammal",
)  # fmt: skip
# Beside the library's sets (its `short` set is the training captions' own style, "<Title>.
# <keywords>."): the same with clip-art words.
EXTRA_SETS = {
    "caption_kw": ("{}.", "a {}.", "{} icon.", "{} clip art.", "{} symbol."),
}
MIN_IMAGES = 5


def proxy_labels(captions) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Captions [N] -> (row indices [M], labels [M] in [0, C), class names [C])."""
    rows, labels = [], []
    for i, caption in enumerate(captions):
        hits = [c for c in CLASSES if re.search(rf"\b{c}s?\b", str(caption).lower())]
        if len(hits) == 1:
            rows.append(i)
            labels.append(CLASSES.index(hits[0]))
    rows, labels = np.asarray(rows), np.asarray(labels)
    counts = np.bincount(labels, minlength=len(CLASSES))
    kept = [c for c in range(len(CLASSES)) if counts[c] >= MIN_IMAGES]
    keep = np.isin(labels, kept)
    remap = {c: j for j, c in enumerate(kept)}
    return rows[keep], np.asarray([remap[c] for c in labels[keep]]), [CLASSES[c] for c in kept]


def score(workdir: str, mesh, tokenizer) -> dict:
    loaded = model_store.load_model(workdir, sharding=sharding.replicated(mesh))
    embedder = Embedder(models.create_model(loaded.config), loaded.variables, mesh, 256)
    spec = data_config.as_source_spec({"source": "demo", "split": "heldout"})
    data = embedder.embed_dataset(
        data_lib.eval_batches(
            spec,
            image_size=loaded.config.image_size,
            tokenizer=tokenizer,
            context_length=loaded.config.context_length,
            batch_size=embedder.batch_size,
            resize_method="bicubic",
        ),
        with_text=False,
    )
    rows, labels, names = proxy_labels(data["caption"])
    images = data["image"][rows]
    out = {"workdir": workdir, "step": loaded.step, "images": len(labels), "classes": len(names)}
    for name, templates in {**TEMPLATE_SETS, **EXTRA_SETS}.items():
        emb = class_embeddings(lambda t: embedder.embed_texts(t, tokenizer), names, templates)
        result = zeroshot_metrics(images, labels, emb, names)
        out[name] = [round(100 * result.metrics[k], 1) for k in ("top1", "mean_per_class")]
    out["chance"] = round(100 / len(names), 1)
    out["majority"] = round(100 * result.details["majority_baseline_top1"], 1)
    return out


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    mesh = sharding.create_mesh()
    tokenizer = tokenizers.get("clip-bpe")
    for workdir in sys.argv[1:]:
        print(json.dumps(score(workdir, mesh, tokenizer)), flush=True)


if __name__ == "__main__":
    main()
