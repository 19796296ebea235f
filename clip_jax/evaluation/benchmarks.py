"""The CLIP paper's zero-shot benchmarks: class names, prompt templates, TFDS source, metric.

    from clip_jax.evaluation import benchmark, list_benchmarks
    b = benchmark("cifar10")
    probs = model.classify(images, b.classnames, templates=b.templates)   # float32 [N, 10]

Each benchmark is one JSON file in `benchmark_data/` (sources and license in its NOTICE):
OpenAI's curated class names and prompt templates (openai/CLIP `data/prompts.md` and the
ImageNet notebook), reordered where TFDS numbers the labels differently, with the TFDS builder,
split and feature keys to read the test images from, the metric the paper reports
("top1", or "mean_per_class" for Pets, Flowers-102 and Caltech-101), and the paper's zero-shot
numbers for OpenAI's models (Table 11). ImageNet-A and -R classify among 200 of the 1,000
ImageNet classes: `class_indices` lists which (their TFDS labels are ImageNet-1k indices).

`python -m clip_jax.evaluate --benchmarks ...` runs them (`clip_jax.evaluation.benchmark_runner`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
from typing import Any

from clip_jax.data import config as data_config_lib
from clip_jax.evaluation.templates import get_templates

METRICS = ("top1", "mean_per_class")
# OpenAI's released models with numbers in the paper's Table 11 (open_clip / registry names).
PAPER_MODELS = ("RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14")
_DATA_PACKAGE = "clip_jax.evaluation"
_DATA_DIR = "benchmark_data"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One zero-shot classification benchmark.

    name: registry name ("imagenet1k"). title: display name ("ImageNet-1k").
    tfds_name: TFDS builder, with its config if any ("sun397/standard-part1-120k").
    split: TFDS split string ("test", "train[80%:]"). image_key / label_key: TFDS features.
    classnames: [C] class names, index = classifier row. templates: prompt templates, one "{}".
    class_indices: for a subset benchmark, the [C] TFDS label values the classes stand for
      (label class_indices[i] is class i); None when the labels are 0..C-1.
    metric: "top1" or "mean_per_class", the number the paper reports.
    paper: {model name: percent} published zero-shot results (may be empty).
    notes: how this setup differs from the paper's, if it does. sources: where the lists are from.
    """

    name: str
    title: str
    tfds_name: str
    split: str
    image_key: str
    label_key: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    metric: str
    class_indices: tuple[int, ...] | None = None
    paper: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: str = ""
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def source_spec(self, tfds_data_dir: str) -> data_config_lib.SourceSpec:
        """The evaluation data source: this benchmark's TFDS split in `tfds_data_dir`."""
        return data_config_lib.SourceSpec(
            source="tfds",
            split=self.split,
            tfds_name=self.tfds_name,
            tfds_data_dir=tfds_data_dir,
            image_key=self.image_key,
            text_key="",
            label_key=self.label_key,
        )

    def zeroshot_block(self, tfds_data_dir: str):
        """This benchmark as a `zeroshot` evaluator block (`clip_jax.evaluation.config`), e.g.
        `config.eval.evaluators.imagenet = benchmark("imagenet1k").zeroshot_block("/data/tfds")`
        to evaluate ImageNet zero-shot during training."""
        import ml_collections

        from clip_jax.evaluation.config import zeroshot_block

        block = zeroshot_block(
            **{
                k: v
                for k, v in dataclasses.asdict(self.source_spec(tfds_data_dir)).items()
                if k != "weight"
            }
        ).to_dict()
        # A fresh ConfigDict: the defaults' field types (str) would refuse these tuples.
        return ml_collections.ConfigDict(
            dict(
                block,
                classnames=self.classnames,
                templates=self.templates,
                class_indices=self.class_indices or (),
            )
        )

    def build_command(self, tfds_data_dir: str) -> str:
        """The shell command that prepares this benchmark's TFDS data in `tfds_data_dir`."""
        return f"tfds build {self.tfds_name} --data_dir {tfds_data_dir}"


def _data_files():
    return importlib.resources.files(_DATA_PACKAGE) / _DATA_DIR


@functools.lru_cache(maxsize=1)
def _raw() -> dict[str, dict[str, Any]]:
    """{name: the parsed JSON} for every file in benchmark_data/."""
    out = {}
    for entry in sorted(_data_files().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            record = json.loads(entry.read_text(encoding="utf-8"))
            if record.get("name") != entry.name[: -len(".json")]:
                raise ValueError(
                    f"benchmark file {entry.name} holds name "
                    f"{record.get('name')!r}; it must match the file name"
                )
            out[record["name"]] = record
    return out


def list_benchmarks() -> list[str]:
    """Names of every shipped benchmark, in the order the CLI runs them (ImageNet first)."""
    names = list(_raw())
    imagenet = sorted(n for n in names if n.startswith("imagenet"))
    imagenet.sort(key=lambda n: n != "imagenet1k")
    return imagenet + sorted(n for n in names if not n.startswith("imagenet"))


@functools.lru_cache(maxsize=None)
def benchmark(name: str) -> Benchmark:
    """The benchmark called `name` (see `list_benchmarks`); ValueError for an unknown name."""
    raw = _raw()
    if name not in raw:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(list_benchmarks())}")
    record = raw[name]
    classnames = record["classnames"]
    class_indices = record.get("class_indices")
    if isinstance(classnames, str):  # the class names of another benchmark
        if classnames == name:
            raise ValueError(f"benchmark {name} takes its class names from itself")
        classnames = benchmark(classnames).classnames
    elif class_indices is not None:
        raise ValueError(
            f"benchmark {name}: class_indices index the labels of the benchmark "
            f"named in 'classnames', which must be a name, not a list"
        )
    if class_indices is not None:
        # A subset benchmark: the parent's names of the listed labels, in that order.
        class_indices = tuple(int(i) for i in class_indices)
        classnames = [classnames[i] for i in class_indices]
    metric = record["metric"]
    if metric not in METRICS:
        raise ValueError(f"benchmark {name}: metric {metric!r} is not one of {METRICS}")
    return Benchmark(
        name=name,
        title=record["title"],
        tfds_name=record["tfds_name"],
        split=record["split"],
        image_key=record["image_key"],
        label_key=record["label_key"],
        classnames=tuple(str(c) for c in classnames),
        templates=get_templates(
            record["templates"]
            if isinstance(record["templates"], str)
            else tuple(record["templates"])
        ),
        metric=metric,
        class_indices=class_indices,
        paper={str(k): float(v) for k, v in record.get("paper", {}).items()},
        notes=record.get("notes", ""),
        sources=dict(record.get("sources", {})),
    )


def resolve(names: str | list[str] | tuple[str, ...]) -> list[Benchmark]:
    """ "all", "a,b,c" or a list of names -> benchmarks, in the given order, without repeats.

    Raises ValueError naming unknown benchmarks (all of them, in one line).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        names = list_benchmarks()
    if not names:
        raise ValueError(
            "no benchmarks named; give 'all' or a comma-separated list of "
            f"{', '.join(list_benchmarks())}"
        )
    unknown = [n for n in names if n not in _raw()]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown)}; choose 'all' or from "
            f"{', '.join(list_benchmarks())}"
        )
    return [benchmark(n) for n in dict.fromkeys(names)]
