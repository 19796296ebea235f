"""Planning for TPU pods without TPUs: train_setup builds what the trainer builds, the step and
embedder compile for TPU slices (libtpu, compile-only devices), per-chip memory is consistent,
FLOP counts, the fit verdict and the search, the accelerator table."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_runs import REPO, get_config, read_metrics

from clip_jax import (
    accelerators,
    metrics,
    model_store,
    plan,
    sharding,
    tokenizers,
    topology,
    train,
    train_setup,
)
from clip_jax import data as data_lib

# conftest's persistent compilation cache stores the compile-only TPU executables but cannot load
# them back (jax 0.10); JAX then compiles again. `python -m clip_jax.plan` turns the cache off.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning"
)

# One layer per tower keeps each XLA:TPU compile to a few seconds.
ONE_LAYER = {
    "model.embed_dim": 64,
    "model.vision.layers": 1,
    "model.vision.width": 64,
    "model.vision.heads": 2,
    "model.text.layers": 1,
    "model.text.width": 64,
    "model.text.heads": 2,
}


def small_config(**overrides):
    base = {
        "batch_size": 32,
        "total_steps": 1,
        "data.source": "synthetic",
        **ONE_LAYER,
    }
    base.update(overrides)
    return get_config(**base)


def test_train_setup_builds_the_step_train_builds(tmp_path):
    """One trainer step (FSDP 2x2 mesh, SigLIP, accumulation, remat) and one step of
    train_setup's jitted step from the same init and batch: same loss, gradient norm and
    parameters afterwards."""
    config = small_config(
        batch_size=16,
        **{
            "mesh.data": 2,
            "mesh.fsdp": 2,
            "loss": "siglip",
            "accumulation_steps": 2,
            "model.remat": "full",
        },
    )
    devices = jax.devices()[:4]
    train.train(config, str(tmp_path / "run"), devices=devices)
    logged = read_metrics(tmp_path / "run")[0]
    trained_params = model_store.load_model(str(tmp_path / "run")).variables

    mesh = sharding.create_mesh(2, 2, devices=devices)
    setup = train_setup.build(config, mesh)
    state = setup.jit_init()()
    dataset = data_lib.build_train_dataset(
        config.data,
        image_size=setup.model_config.image_size,
        tokenizer=tokenizers.get(setup.tokenizer_name),
        context_length=setup.model_config.context_length,
        local_batch_size=16,
        seed=config.seed,
        process_index=0,
        process_count=1,
        start_position=None,
        watch=data_lib.InputWatch(),
        index_dir=str(tmp_path / "index"),
    )
    batch = next(dataset.as_numpy_iterator())
    batch = {k: jax.device_put(batch[k], setup.batch_sharding) for k in ("image", "text")}
    state, step_metrics = setup.jit_step()(state, batch)

    assert logged["step"] == 1
    np.testing.assert_allclose(float(step_metrics["loss"]), logged["loss"], rtol=1e-6)
    np.testing.assert_allclose(float(step_metrics["grad_norm"]), logged["grad_norm"], rtol=1e-6)
    ours = jax.tree.leaves(state.params)
    assert len(ours) == len(jax.tree.leaves(trained_params))
    for x, y in zip(ours, jax.tree.leaves(trained_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)


def test_accelerator_table_matches_tpu_device_kinds():
    """The table identifies libtpu's own device kinds, and GPU kinds as jax reports them."""
    for name, gen in (
        ("v5e:2x2", "v5e"),
        ("v4:2x2x1", "v4"),
        ("v5p:2x2x1", "v5p"),
        ("v6e:2x2", "v6e"),
    ):
        topo = topology.get(name)
        assert topo.num_chips == 4 and topo.num_hosts == 1
        assert accelerators.for_device(topo.devices[0]).name == gen, topo.devices[0].device_kind
        assert metrics.peak_flops(topo.devices[0]) == accelerators.by_name(gen).peak_bf16_flops

    class Kind:
        def __init__(self, kind):
            self.device_kind = kind

    assert metrics.peak_flops(Kind("TPU v5")) == 459e12  # v5p's device_kind
    assert metrics.peak_flops(Kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert metrics.peak_flops(Kind("NVIDIA H100 PCIe")) == 756e12
    assert accelerators.for_device(Kind("NVIDIA A100-SXM4-80GB")).hbm_bytes == 80e9
    assert accelerators.for_device(Kind("NVIDIA A100-SXM4-40GB")).hbm_bytes == 40e9
    assert metrics.peak_flops(jax.devices("cpu")[0]) is None
    # v5p:4x4x4: 64 megacore chips on 16 hosts of 4, as the public slice tables say.
    pod = topology.get("v5p:4x4x4")
    assert (pod.num_chips, pod.num_hosts, pod.devices[0].num_cores) == (64, 16, 2)
    with pytest.raises(ValueError, match="expected GENERATION"):
        topology.get("v7x:2x2")
    with pytest.raises(ValueError, match="libtpu rejects"):
        topology.get("v5e:3x3")
    # NVIDIA hosts: [HOSTSx]GPUS (compiled through the CUDA plugin, not installed for tests).
    assert topology.parse("h100:4x8") == (accelerators.by_name("h100"), (4, 8))
    assert topology.parse("h200:8") == (accelerators.by_name("h200"), (1, 8))
    with pytest.raises(ValueError, match="1 to 8 GPUs per host"):
        topology.parse("h100:16")


def _compile(config, topo_name):
    topo = topology.get(topo_name)
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices=topo.devices)
    setup = train_setup.build(config, mesh)
    state, batch = setup.sharded_abstract_state(), setup.abstract_batch()
    lowered = setup.jit_step().lower(state, batch)
    return plan.compile_memory(lowered), state, batch, lowered


