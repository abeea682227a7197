"""Ray Train + DeepSpeed training of tiny-vit on 2 CPU workers, on generated coloured-shape shards.

One Ray (6 logical CPUs on a 2-core machine: train workers hold theirs) serves the module. The
runs chain to keep the file within minutes: the main ZeRO-2 run (on the S3 fixture, with a killed
worker) is also the first link of the ZeRO-2 elastic chain. Every test dataset holds exactly
one global batch (32 rows) with crop_scale (1, 1): each step then sees the same 32 samples
whatever the Ray Data split, so runs can be compared step by step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from clip_model import build_loss, build_model
from clip_model.export import load_export
from clip_model.optim import param_groups
from pipelines.core.manifest import FileEntry, Manifest, write_manifest
from pipelines.core.schema import SAMPLE_SCHEMA, sample_key
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import shape_samples
from pipelines.train.config import OptimConfig, TrainConfig, TrainDataConfig
from pipelines.train.hooks import TrainHooks
from pipelines.train.stage import resolve_paths, run_training
from pipelines.train.loop import ContrastiveModel, feature_cached_step, warmup_cosine

pytestmark = pytest.mark.slow

ROWS = 32
GLOBAL_BATCH = 32


def write_shards(storage: Storage, n: int, files: int = 2, seed: int = 0, px: int = 40) -> None:
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
        entries.append(FileEntry(name, len(part), storage.write_parquet(table, name)))
    write_manifest(storage, "", Manifest(stage="shard", fingerprint="0" * 64, files=entries, rows_in=n, rows_out=n))


@pytest.fixture(scope="module")
def ray_session(s3_server):
    # After s3_server: Ray's workers inherit the S3 credentials the fixture put in os.environ.
    import ray

    if ray.is_initialized():
        # An earlier test module's Ray was started without the S3 credentials and the CPUs these need.
        ray.shutdown()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("shards")
    write_shards(Storage.from_uri(str(path)), ROWS)
    return str(path)


def tiny_config(root: Path, shards: str, **kw) -> TrainConfig:
    base = dict(
        model="tiny-vit", global_batch_size=GLOBAL_BATCH, epochs=1, max_steps=6, zero_stage=2,
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.1), checkpoint_every=3, keep_checkpoints=3,
        storage_path=str(root / "runs"), run_name="main", num_workers=2, cpus_per_worker=1.0, max_failures=0,
        seed=0, data=TrainDataConfig(manifest=shards, crop_scale=(1.0, 1.0), map_batch_size=32, map_num_cpus=0.5),
    )
    base.update(kw)
    return resolve_paths(TrainConfig(**base))


def dumps(root: Path, **kw) -> TrainHooks:
    """The tests' injection points: full fp32 state dumped after every save and load (plus any failure hook)."""
    return TrainHooks(debug_dump_dir=str(root / "dumps"), **kw)


def history(storage_root: str, run: str, s3=None) -> list[dict]:
    text = Storage.from_uri(f"{storage_root}/{run}", s3).read_bytes("metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def reference_losses(cfg: TrainConfig, shards: str, steps: int, total: int | None = None) -> list[float]:
    """Per-step losses of a plain single-process PyTorch run over the whole global batch: same
    initial weights (seed), AdamW groups, warmup-cosine schedule and gradient clipping."""
    from pipelines.train.data import committed_files, load_tokenizer, prepare_rows
    from clip_model.transforms import TrainTransform

    storage, files, _ = committed_files(shards)
    table = storage.read_parquet(files, columns=["image", "caption"])
    mcfg = cfg.model_config()
    cols = prepare_rows(table["image"].to_pylist(), table["caption"].to_pylist(),
                        TrainTransform(mcfg.vision.image_size, scale=(1.0, 1.0)), load_tokenizer(), mcfg.text.context_length)
    images, tokens = torch.from_numpy(cols["image"]), torch.from_numpy(cols["tokens"])
    torch.manual_seed(cfg.seed)
    model = ContrastiveModel(build_model(mcfg), build_loss("clip"))
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(o.warmup_steps, total or cfg.max_steps, o.min_lr_ratio))
    losses = []
    for _ in range(steps):
        loss, _ = model(images, tokens)
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


# -- Ray Train + DeepSpeed ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main_run(ray_session, s3_server, shards, tmp_path_factory):
    """ZeRO-2 on 2 workers with checkpoints on S3; rank 1 exits hard before step 5 (max_failures=1)."""
    root = tmp_path_factory.mktemp("main")
    cfg = tiny_config(root, shards, storage_path=s3_server.uri("runs"), s3=s3_server.s3_options(), max_failures=1)
    hooks = dumps(root, fail_at_step=5, fail_marker=str(root / "failed_once"))
    return cfg, hooks, run_training(cfg, hooks)


def test_killed_worker_resumes_and_matches_single_process_run(main_run, shards) -> None:
    """The run restarts from checkpoint 3 and finishes; every step's loss, before and after the
    kill, equals an uninterrupted single-process run of the same model, batch and optimizer.

    Tolerance rel 1e-4: the Ray Data split may hand each worker other rows, which only reorders
    float sums in the gathered loss and the gradient all-reduce.
    """
    cfg, hooks, summary = main_run
    assert Path(hooks.fail_marker).exists(), "the failure hook never fired"
    assert summary["resumes"] == [{"step": 3, "from_world_size": 2, "world_size": 2}]
    h = history(cfg.storage_path, cfg.run_name, cfg.s3)
    assert [r["step"] for r in h] == list(range(1, 7))
    losses = [r["loss"] for r in h]
    np.testing.assert_allclose(losses, reference_losses(cfg, shards, 6), rtol=1e-4)
    assert losses[-1] < min(0.8 * losses[0], math.log(GLOBAL_BATCH) - 0.2), losses  # learns, below chance
    assert all(r["data_wait_ms"] >= 0 and r["samples_per_s"] > 0 for r in h)


