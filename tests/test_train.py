"""Ray Train + DeepSpeed training of tiny-vit on CPU workers, on generated coloured-shape shards.

The file shares the session's Ray (tests/conftest.py) and keeps its DeepSpeed runs few: one killed-and-
resumed run (`main_run`) answers the exact-resume, checkpoint-window, S3 and export tests together (its
first attempt, killed after saving step 4, is the uninterrupted reference for the resumed one), and the
elastic chains continue from the main run's checkpoint. The data set holds 48 rows, 3 global batches of 16
per epoch, with crop_scale (1, 1), so each step's loss can be compared with a single-process PyTorch run over
the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from clip_model import build_loss, build_model
from clip_model.export import load_export
from clip_model.optim import adamw
from pipelines.core.manifest import FileEntry, Manifest, write_manifest
from pipelines.core.schema import SAMPLE_SCHEMA, sample_key
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import shape_samples
from pipelines.train import checkpointing as ckpt_io
from pipelines.train.config import MetricsConfig, MlflowConfig, OptimConfig, TrainConfig, TrainDataConfig, WandbConfig
from pipelines.train.data import SamplePlan, committed_layout
from pipelines.train.hooks import TrainHooks
from pipelines.train.loop import ContrastiveModel, feature_cached_step, skip_shm_comm_op, warmup_cosine
from pipelines.train.stage import resolve_paths, run_training
from pipelines.train.tracking import run_key

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

ROWS = 48
GLOBAL_BATCH = 16
STEPS = 6  # two epochs


def write_shards(storage: Storage, n: int, files: int = 2, seed: int = 0, px: int = 40,
                 row_group_size: int | None = None) -> None:
    """Committed shard-stage output: Parquet files in SAMPLE_SCHEMA plus the manifest, written last."""
    samples = shape_samples(n, px=px, seed=seed)
    entries = []
    for f in range(files):
        part = samples[f::files]
        urls = [f"synthetic://{seed}/{f}/{i}" for i in range(len(part))]
        table = pa.table({
            "key": [sample_key(u, s.caption) for u, s in zip(urls, part)], "url": urls,
            "caption": [s.caption for s in part], "query": [""] * len(part), "image": [s.image for s in part],
            "width": [px] * len(part), "height": [px] * len(part), "original_width": [px] * len(part),
            "original_height": [px] * len(part), "sha256": [""] * len(part), "phash": [0] * len(part),
        }, schema=SAMPLE_SCHEMA)
        name = f"part-{f:05d}.parquet"
        entries.append(FileEntry(name, len(part), storage.write_parquet(table, name, row_group_size=row_group_size)))
    write_manifest(storage, "", Manifest(stage="shard", fingerprint="0" * 64, files=entries, rows_in=n, rows_out=n))


def make_shards(tmp_path_factory) -> str:
    """The ROWS-row shard set every training test reads (also tests/test_train_elastic.py)."""
    path = tmp_path_factory.mktemp("shards")
    write_shards(Storage.from_uri(str(path)), ROWS, row_group_size=8)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory)


def tiny_config(root: Path, shards: str, **kw) -> TrainConfig:
    base = dict(
        model="tiny-vit", global_batch_size=GLOBAL_BATCH, epochs=2, max_steps=STEPS, zero_stage=2,
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.1), checkpoint_every=2, keep_checkpoints=1,
        storage_path=str(root / "runs"), run_name="main", num_workers=2, cpus_per_worker=1.0, max_failures=0,
        seed=0, data=TrainDataConfig(manifest=shards, crop_scale=(1.0, 1.0), chunk_rows=8, shuffle_window_rows=16,
                                     loader_num_cpus=0.5, prefetch_steps=2),
    )
    base.update(kw)
    return resolve_paths(TrainConfig(**base))


def dumps(root: Path, **kw) -> TrainHooks:
    """The tests' injection points: full fp32 state dumped after every save and load, every step's keys."""
    return TrainHooks(debug_dump_dir=str(root / "dumps"), keys_dir=str(root / "keys"), **kw)


def history(storage_root: str, run: str, s3=None) -> list[dict]:
    text = Storage.from_uri(f"{storage_root}/{run}", s3).read_bytes("metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def step_keys(keys_dir: str) -> dict[int, list[str]]:
    """step -> the global batch's keys in rank order, from the last time each step was trained (a step
    trained again after a restart overwrites the earlier attempt, which must have been identical anyway)."""
    attempts: dict[tuple[int, int], list[str]] = {}
    records = []
    for name in sorted(os.listdir(keys_dir)):
        for line in Path(keys_dir, name).read_text().splitlines():
            records.append(json.loads(line))
    by_step: dict[int, dict[int, list[str]]] = {}
    for r in records:
        seen = attempts.setdefault((r["step"], r["rank"]), r["keys"])
        assert seen == r["keys"], f"step {r['step']} rank {r['rank']} trained on other samples after a restart"
        by_step.setdefault(r["step"], {})[r["rank"]] = r["keys"]
    return {s: [k for rank in sorted(ranks) for k in ranks[rank]] for s, ranks in sorted(by_step.items())}


def plan_keys(cfg: TrainConfig, shards: str, steps: range) -> dict[int, list[str]]:
    """What the plan says step s (1-based) trains on, read straight from the shards."""
    storage, files, rows = committed_layout(shards)
    keys = [storage.read_parquet([f], columns=["key"])["key"].to_pylist() for f in files]
    plan = SamplePlan(rows, cfg.global_batch_size, cfg.seed, cfg.data.chunk_rows, cfg.data.shuffle_window_rows)
    return {s: [keys[f][r] for f, r in plan.global_rows(s - 1).tolist()] for s in steps}


def reference_losses(cfg: TrainConfig, shards: str, steps: int, total: int | None = None) -> list[float]:
    """Per-step losses of a plain single-process PyTorch run over the plan's global batches: same
    initial weights (seed), AdamW groups, warmup-cosine schedule and gradient clipping."""
    from clip_model.transforms import TrainTransform
    from pipelines.train.data import load_tokenizer, prepare_rows

    storage, files, rows = committed_layout(shards)
    tables = [storage.read_parquet([f], columns=["image", "caption"]) for f in files]
    plan = SamplePlan(rows, cfg.global_batch_size, cfg.seed, cfg.data.chunk_rows, cfg.data.shuffle_window_rows)
    mcfg = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model = ContrastiveModel(build_model(mcfg), build_loss("clip"))
    o = cfg.optim
    opt = adamw(model, o.lr, o.weight_decay, o.betas, o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(o.warmup_steps, total or cfg.max_steps, o.min_lr_ratio))
    losses = []
    for step in range(steps):
        picked = plan.global_rows(step).tolist()
        cols = prepare_rows([tables[f]["image"][r].as_py() for f, r in picked],
                            [tables[f]["caption"][r].as_py() for f, r in picked],
                            TrainTransform(mcfg.vision.image_size, scale=(1.0, 1.0)), load_tokenizer(),
                            mcfg.text.context_length)
        loss, _ = model(torch.from_numpy(cols["image"]), torch.from_numpy(cols["tokens"]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


# -- fast, no Ray -------------------------------------------------------------------------------
def test_config_rejects_bad_batch_policy() -> None:
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        TrainConfig(global_batch_size=32, num_workers=[2, 3])
    with pytest.raises(ValueError, match="accum_freq"):
        TrainConfig(global_batch_size=32, num_workers=2, accum_freq=3)
    with pytest.raises(ValueError, match="fail_marker"):
        TrainHooks(fail_at_step=2)
    assert TrainConfig(global_batch_size=32, num_workers=[1, 2]).per_worker_batch(1) == 32


def test_feature_cached_accumulation_matches_full_batch_gradient() -> None:
    """accum_freq=4: the loss and every gradient equal those of one pass over the whole batch."""
    from clip_model import get_config

    torch.manual_seed(0)
    cfg = get_config("tiny-vit")
    model = ContrastiveModel(build_model(cfg), build_loss("clip"), accum_freq=4)
    images = torch.randn(16, 3, 32, 32)
    tokens = torch.randint(1, 400, (16, 32))
    tokens[:, 10] = 49407  # an EOT per row
    full, _ = model(images, tokens)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    micro = list(zip(images.chunk(4), tokens.chunk(4)))
    loss, _ = feature_cached_step(model, micro, lambda l: l.backward())
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")


def test_plan_is_a_pure_function_sliced_by_world_size() -> None:
    """Every epoch visits each row at most once (all but the partial last batch), epochs differ, the
    same inputs give the same order in any process, and worker slices tile the global batch."""
    plan = SamplePlan([1000, 37, 500], global_batch=64, seed=3, chunk_rows=64, window_rows=300)
    epochs = []
    for e in range(2):
        rows = np.concatenate([plan.global_rows(e * plan.steps_per_epoch + i) for i in range(plan.steps_per_epoch)])
        assert len({tuple(r) for r in rows.tolist()}) == len(rows) == plan.steps_per_epoch * 64
        assert all(r < plan.rows_per_file[f] for f, r in rows.tolist())
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    again = pickle.loads(pickle.dumps(plan))
    for step in (0, 23, 24, 47):
        want = plan.global_rows(step)
        np.testing.assert_array_equal(again.global_rows(step), want)
        for world in (1, 2, 4):
            np.testing.assert_array_equal(np.concatenate([plan.worker_rows(step, r, world) for r in range(world)]), want)
    other = SamplePlan([1100, 37, 500], global_batch=64, seed=3, chunk_rows=64, window_rows=300)
    assert not np.array_equal(other.global_rows(0), plan.global_rows(0))  # the manifest is an input


def test_commit_window_and_pruning(tmp_path) -> None:
    """keep=1: while checkpoint 4 is uploaded but not committed, 2 is still there and is the one chosen;
    after 4 commits, pruning leaves 4 alone."""
    storage = Storage.from_uri(str(tmp_path))

    def write(step: int, complete: bool) -> None:
        name = ckpt_io.checkpoint_dir_name(step)
        storage.write_bytes(f"{name}/train_state.json", b"{}")
        if complete:
            storage.write_bytes(f"{name}/{ckpt_io.MARKER_FILE}", b"{}")

    write(1, False)  # a crashed write older than everything
    write(2, True)
    write(4, False)
    assert ckpt_io.newest_complete(storage) == "checkpoint_00000002"
    assert ckpt_io.prune(storage, keep=1) == ["checkpoint_00000001"]  # 2 is the only complete one: kept
    storage.write_bytes(f"checkpoint_00000004/{ckpt_io.MARKER_FILE}", b"{}")
    write(6, False)  # being written by the next save
    assert ckpt_io.prune(storage, keep=1) == ["checkpoint_00000002"]
    assert ckpt_io.checkpoint_names(storage) == ["checkpoint_00000004", "checkpoint_00000006"]
    assert ckpt_io.newest_complete(Storage.from_uri(str(tmp_path / "missing"))) is None


def test_loader_reads_the_plans_rows_and_augments_per_sample(shards) -> None:
    """A loader actor's work, in process: worker slices hold the plan's keys, and a sample's random crop
    depends on (seed, epoch, key) only, not on which loader or world size produced it."""
    from pipelines.train.data import InputSpec, SliceLoader

    cfg = tiny_config(Path("/unused"), shards)
    _, files, rows = committed_layout(shards)
    plan = SamplePlan(rows, GLOBAL_BATCH, 0, cfg.data.chunk_rows, cfg.data.shuffle_window_rows)
    spec = InputSpec(manifest=shards, s3=cfg.data.s3, files=tuple(files), image_size=32, context_length=32,
                     crop_scale=(0.5, 1.0), seed=0)
    halves = [SliceLoader(spec, plan).load(4, r, 2) for r in range(2)]
    whole = SliceLoader(spec, plan).load(4, 0, 1)
    assert list(halves[0]["key"]) + list(halves[1]["key"]) == plan_keys(cfg, shards, [5])[5] == list(whole["key"])
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    assert whole["image"].shape == (GLOBAL_BATCH, 3, 32, 32) and whole["tokens"].shape == (GLOBAL_BATCH, 32)
    first = str(whole["key"][0])  # step 4 is in epoch 1; the same sample in epoch 2 gets another crop
    later = [SliceLoader(spec, plan).load(s, 0, 1) for s in range(2 * plan.steps_per_epoch, 3 * plan.steps_per_epoch)]
    batch = next(b for b in later if first in list(b["key"]))
    assert not np.array_equal(batch["image"][list(batch["key"]).index(first)], whole["image"][0])


def test_a_loader_on_the_workers_thread_hands_over_the_plans_batches_in_order(shards) -> None:
    """data.loaders_per_worker=0: the feeder runs one SliceLoader on a thread instead of loader actors, and hands
    over, step by step, exactly what a loader computes for this rank's slice."""
    from pipelines.train.data import InputSpec, SliceLoader, StepFeeder

    cfg = tiny_config(Path("/unused"), shards)
    _, files, rows = committed_layout(shards)
    plan = SamplePlan(rows, GLOBAL_BATCH, 0, cfg.data.chunk_rows, cfg.data.shuffle_window_rows)
    spec = InputSpec(manifest=shards, s3=cfg.data.s3, files=tuple(files), image_size=32, context_length=32,
                     crop_scale=(0.5, 1.0), seed=0)
    feeder = StepFeeder(spec, plan, rank=1, world=2, start=3, stop=9, loaders=0, cpus=1.0, prefetch=3)
    got = list(feeder)
    feeder.close()
    assert feeder.actors == [] and [int(b["step"]) for b in got] == list(range(3, 9))
    reference = SliceLoader(spec, plan)
    for b in got:
        want = reference.load(int(b["step"]), 1, 2)
        assert list(b["key"]) == list(want["key"])
        np.testing.assert_array_equal(b["image"], want["image"])
        np.testing.assert_array_equal(b["tokens"], want["tokens"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned_by_checkpoint",))


def test_local_runs_go_without_the_preemption_watcher(monkeypatch) -> None:
    """A local Ray is never drained: run_training turns Ray Train's PreemptionWatcher off for it (the driver's
    variable, which Ray Train propagates to its controller), keeps it on a joined cluster, keeps a value the
    user set, and leaves the driver's environment as it was."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from pipelines.core.runtime import RayConfig
    from pipelines.train.stage import PREEMPTION_WATCHER_ENV, _preemption_watcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    with _preemption_watcher(RayConfig()):
        assert get_env_vars_to_propagate().get(PREEMPTION_WATCHER_ENV) == "0"
    assert PREEMPTION_WATCHER_ENV not in os.environ
    for joined in (RayConfig(address="10.0.0.1:6379"), None):
        if joined is None:
            monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        with _preemption_watcher(joined or RayConfig()):
            assert PREEMPTION_WATCHER_ENV not in get_env_vars_to_propagate()
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    with _preemption_watcher(RayConfig()):
        assert get_env_vars_to_propagate()[PREEMPTION_WATCHER_ENV] == "1"
    assert os.environ[PREEMPTION_WATCHER_ENV] == "1"


def test_the_trainer_leaves_out_ray_trains_dataset_manager(tmp_path) -> None:
    """No Ray Datasets pass through our trainer, so it starts no DatasetManager actor per worker group: its
    callbacks are Ray's defaults without the datasets callback, which Ray's own TorchTrainer does have (the
    override removes something real). Every training test here runs without it."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from pipelines.train.stage import build_trainer

    ours = build_trainer(tiny_config(tmp_path, str(tmp_path)), ["a.parquet"], [8])
    theirs = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    kinds = [type(c).__name__ for c in ours._create_default_callbacks()]
    assert "DatasetsCallback" not in kinds and "PlacementGroupCleanerCallback" in kinds, kinds
    assert sorted(kinds + ["DatasetsCallback"]) == sorted(type(c).__name__ for c in theirs._create_default_callbacks())
    assert any(isinstance(c, DatasetsCallback) for c in theirs._create_default_callbacks())


def test_deepspeed_comm_init_skips_the_shm_op() -> None:
    """DeepSpeed's comm backend asks build_shm_op for its shared-memory op (a JIT build, then a load in every
    worker); after skip_shm_comm_op it gets None, so torch.distributed (gloo) does every collective."""
    from deepspeed.comm.torch import build_shm_op

    skip_shm_comm_op()
    assert build_shm_op() is None


def test_import_deepspeed_leaves_mlflow_unimported_and_importable() -> None:
    """In a fresh process (as a training worker is): DeepSpeed imports without its autotuner pulling mlflow in,
    and mlflow still imports afterwards for the MLflow sink. The Muon module that ZeRO looks up is already
    imported, with its kernels' torch.compile deferred: TorchDynamo and TorchInductor are not imported, and
    torch.compile is torch's own again."""
    code = ("import sys, torch\nreal = torch.compile\nfrom pipelines.train.ds_import import import_deepspeed\n"
            "ds = import_deepspeed()\nassert 'mlflow' not in sys.modules, 'mlflow imported'\n"
            "assert ds.initialize and ds is import_deepspeed()\n"
            "from deepspeed.runtime.zero.muon import original_muon\n"
            "assert 'deepspeed.runtime.zero.muon.muon_optimizer' in sys.modules\n"
            "assert callable(original_muon.zeropower_via_newtonschulz5) and torch.compile is real\n"
            "loaded = [m for m in sys.modules if m.startswith(('torch._inductor', 'torch._dynamo'))]\n"
            "assert not loaded, loaded[:5]\n"
            "import mlflow\nassert mlflow.set_tracking_uri\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ok", r.stderr[-2000:]  # DeepSpeed prints too


def test_a_loader_process_never_imports_torch(shards) -> None:
    """A training loader (its own Ray actor process) crops, normalises and tokenizes with NumPy: in a fresh
    process, SliceLoader loads a step's batch, and neither torch nor the model code is imported."""
    code = f"""
import json, sys
from pipelines.train.data import InputSpec, SamplePlan, SliceLoader, committed_layout
storage, files, rows = committed_layout({shards!r})
spec = InputSpec(manifest={shards!r}, s3=None, files=tuple(files), image_size=32, context_length=16,
                 crop_scale=(0.9, 1.0), seed=0)
batch = SliceLoader(spec, SamplePlan(rows, {GLOBAL_BATCH}, 0, 8, 16)).load(0, 0, 2)
loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in ('clip_model.model', 'clip_model.loss'))
print(json.dumps([list(batch['image'].shape), str(batch['image'].dtype), list(batch['tokens'].shape),
                  str(batch['tokens'].dtype), loaded[:5]]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    image_shape, image_dtype, token_shape, token_dtype, loaded = json.loads(r.stdout.splitlines()[-1])
    assert image_shape == [GLOBAL_BATCH // 2, 3, 32, 32] and image_dtype == "float32"
    assert token_shape == [GLOBAL_BATCH // 2, 16] and token_dtype == "int64" and loaded == []


def test_deferred_compile_compiles_on_the_first_call_only() -> None:
    """The stand-in for torch.compile that import_deepspeed uses for DeepSpeed's Muon kernels: a decorated
    function is compiled (with its options) at its first call, once; modules go to the real compile at once."""
    from pipelines.train.ds_import import deferred_compile

    calls = []

    def fake_compile(model, **options):
        calls.append((model, options))
        return lambda *a, **k: ("compiled", model(*a, **k))

    later = deferred_compile(fake_compile)

    @later
    def double(x):
        return 2 * x

    @later(dynamic=False)
    def square(x):
        return x * x

    assert calls == [] and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8) and square(3) == ("compiled", 9)
    assert [(m.__name__, o) for m, o in calls] == [("double", {}), ("square", {"dynamic": False})]
    module = torch.nn.Linear(2, 2)
    assert later(module, mode="default")(torch.ones(1, 2))[0] == "compiled" and calls[-1] == (module, {"mode": "default"})


def test_checkpoint_loads_run_no_code(tmp_path) -> None:
    """A pickle planted in the bucket is refused even where DeepSpeed asks for weights_only=False; RNG
    states round-trip through JSON."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": _Exploit()}, path)
    with ckpt_io.safe_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the block
    torch.manual_seed(5)
    np.random.seed(5)
    state = json.loads(json.dumps(ckpt_io.rng_state()))
    want = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(0)
    np.random.seed(0)
    ckpt_io.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.testing.assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]


