"""Contrastive pretraining of clip_model on Ray Train (V2) + DeepSpeed ZeRO, fed by Ray Data.

    python -m pipelines.train --config configs/train_tiny.yaml [key=value ...]

The driver only resolves the config, starts Ray, builds the streaming input dataset and the
TorchTrainer, and commits the run directory's manifest at the end; the settings live in
`config.py`, the per-worker loop in `loop.py`, the input stages in `data.py`, checkpoint layout and
resume rules in `checkpointing.py`. Imports go one way: config <- loop <- stage.

Global-batch policy (what must stay true when the worker count changes, e.g. on an elastic
resume): `global_batch_size` is the setting and the number of negatives of every sample; the
per-worker batch is recomputed as global_batch_size / workers at (re)start, and a worker count that
does not divide the global batch is an error, never a silently smaller contrastive batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.core.manifest import Manifest, write_manifest
from pipelines.core.runtime import RayConfig, cluster_address, init_ray
from pipelines.core.stage import Stage, Wiring
from pipelines.core.storage import Storage
from pipelines.train.config import TrainConfig, run_dir
from pipelines.train.hooks import TrainHooks

log = logging.getLogger(__name__)


def build_trainer(cfg: TrainConfig, files: list[str], rows_per_file: list[int], hooks: TrainHooks | None = None):
    """The TorchTrainer. No Ray Datasets pass through it: every worker feeds itself its slice of the
    plan (pipelines.train.data), and checkpoints are ours (checkpointing.py), not Ray's checkpoint
    manager, so that no keep_checkpoints value opens a window without a complete checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig

    from pipelines.train.loop import train_loop_per_worker

    counts = cfg.worker_counts()
    num_workers = counts.start if len(counts) == 1 else (counts.start, counts.stop - 1)
    root = Storage.from_uri(cfg.storage_path, cfg.s3)
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=root.fs_path(""),
        storage_filesystem=root.fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
    )
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "files": files, "rows_per_file": rows_per_file, "cfg_dict": to_dict(cfg),
                           "hooks": hooks or TrainHooks()},
        # gloo on CPU; DeepSpeed wraps this process group instead of creating its own.
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.worker_resources},
            elastic_resize_monitor_interval_s=cfg.resize_check_s),
        run_config=run_config,
    )


def _trainer_class():
    """TorchTrainer without Ray Train's datasets callback. That callback starts a DatasetManager actor for every
    worker group, also when the trainer has no datasets (ours never has: each worker reads its own slice), and
    hands each worker a shard provider that nothing here asks for. Without it a worker-group start, restarts and
    resizes included, has one process less (~1 CPU-second on 2 cores); the workers' context takes no provider
    (Ray's default)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def _absolute(path: str) -> str:
    # Ray Train workers run in their own working directory: relative local paths must not reach them.
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    data = dataclasses.replace(cfg.data, manifest=_absolute(cfg.data.manifest))
    return dataclasses.replace(cfg, storage_path=_absolute(cfg.storage_path), data=data)


# Settings that change where or how fast a run goes, not what it learns: left out of the fingerprint.
# (num_workers is out because the global batch, and so every optimizer step, is kept on a resize.)
_OPERATIONAL = ("storage_path", "run_name", "s3", "num_workers", "cpus_per_worker", "worker_resources",
                "resize_check_s", "max_failures", "log_every", "checkpoint_every", "keep_checkpoints", "ray",
                "metrics")
_OPERATIONAL_DATA = ("manifest", "s3", "loaders_per_worker", "loader_num_cpus", "prefetch_steps")


def fingerprint_of(cfg: TrainConfig) -> str:
    """The training run's identity: what it learns from (the committed shards) and how (the settings
    that shape the weights)."""
    from pipelines.core.manifest import fingerprint, read_committed

    _, shards = read_committed(cfg.data.manifest, cfg.data.s3, "data.manifest (the shard stage's output)",
                               producer="shard")
    conf = {k: v for k, v in to_dict(cfg).items() if k not in _OPERATIONAL}
    conf["data"] = {k: v for k, v in conf["data"].items() if k not in _OPERATIONAL_DATA}
    return fingerprint("train", conf, [shards])


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextlib.contextmanager
def _preemption_watcher(ray_cfg: RayConfig) -> Iterator[None]:
    """Ray Train starts a PreemptionWatcher actor for every worker group: it polls the cluster for nodes being
    drained (spot preemption notices from an autoscaler). A Ray on this machine is never drained, so a local
    run goes without it: one process less per worker-group start (about 2 CPU-seconds each on 2 cores,
    restarts included). The driver's environment reaches the controller (Ray Train propagates this variable);
    a value the user set is kept."""
    if cluster_address(ray_cfg) or PREEMPTION_WATCHER_ENV in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(PREEMPTION_WATCHER_ENV, None)


def run_training(cfg: TrainConfig, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Train (or resume) and return the summary that rank 0 wrote next to the export. `hooks` are the
    tests' injection points (a worker that dies once, state dumps); the product never passes them."""
    from pipelines.train.data import committed_layout

    cfg = resolve_paths(cfg)
    _validate(cfg)
    if not cfg.data.manifest:
        raise ValueError("data.manifest is required: the shard stage's output directory (local or s3://)")
    init_ray(cfg.ray)
    start = time.time()
    _, files, rows_per_file = committed_layout(cfg.data.manifest, cfg.data.s3)
    with _preemption_watcher(cfg.ray):
        result = build_trainer(cfg, files, rows_per_file, hooks).fit()
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run_name} failed: {result.error}") from result.error
    summary = json.loads(run_dir(cfg).read_bytes("summary.json"))
    summary["driver_wall_s"] = round(time.time() - start, 2)
    return summary


