"""open_clip peer of the default demo run: the same model, data and recipe, trained in PyTorch.

    PYTHONPATH=. python benchmarks/demo_peer.py [--clip-jax-workdir runs/demo] [--steps N]
        [--override key=value ...]

A test-only reference (open_clip_torch is not a clip_jax dependency). Reads the recipe of
`configs/clip.py:demo` (the default run; `--variant`, plus `--override`s): architecture, batch
size, steps, AdamW settings, warmup + cosine schedule and the random-resized-crop augmentation,
and trains an `open_clip.model.CLIP` of the same shape (ViT or ModifiedResNet) on the shipped
demo `train` split:

- images: the demo JPEGs decoded once into memory, `RandomResizedCrop` (torchvision, bicubic,
  antialiased) with `data.aug_scale` / `data.aug_ratio` per sample and epoch, then a
  horizontal flip with probability `data.aug_flip`, OpenAI mean/std;
- captions: sentences dropped as `data.sentence_dropout` says
  (`clip_jax.data.text_shorten.drop_sentences`), `open_clip.tokenize` with the model's context
  length, cut to `data.context_length` tokens as `data.text_shorten` says
  (`clip_jax.data.text_shorten.shorten`) when that is set (then padded back to the context:
  open_clip's text tower takes only full-length input);
- `ema_decay`: a moving average of the weights updated after every step by clip_jax's rule
  (`clip_jax.step.ema_decay_at`), and evaluated instead of the last weights, as clip_jax does;
- optimizer: AdamW (`optim.b1/b2/eps`), weight decay on weight matrices only (not on gains,
  biases, embeddings or the temperature: clip_jax's rule), linear warmup then cosine decay to
  `optim.end_lr_factor`; `open_clip.loss.ClipLoss`; the temperature clamped at 100 as
  open_clip's trainer does.

Equal wall-clock: before training, the compiled clip_jax train step of the same config and the
torch train step are timed alternately in this process (`--calibration-steps` each) and the
fastest step of each is kept: a busy machine does not slow both alike (torch's OpenMP threads
wait for each other at every op, XLA's thread pool steals work: with other jobs on the 2 cores,
torch's 2-thread step ranged 3.1-29 s and its 1-thread step 1.2-23 s). The peer gets
`total_steps * t_clip_jax / t_torch` steps, i.e. the training time clip_jax's steps take
(input pipelines, compiles and evaluations left out).
`--steps` sets the count instead.

The trained weights are converted with `clip_jax.convert.convert_state_dict` and evaluated by
clip_jax's own evaluators (`config.eval`: zero-shot on `classify`, retrieval on `heldout`,
linear probe), so both models are measured by the same code. `--clip-jax-workdir` also
evaluates that run's latest checkpoint. Prints JSON lines: calibration, one line per model
(metrics in %, chance and majority baselines), then the peer's training curve summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402
from torchvision.transforms import v2 as transforms  # noqa: E402

from clip_jax import (  # noqa: E402
    convert,
    evaluation,
    model_store,
    models,
    sharding,
    tokenizers,
    train_setup,
)
from clip_jax import step as step_lib  # noqa: E402
from clip_jax.data import text_shorten  # noqa: E402
from clip_jax.data.shards import demo_shards  # noqa: E402
from clip_jax.data.transforms import OPENAI_MEAN, OPENAI_STD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_config(variant: str, overrides: list[str]):
    """configs/clip.py:`variant` with `key=value` overrides (values parsed as Python literals)."""
    import ast

    spec = importlib.util.spec_from_file_location("clip_config", REPO / "configs" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def open_clip_model(cfg: models.CLIPConfig, seed: int) -> torch.nn.Module:
    """An `open_clip.model.CLIP` with the architecture of `cfg` (ViT or ModifiedResNet)."""
    v, t = cfg.vision, cfg.text
    if v.type == "vit":
        vision = dict(
            image_size=v.image_size,
            patch_size=v.patch_size,
            width=v.width,
            layers=v.layers,
            head_width=v.width // v.heads,
            mlp_ratio=v.mlp_ratio,
        )
        activation = v.activation
    else:
        # open_clip gives a ModifiedResNet `width * 32 // head_width` attention-pool heads.
        vision = dict(
            image_size=v.image_size,
            layers=tuple(v.layers),
            width=v.width,
            head_width=v.width * 32 // v.heads,
        )
        activation = t.activation
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        cfg.embed_dim,
        vision,
        dict(
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.heads,
            layers=t.layers,
            mlp_ratio=t.mlp_ratio,
        ),
        quick_gelu=activation == "quick_gelu",
        output_dict=True,
    )
    if v.type != "vit":
        # channels_last: torch's CPU convolutions (oneDNN) on this ResNet's few channels are
        # ~1.5x faster in NHWC (image tower forward+backward, batch 128, 1 thread: 0.49 s vs
        # 0.73 s NCHW, timed alternately in one process); the batches follow (`Peer.batch`).
        model = model.to(memory_format=torch.channels_last)
    return model


def read_demo(split: str) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, H, W, 3] images and their captions, in shard order."""
    images, captions = [], []
    for path in demo_shards(split):
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in parts.values():
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                images.append(np.asarray(image.convert("RGB")))
            captions.append(sample["txt"].decode("utf-8"))
    return np.stack(images), captions