# -- Ray Train + DeepSpeed ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main_run(ray_session, s3_server, shards, tmp_path_factory):
    """ZeRO-2, 2 workers, accum_freq 2, checkpoints on S3 with keep_checkpoints=1; rank 0 dies after
    checkpoint 4 is uploaded and before it is committed (max_failures=1)."""
    root = tmp_path_factory.mktemp("main")
    metrics = MetricsConfig(mlflow=MlflowConfig(tracking_uri=f"file://{root}/mlruns"),
                            wandb=WandbConfig(project="tests", mode="offline", dir=str(root / "wandb")))
    cfg = tiny_config(root, shards, storage_path=s3_server.uri("runs"), s3=s3_server.s3_options(), max_failures=1,
                      accum_freq=2, metrics=metrics)
    hooks = dumps(root, fail_before_commit_at_step=4, fail_marker=str(root / "failed_once"))
    return cfg, hooks, run_training(cfg, hooks)


def test_crash_in_commit_window_resumes_from_the_older_checkpoint(main_run, shards) -> None:
    """keep_checkpoints=1 and rank 0 killed between checkpoint 4's upload and its marker: checkpoint 2
    still exists and the restart resumes there; every step's loss equals a single-process run."""
    cfg, hooks, summary = main_run
    assert Path(hooks.fail_marker).read_text() == "4", "the failure hook never fired"
    assert summary["resumes"] == [{"step": 2, "from_world_size": 2, "world_size": 2}]
    h = history(cfg.storage_path, cfg.run_name, cfg.s3)
    assert [r["step"] for r in h] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in h]
    np.testing.assert_allclose(losses, reference_losses(cfg, shards, STEPS), rtol=1e-4)
    assert losses[-1] < 0.9 * losses[0], losses  # learns
    assert all(r["data_wait_ms"] >= 0 and r["samples_per_s"] > 0 for r in h)