def test_tpu_step_memory_plain_vs_fsdp():
    """XLA:TPU's per-chip argument bytes are the state's and the batch's shards in the TPU's
    tiled layout (a little above their logical size); FSDP over 4 chips cuts the state's to
    about a quarter (the batch is split the same way in both)."""
    plain, state, batch, _ = _compile(small_config(**{"mesh.data": 4}), "v5e:2x2")
    fsdp, fstate, fbatch, _ = _compile(small_config(**{"mesh.data": 1, "mesh.fsdp": 4}), "v5e:2x2")
    assert plain["fits"] and fsdp["fits"]
    assert plain["arguments"] == plan.device_bytes(state) + plan.device_bytes(batch)
    assert fsdp["arguments"] == plan.device_bytes(fstate) + plan.device_bytes(fbatch)
    for compiled, s, b in ((plain, state, batch), (fsdp, fstate, fbatch)):
        logical = plan.per_chip_bytes(s) + plan.per_chip_bytes(b)
        assert logical < compiled["arguments"] < 1.1 * logical
    assert plan.device_bytes(batch) == plan.device_bytes(fbatch)
    assert 0.2 < fsdp["arguments"] / plain["arguments"] < 0.3
    # The donated state comes back as the new state: aliased, not a second copy.
    assert plain["aliased"] >= plan.per_chip_bytes(state)


def test_tpu_siglip_ring_and_accumulation_on_v4_megacore():
    """SigLIP's ring loss lowers to collective-permutes on a v4 slice; exact accumulation over
    4 micro-batches needs fewer temporaries than the full batch at once (patch 4: 257 tokens
    per image, so activations, not the gradients, dominate)."""
    config = small_config(batch_size=512, loss="siglip", **{"model.vision.patch_size": 4})
    full, _, _, lowered = _compile(config, "v4:2x2x1")
    accum, _, _, _ = _compile(plan.with_changes(config, accumulation_steps=4), "v4:2x2x1")
    assert "collective_permute" in lowered.as_text()
    assert full["fits"] and accum["fits"]
    assert accum["temporaries"] < 0.6 * full["temporaries"], (accum, full)