class Peer:
    """The torch model, optimizer, schedule and an endless shuffled, augmented batch stream."""

    def __init__(self, config, model_config: models.CLIPConfig, images, captions: list[str]):
        self.config = config
        self.model = open_clip_model(model_config, config.seed)
        self.ema_decay = float(config.get("ema_decay", 0.0))
        self.ema = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.ema_decay > 0
            else None
        )
        self.model_is_resnet = model_config.vision.type != "vit"
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(o.weight_decay)},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(o.lr),
            betas=(float(o.b1), float(o.b2)),
            eps=float(o.eps),
        )
        self.loss = open_clip.loss.ClipLoss()
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
        self.captions = captions
        self.context_length = model_config.text.context_length
        self.sentence_dropout = float(config.data.get("sentence_dropout", 0.0))
        self.tokens = open_clip.tokenize(captions, context_length=self.context_length)
        self.flip = float(config.data.get("aug_flip", 0.0))
        size = model_config.vision.image_size
        self.crop = transforms.RandomResizedCrop(
            size,
            scale=tuple(config.data.aug_scale),
            ratio=tuple(config.data.aug_ratio),
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        self.mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(config.seed)
        # Short-text training (data.context_length / data.text_shorten), as clip_jax's pipeline.
        self.text_length = int(config.data.get("context_length", 0) or 0)
        self.text_rng = np.random.default_rng(config.seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.steps_done = 0

    def lr_at(self, step: int, total: int) -> float:
        o = self.config.optim
        warmup = int(o.warmup_steps)
        if step < warmup:
            return float(o.lr) * step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        end = float(o.lr) * float(o.end_lr_factor)
        return end + (float(o.lr) - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = int(self.config.batch_size)
        while len(self.order) < b:
            perm = torch.randperm(len(self.images), generator=self.generator)
            self.order = torch.cat([self.order, perm])
        idx, self.order = self.order[:b], self.order[b:]
        crops = torch.stack([self.crop(self.images[i]) for i in idx.tolist()])
        if self.flip > 0:
            flipped = torch.rand(b, generator=self.generator) < self.flip
            crops[flipped] = crops[flipped].flip(-1)
        x = (crops.float() / 255.0 - self.mean) / self.std
        if self.model_is_resnet:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.sentence_dropout > 0:
            kept = text_shorten.drop_sentences(
                [self.captions[i] for i in idx.tolist()], self.sentence_dropout, self.text_rng
            )
            text = open_clip.tokenize(kept, context_length=self.context_length)
        else:
            text = self.tokens[idx]
        if self.text_length:
            mode = str(self.config.data.text_shorten)
            short = text_shorten.shorten(text.numpy(), self.text_length, mode, self.text_rng)
            # open_clip adds all its positional embeddings, so the cut captions are padded back
            # to the model's context: the same features (causal mask, end-of-text token
            # pooling), but the peer's text tower computes all positions.
            text = torch.zeros_like(text)
            text[:, : short.shape[1]] = torch.from_numpy(short).long()
        return x, text

    def step(self, total: int) -> float:
        """One optimizer step with the schedule's learning rate for a `total`-step run."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps_done, total)
        x, text = self.batch()
        out = self.model(x, text)
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
            if self.ema is not None:
                decay = float(step_lib.ema_decay_at(self.ema_decay, np.int32(self.steps_done)))
                for name, value in self.model.state_dict().items():
                    if value.is_floating_point() and "running_" not in name:
                        self.ema[name].lerp_(value, 1.0 - decay)
                    else:  # BatchNorm statistics and counters: the current ones, as clip_jax
                        self.ema[name].copy_(value)
        self.steps_done += 1
        return float(loss)


def calibrate(config, setup, peer: Peer, steps: int) -> dict:
    """Fastest seconds of the clip_jax and torch train steps, timed alternately (medians too)."""
    state = setup.jit_init()()
    step = setup.jit_step().lower(setup.sharded_abstract_state(), setup.abstract_batch()).compile()
    x, text = peer.batch()
    images = (x * peer.std + peer.mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    jax_text = text[:, : peer.text_length] if peer.text_length else text  # clip_jax's length
    batch = jax.device_put(
        {"image": images.permute(0, 2, 3, 1).numpy(), "text": jax_text.numpy().astype(np.int32)},
        setup.batch_sharding,
    )
    probe = open_clip_model(setup.model_config, config.seed + 1)  # timing only, then discarded
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
    jax_times, torch_times = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t1 = time.perf_counter()
        out = probe(x, text)
        loss = peer.loss(out["image_features"], out["text_features"], out["logit_scale"])
        probe_opt.zero_grad(set_to_none=True)
        loss.backward()
        probe_opt.step()
        t2 = time.perf_counter()
        if i:  # the first call of each warms caches
            jax_times.append(t1 - t0)
            torch_times.append(t2 - t1)
    return {
        "clip_jax_step_s": float(np.min(jax_times)),
        "torch_step_s": float(np.min(torch_times)),
        "clip_jax_median_s": round(float(np.median(jax_times)), 3),
        "torch_median_s": round(float(np.median(torch_times)), 3),
        "clip_jax_spread_s": [round(min(jax_times), 3), round(max(jax_times), 3)],
        "torch_spread_s": [round(min(torch_times), 3), round(max(torch_times), 3)],
    }


def evaluate(config, model_config, variables, mesh, step, name: str, extra: dict) -> dict:
    model = models.create_model(model_config)
    metrics, details = evaluation.evaluate_all(
        config.eval, model, variables, tokenizers.get(config.data.tokenizer), mesh, step
    )
    out = {"run": name, "step": step, **extra}
    for key, value in metrics.items():
        metric = key.split("/", 1)[1]
        if metric.startswith(("top", "mean_per_class", "image_to_text", "text_to_image", "mean_")):
            out[key] = round(100 * value, 2)  # fractions, as percentages
    if "zeroshot" in details:
        out["zeroshot/chance_top1"] = round(100 * details["zeroshot"]["chance_top1"], 2)
        out["zeroshot/majority_top1"] = round(
            100 * details["zeroshot"]["majority_baseline_top1"], 2
        )
    if "retrieval" in details:
        chance = details["retrieval"]["chance"]
        out["retrieval/chance_image_to_text_R@10"] = round(100 * chance["image_to_text_R@10"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="demo", help="configs/clip.py variant")
    parser.add_argument("--override", action="append", default=[], help="config key=value")
    parser.add_argument("--steps", type=int, default=0, help="peer steps (0: equal wall-clock)")
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--clip-jax-workdir", default="", help="also evaluate this run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.variant, args.override)
    mesh = sharding.create_mesh()
    setup = train_setup.build(config, mesh)
    model_config = setup.model_config
    images, captions = read_demo("train")
    peer = Peer(config, model_config, images, captions)

    if args.steps:
        steps, calibration = args.steps, {}
    else:
        calibration = calibrate(config, setup, peer, args.calibration_steps)
        ratio = calibration["clip_jax_step_s"] / calibration["torch_step_s"]
        steps = max(1, round(int(config.total_steps) * ratio))
        calibration.update(
            clip_jax_steps=int(config.total_steps), torch_steps=steps, ratio=round(ratio, 3)
        )
        print(json.dumps({"calibration": calibration}), flush=True)
        peer.order = torch.empty(0, dtype=torch.long)  # the run starts from a fresh epoch
        peer.generator.manual_seed(config.seed)

    start, losses = time.perf_counter(), []
    for _ in range(steps):
        losses.append(peer.step(steps))
    train_seconds = time.perf_counter() - start
    peer.model.eval()
    weights = peer.ema if peer.ema is not None else peer.model.state_dict()
    state_dict = {k: v.detach().contiguous().numpy() for k, v in weights.items()}
    converted_config, variables = convert.convert_state_dict(
        state_dict, model_config, quick_gelu=model_config.text.activation == "quick_gelu"
    )
    peer_line = evaluate(
        config,
        converted_config,
        variables,
        mesh,
        steps,
        "open_clip",
        {"train_seconds": round(train_seconds, 1), "final_loss": round(np.mean(losses[-10:]), 4)},
    )
    print(json.dumps(peer_line), flush=True)
    if args.clip_jax_workdir:
        restored = model_store.load_model(args.clip_jax_workdir, sharding=sharding.replicated(mesh))
        line = evaluate(
            config, restored.config, restored.variables, mesh, restored.step, "clip_jax", {}
        )
        print(json.dumps(line), flush=True)
    print(
        json.dumps({"peer_loss_every_10pct": [round(x, 3) for x in losses[:: max(1, steps // 10)]]})
    )


if __name__ == "__main__":
    main()