def test_resumed_run_feeds_the_same_samples_and_ends_on_the_same_weights(main_run, shards) -> None:
    """Killed at step 4 and resumed from 2 (steps 3-4 trained twice): both attempts fed exactly the samples
    the plan gives each step, and at step 4 the resumed attempt holds the weights and Adam moments that the
    first attempt, uninterrupted up to there, had saved."""
    cfg, hooks, _ = main_run
    killed_at = int(Path(hooks.fail_marker).read_text())  # the step whose checkpoint the first attempt died saving
    # Each worker process writes its own keys file: steps 3 and 4 were trained by two processes per rank.
    trained_by: dict[tuple[int, int], set[str]] = {}
    for name in os.listdir(hooks.keys_dir):
        for line in Path(hooks.keys_dir, name).read_text().splitlines():
            r = json.loads(line)
            trained_by.setdefault((r["step"], r["rank"]), set()).add(name)
    assert all(len(trained_by[(s, rank)]) == 2 for s in (killed_at - 1, killed_at) for rank in (0, 1)), trained_by
    got = step_keys(hooks.keys_dir)  # also asserts that a step trained twice saw the same samples both times
    assert got[killed_at] and {s: got[s] for s in range(1, STEPS + 1)} == plan_keys(cfg, shards, range(1, STEPS + 1))
    assert len({k for keys in got.values() for k in keys}) == ROWS  # all of epoch 1 and 2 cover the data
    resumed = torch.load(Path(hooks.debug_dump_dir, f"save_step{killed_at}_ws2.pt"), weights_only=True)
    first = torch.load(Path(hooks.debug_dump_dir, f"save_step{killed_at}_ws2.earlier.pt"), weights_only=True)
    for part in ("params", "exp_avg", "exp_avg_sq"):
        assert set(resumed[part]) == set(first[part]) and first[part], part
        for k, v in first[part].items():
            torch.testing.assert_close(resumed[part][k], v, msg=f"{part}/{k}")
    assert resumed["global_steps"] == first["global_steps"]