def run(cfg: TrainConfig, hooks: TrainHooks | None = None) -> Manifest:
    """Train (or resume) and commit the run directory: its export, summary and metrics, under the run's
    fingerprint, so the DAG and a standalone run commit the same thing."""
    from pipelines.train.data import committed_files

    fp = fingerprint_of(cfg)
    summary = run_training(cfg, hooks)
    _, _, rows = committed_files(cfg.data.manifest, cfg.data.s3)
    out = run_dir(cfg)
    files = [{"path": p, "rows": 0, "bytes": out.size(p)}
             for p in sorted(out.list("export")) + ["summary.json", "metrics.jsonl"]]
    manifest = Manifest(stage="train", fingerprint=fp, files=files, rows_in=rows, rows_out=rows, config=to_dict(cfg),
                        timings={"total_s": summary.get("driver_wall_s", 0.0)},
                        extra={"summary": summary, "model_sha256": summary["model_sha256"]})
    write_manifest(out, "", manifest)
    return manifest


def _validate(cfg: TrainConfig) -> None:
    """An unknown model name fails here, before any data stage has run (not when training starts)."""
    try:
        cfg.model_config()
    except KeyError as err:
        raise ValueError(f"train.model: {err.args[0]}") from None
    from pipelines.train.tracking import validate

    validate(cfg.metrics)


def _wire(cfg: TrainConfig, w: Wiring) -> TrainConfig:
    root, _, name = w.output.rstrip("/").rpartition("/") if w.output else ("", "", "")
    data = dataclasses.replace(cfg.data, manifest=w.input or cfg.data.manifest, s3=w.s3)
    return dataclasses.replace(cfg, data=data, s3=w.s3, ray=w.ray, storage_path=root or cfg.storage_path,
                               run_name=name or cfg.run_name)


STAGE = Stage(
    name="train", section=TrainConfig, default=TrainConfig,
    doc="contrastive pretraining on Ray Train + DeepSpeed ZeRO; commits the export",
    upstream="shard", wired=("data.manifest", "data.s3", "storage_path", "run_name", "s3", "ray"), wire=_wire,
    fingerprint=fingerprint_of, run=run, validate=_validate)


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    """`python -m pipelines.train`. `hooks`: the tests' injection points, for a test that runs the command as a
    user does; `python -m` never passes them."""
    def body(cfg: TrainConfig, _: Any) -> None:
        log.info("resolved config: %s", json.dumps(to_dict(cfg), sort_keys=True))
        s = run(cfg, hooks).extra["summary"]
        loss = f", loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}" if s.get("final_loss") is not None else ""
        print(f"train: {s.get('steps')} steps{loss}, {s.get('driver_wall_s', 0):.0f} s; export {s.get('export')} "
              f"(summary.json and metrics.jsonl beside it)", flush=True)

    return run_command("train", TrainConfig, argv, body, doc=__doc__, log_root=lambda c: c.storage_path)