def test_export_loads_with_openai_layout(main_run, tmp_path) -> None:
    cfg, hooks, _ = main_run
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    for name in ("model.pt", "config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes(store.read_bytes(f"export/{name}"))
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "visual.conv1.weight" in sd and sd["logit_scale"].shape == () and all(v.dtype == torch.float32 for v in sd.values())
    model, tok = load_export(str(tmp_path))
    saved = torch.load(Path(hooks.debug_dump_dir, "save_step6_ws2.pt"), weights_only=False)["params"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert tok(["a red circle"], context_length=32).shape == (1, 32)
    assert any(p.startswith("tensorboard/") and "tfevents" in p for p in store.list("", recursive=True))


def test_checkpoints_committed_on_s3(main_run) -> None:
    cfg, _, _ = main_run
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    for step in (3, 6):
        name = f"checkpoint_{step:08d}"
        assert store.exists(f"{name}/_COMPLETE.json")
        state = json.loads(store.read_bytes(f"{name}/train_state.json"))
        assert state["step"] == step and state["samples_seen"] == step * GLOBAL_BATCH and state["world_size"] == 2
        assert store.exists(f"{name}/rng/rank_0.pt") and store.exists(f"{name}/rng/rank_1.pt")


def assert_same_state(saved_path: Path, loaded_path: Path) -> None:
    saved = torch.load(saved_path, weights_only=False)
    loaded = torch.load(loaded_path, weights_only=False)
    for part in ("params", "exp_avg", "exp_avg_sq"):
        assert set(saved[part]) == set(loaded[part]) and saved[part], part
        for k in saved[part]:
            torch.testing.assert_close(loaded[part][k], saved[part][k], rtol=0, atol=0, msg=f"{part}/{k}")
    assert loaded["lr"] == pytest.approx(saved["lr"], rel=1e-12)
    assert any(v.abs().sum() > 0 for v in saved["exp_avg"].values())  # moments really are non-trivial


def elastic_chain(cfg: TrainConfig, hooks: TrainHooks, stop: int) -> None:
    """The run saved by 2 workers at `stop` -> resumed by 1 worker -> resumed by 2 workers."""
    dump_dir = Path(hooks.debug_dump_dir)
    for workers, steps in ((1, stop + 1), (2, stop + 2)):
        resumed = dataclasses.replace(cfg, num_workers=workers, max_steps=steps)
        summary = run_training(resumed, TrainHooks(debug_dump_dir=hooks.debug_dump_dir))
        assert summary["resumes"][-1] == {"step": steps - 1, "from_world_size": 3 - workers, "world_size": workers}
        assert_same_state(dump_dir / f"save_step{steps - 1}_ws{3 - workers}.pt",
                          dump_dir / f"load_step{steps - 1}_ws{workers}.pt")


def test_elastic_resume_zero2_from_s3(main_run, shards) -> None:
    cfg, hooks, _ = main_run
    elastic_chain(cfg, hooks, stop=6)
    h = history(cfg.storage_path, cfg.run_name, cfg.s3)
    assert [r["step"] for r in h] == list(range(1, 9))
    # The global batch is kept on resize, so the 1-worker step continues the same trajectory.
    np.testing.assert_allclose([r["loss"] for r in h][:7], reference_losses(cfg, shards, 7, total=6), rtol=1e-4)
    store = Storage.from_uri(f"{cfg.storage_path}/{cfg.run_name}", cfg.s3)
    kept = sorted({p.split("/")[0] for p in store.list("", recursive=True) if p.startswith("checkpoint_0")})
    assert kept == ["checkpoint_00000006", "checkpoint_00000007", "checkpoint_00000008"]  # keep_checkpoints=3


def test_elastic_resume_zero3_with_feature_cached_accumulation(ray_session, shards, tmp_path) -> None:
    """ZeRO-3 with accum_freq=2 (feature caching through DeepSpeed's accumulation), 2 -> 1 -> 2 workers."""
    cfg = tiny_config(tmp_path, shards, zero_stage=3, accum_freq=2, max_steps=2, checkpoint_every=2, run_name="z3")
    hooks = dumps(tmp_path)
    run_training(cfg, hooks)
    elastic_chain(cfg, hooks, stop=2)
    h = history(cfg.storage_path, cfg.run_name)
    assert [r["step"] for r in h] == [1, 2, 3, 4]
    # Steps 1-3 used the schedule of the first run (max_steps=2): the accumulated, resharded
    # trajectory equals the single-process full-batch run.
    np.testing.assert_allclose([r["loss"] for r in h][:3], reference_losses(cfg, shards, 3, total=2), rtol=1e-4)


def test_incomplete_checkpoint_is_never_chosen(tmp_path) -> None:
    import pyarrow.fs as pafs

    from pipelines.train.checkpointing import MARKER_FILE, newest_complete

    for step, complete in ((3, True), (6, True), (9, False)):
        d = tmp_path / f"checkpoint_{step:08d}"
        d.mkdir()
        (d / "train_state.json").write_text("{}")
        if complete:
            (d / MARKER_FILE).write_text("{}")
    assert newest_complete(pafs.LocalFileSystem(), str(tmp_path)) == str(tmp_path / "checkpoint_00000006")
    assert newest_complete(pafs.LocalFileSystem(), str(tmp_path / "missing")) is None