def test_export_loads_with_openai_layout(main_run, tmp_path) -> None:
    cfg, hooks, _ = main_run
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    for name in ("model.pt", "config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes(store.read_bytes(f"export/{name}"))
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "visual.conv1.weight" in sd and sd["logit_scale"].shape == () and all(v.dtype == torch.float32 for v in sd.values())
    model, tok = load_export(str(tmp_path))
    saved = torch.load(Path(hooks.debug_dump_dir, f"save_step{STEPS}_ws2.pt"), weights_only=True)["params"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert tok(["a red circle"], context_length=32).shape == (1, 32)
    assert any(p.startswith("tensorboard/") and "tfevents" in p for p in store.list("", recursive=True))


def test_metrics_of_the_crashed_and_resumed_run_are_one_history_everywhere(main_run, tmp_path, monkeypatch) -> None:
    """metrics.jsonl, TensorBoard (on S3), MLflow and W&B (offline) all hold each step once, with the value
    of the attempt that finished it (the crash at step 4 redid steps 3-4)."""
    from mlflow.tracking import MlflowClient

    from tests.metric_readers import download, tensorboard_scalars, wandb_history

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's MlflowClient (the workers set it)
    cfg, _, summary = main_run
    assert summary["metrics_errors"] == {}
    want = {r["step"]: r["loss"] for r in history(cfg.storage_path, cfg.run_name, cfg.s3)}
    assert sorted(want) == list(range(1, STEPS + 1))
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    assert tensorboard_scalars(download(store, "tensorboard", tmp_path)) == pytest.approx(want)
    client = MlflowClient(cfg.metrics.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.metrics.mlflow.experiment).experiment_id],
                                filter_string=f"tags.`clip.run_dir` = '{store.uri('')}'")
    assert run.info.status == "FINISHED" and run.data.params["global_batch_size"] == str(GLOBAL_BATCH)
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == pytest.approx(want)
    wandb_runs = sorted(Path(cfg.metrics.wandb.dir, "wandb").glob(f"offline-run-*-{run_key(store.uri(''))}"))
    assert len(wandb_runs) == 2  # the crashed attempt and the resumed one, one W&B run id
    _, steps = wandb_history(wandb_runs[-1])
    assert {s: v["train/loss"] for s, v in steps.items()} == pytest.approx(want)