def test_plan_report_fits_and_does_not_fit():
    """The whole plan on v5e:2x2 (train step + eval embedder): fits in 16 GB; against a
    40 MiB budget the compiler runs out of memory and the verdict names the levers."""
    config = small_config(batch_size=32, **{"mesh.data": 4, "eval.batch_size": 32})
    report = plan.plan(config, "v5e:2x2", mfu=0.5)
    assert report["fits"] and report["verdict"] == "fits"
    train_mem = report["train"]
    assert train_mem["total"] == train_mem["program"] + train_mem["prefetch"]
    # data.device_prefetch=2 batches of 8 rows per chip, in the TPU layout (>= logical size)
    assert train_mem["prefetch"] >= 2 * 32 // 4 * (64 * 64 * 3 + 77 * 4)
    # The embedder's programs run while the train state and prefetched batches stay resident.
    evaluation = report["eval"]
    assert evaluation["resident"] == train_mem["state"] + train_mem["prefetch"]
    # The resident state holds the parameters the programs read; each adds at least its own
    # temporaries and code (jit drops the other tower's parameters from a program's arguments).
    own = max(p["temporaries"] + p["code"] for p in evaluation["programs"].values())
    assert evaluation["fits"] and evaluation["total"] >= evaluation["resident"] + own, evaluation
    speed = report["speed"]
    assert speed["step_s"] == pytest.approx(speed["step_s_at_peak"] / 0.5)
    assert speed["samples_per_s_per_host"] == pytest.approx(32 / speed["step_s"])
    assert speed["executed_flops_per_chip"] == pytest.approx(speed["executed_flops"] / 4)
    assert "per chip" in plan.format_report(report)
    json.dumps(report, default=plan._json_default)  # the CLI prints it

    tight = plan.plan(config, "v5e:2x2", hbm_gib=0.04, with_eval=False)
    assert not tight["fits"]
    assert tight["verdict"].startswith("does not fit: the train step does not compile in 0.04 GiB")
    assert "\n" not in tight["verdict"]
    for lever in ("mesh.fsdp", "model.remat=full", "accumulation_steps"):
        assert lever in tight["verdict"], tight["verdict"]


def test_flop_counts_include_recompute_and_accumulation():
    """Loop-free counts: accumulation adds one forward pass (GradCache: ~4/3 of a plain step;
    XLA's own count of the scanned step would see one micro-batch), full remat ~4/3 too."""
    counter = plan.FlopCounter(small_config(batch_size=64))
    model = counter.model()
    assert 1.25 < counter.executed("none", 4) / model < 1.40
    assert 1.2 < counter.executed("full", 1) / model < 1.45
    assert counter.executed("none", 1) == model
    assert counter.executed("full", 4) == pytest.approx(
        counter.executed("full", 1) + counter.forward()
    )


def test_search_prefers_fastest_then_less_accumulation_then_small_fsdp():
    """With a fake fit rule (no compiles): a config fits iff fsdp >= 2 and (accumulation >= 2
    or full remat). The search tries the fastest candidate (no remat, no accumulation) at the
    largest fsdp first, moves on to the next-fastest estimate, then bisects fsdp down to the
    smallest that fits."""
    config = small_config(batch_size=64)
    counter = plan.FlopCounter(config)
    calls = []

    def compile_fits(variant):
        key = (variant.mesh.fsdp, variant.model.remat, variant.accumulation_steps)
        calls.append(key)
        ok = key[0] >= 2 and (key[2] >= 2 or key[1] == "full")
        return ok, 1 if ok else None

    result = plan.search(
        config, "v5e:2x2", remats=("none", "full"), compile_fits=compile_fits, counter=counter
    )
    # Next fastest after (none, 1): whichever of (none, 2) and (full, 1) executes fewer
    # FLOPs (both about 4/3 of the model's), ties to less accumulation.
    remat, k = min(
        (("none", 2), ("full", 1)),
        key=lambda rk: (round(counter.executed(*rk) / counter.model(), 3), rk[1]),
    )
    assert calls == [(4, "none", 1), (4, remat, k), (2, remat, k), (1, remat, k)]
    best = result["best"]
    assert (best.mesh.data, best.mesh.fsdp, best.model.remat, best.accumulation_steps) == (
        2,
        2,
        remat,
        k,
    )
    assert [t["fits"] for t in result["tried"]] == [False, True, True, False]