def test_checkpoints_committed_and_pruned_on_s3(main_run) -> None:
    cfg, _, _ = main_run
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    assert ckpt_io.checkpoint_names(store) == [f"checkpoint_{STEPS:08d}"]  # keep_checkpoints=1
    name = f"checkpoint_{STEPS:08d}"
    assert store.exists(f"{name}/_COMPLETE.json")
    state = json.loads(store.read_bytes(f"{name}/train_state.json"))
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * GLOBAL_BATCH and state["world_size"] == 2
    assert store.exists(f"{name}/rng/rank_0.json") and store.exists(f"{name}/rng/rank_1.json")
    assert not any(p.endswith(".pkl") or "/rng/" in p and p.endswith(".pt") for p in store.list(name))


def assert_same_state(saved_path: Path, loaded_path: Path) -> None:
    saved = torch.load(saved_path, weights_only=True)
    loaded = torch.load(loaded_path, weights_only=True)
    for part in ("params", "exp_avg", "exp_avg_sq"):
        assert set(saved[part]) == set(loaded[part]) and saved[part], part
        for k in saved[part]:
            torch.testing.assert_close(loaded[part][k], saved[part][k], rtol=0, atol=0, msg=f"{part}/{k}")
    assert loaded["lr"] == pytest.approx(saved["lr"], rel=1e-12)
    assert any(v.abs().sum() > 0 for v in saved["exp_avg"].values())  # moments really are non-trivial


def elastic_chain(cfg: TrainConfig, hooks: TrainHooks, stop: int, links: int = 2) -> None:
    """The run saved by 2 workers at `stop` -> resumed by 1 worker -> (resumed by 2 workers)."""
    dump_dir = Path(hooks.debug_dump_dir)
    for workers, steps in ((1, stop + 1), (2, stop + 2))[:links]:
        resumed = dataclasses.replace(cfg, num_workers=workers, max_steps=steps)
        summary = run_training(resumed, dataclasses.replace(hooks, fail_at_step=None, fail_before_commit_at_step=None))
        assert summary["resumes"][-1] == {"step": steps - 1, "from_world_size": 3 - workers, "world_size": workers}
        assert_same_state(dump_dir / f"save_step{steps - 1}_ws{3 - workers}.pt",
                          dump_dir / f"load_step{steps - 1}_ws{workers}.pt")


def test_elastic_resume_zero2_from_s3(main_run, shards) -> None:
    """2 -> 1 workers through a universal checkpoint: exact state, the plan's samples at the new world
    size, and the 1-worker step continues the single-process trajectory (the global batch is kept).
    (1 -> 2, and ZeRO-3, are covered by the live-elastic test below.)"""
    cfg, hooks, _ = main_run
    elastic_chain(cfg, hooks, stop=STEPS, links=1)
    h = history(cfg.storage_path, cfg.run_name, cfg.s3)
    assert [r["step"] for r in h] == list(range(1, STEPS + 2))
    assert [r["world_size"] for r in h][-2:] == [2, 1]
    np.testing.assert_allclose([r["loss"] for r in h], reference_losses(cfg, shards, STEPS + 1, total=STEPS), rtol=1e-4)
    assert step_keys(hooks.keys_dir) == plan_keys(cfg, shards, range(1, STEPS + 2))


# -- live elastic: a node lost and regained while the run goes on --------------------------------------