def test_staged_config_plans_each_stage_as_it_runs():
    """A schedule of stages is planned stage by stage. Stage 1 starts from stage 0's weights,
    which do not exist when planning: it is planned with the base architecture (the overrides
    stage_configs unsets come back) at its own sizes, i.e. the shapes the full-size phase
    trains, with its own entries (patch dropout) applied."""
    stages = (
        {"total_steps": 5, "model.vision.image_size": 32, "data.context_length": 16},
        {"total_steps": 5, "model.patch_dropout": 0.5},
    )
    config = small_config(stages=stages)
    planned = plan.planned_configs(config)
    assert [label for label, _ in planned] == ["stage 0 of 2", "stage 1 of 2"]
    (_, first), (_, second) = planned
    assert not second.init_from and second.model.vision.layers == 1
    assert (second.model.patch_dropout, second.total_steps) == (0.5, 5)

    mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
    shapes = lambda c: jax.tree.map(
        lambda x: x.shape, train_setup.build(c, mesh, with_weights=False).abstract_state.params
    )
    full = shapes(small_config())  # the architecture at its own sizes, no stages
    assert shapes(second) == full
    assert shapes(first) != full  # 32 px: fewer image positions
    batch = train_setup.build(first, mesh, with_weights=False).abstract_batch(sharded=False)
    assert (batch["image"].shape, batch["text"].shape) == ((32, 32, 32, 3), (32, 16))
    plain = small_config()
    assert [(label, c is plain) for label, c in plan.planned_configs(plain)] == [("", True)]

    # As in training, a later stage cannot change the architecture it loads.
    bad = small_config(stages=(stages[0], {"model.vision.width": 128}))
    with pytest.raises(train_setup.ConfigError, match="must stay unset with init_from"):
        plan.planned_configs(bad)


def test_unreadable_init_from_is_one_line_naming_the_way_out():
    """lit_b32 starts from converted weights that are not here: plan needs only their
    architecture and says how to plan without them."""
    config = get_config("lit_b32")
    for run in (plan.plan, plan.search):
        with pytest.raises(plan.PlanError) as error:
            run(config, "v5e:2x2")
        message = str(error.value)
        assert "\n" not in message and "converted/ViT-B-32" in message
        assert "--config.init_from= plans model.name='ViT-B-32'" in message


def _run_plan_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_jax.plan", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_plan_cli_table_json_and_stages():
    """The command on a staged config (FLIP: patch dropout, then unmasked) of a one-layer
    ViT-B/16: a table per stage, the one-line verdict naming the levers, then one JSON line."""
    overrides = [f"--config.{k}={v}" for k, v in ONE_LAYER.items()]
    proc = _run_plan_cli(
        "--config",
        f"{REPO}/configs/clip.py:vit_b16_flip",
        "--topology",
        "v5e:2x2",
        "--config.batch_size=32",
        "--hbm_gib=0.04",
        "--noeval",
        *overrides,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert [s["stage"] for s in report["stages"]] == [0, 1]
    for stage, dropout in zip(report["stages"], (0.5, 0.0)):
        assert stage["fits"] is False and stage["config"]["model"] == "ViT-B-16"
        assert stage["speed"]["model_flops"] > 0
    # Dropping half the patches makes the step cheaper.
    speeds = [s["speed"]["model_flops"] for s in report["stages"]]
    assert speeds[0] < 0.8 * speeds[1]
    assert lines.count("stage 0 of 2:") == 1 and lines.count("stage 1 of 2:") == 1
    verdicts = [line for line in lines if line.startswith("does not fit:")]
    assert len(verdicts) == 2 and all("--config.mesh.fsdp=2" in v for v in verdicts)
    assert any(line.startswith("model FLOPs / step") for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--topology", "v9:2x2"], "topology 'v9:2x2': expected GENERATION"),
        (["--topology", "v5e:3x3"], "libtpu rejects it"),
        (["--topology", "v5e:2x2", "--config.mesh.fsdp=3"], "mesh.fsdp=3 does not divide the 4"),
        (["--topology", "v5e:2x2", "--config.batch_size=30"], "config.batch_size=30: must be"),
        (["--topology", "v5e:2x2", "--config.nope=1"], "bad config override"),
    ],
)
def test_plan_cli_bad_input_is_one_line(args, message):
    proc = _run_plan_cli("--config", f"{REPO}/configs/clip.py:tiny", *args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "clip_jax.plan: error" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
