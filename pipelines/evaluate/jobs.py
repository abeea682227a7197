"""The evaluate stage of the DAG: a list of evaluation jobs against the run's own export.

Each job is `evaluate.stage.evaluate` on one eval set, committed under `<stage dir>/<job name>/`; the
stage's own manifest at `<stage dir>` lists every job's files and commits the set. Its fingerprint is
the jobs' settings, their template and class-name files by content, and the exported weights by hash,
so a retrain that commits other weights under the same file names re-evaluates.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field

from pipelines.core.config import to_dict
from pipelines.core.manifest import Manifest, fingerprint, read_committed, write_manifest
from pipelines.core.runtime import RayConfig
from pipelines.core.stage import Stage, Wiring
from pipelines.core.storage import S3Options, Storage
from pipelines.evaluate.sets import check_dataset
from pipelines.evaluate.config import SINGLE_TEMPLATE, TASKS, EvalConfig


@dataclass
class EvalJob:
    # Names the job's output folder and its section in the report.
    name: str
    # imagefolder:DIR or parquet:PATH (see pipelines.evaluate).
    dataset: str
    task: str = "zeroshot"
    classnames: str | None = None
    # "openai-imagenet" (the paper's 80), "simple", or a JSON/text file of templates.
    templates: str = "openai-imagenet"
    # The template scored alone beside the ensemble.
    single_template: str = SINGLE_TEMPLATE
    # Parquet sets: the integer label column. Jobs on the same set with different label columns (pair, shape,
    # colour of the same images) share one embedding pass.
    label_col: str = "label"
    # Paper section 5: split the eval set into Clean / Overlap against this run's training shards.
    overlap: bool = False
    overlap_hamming: int = 8
    probe_train: str | None = None
    batch_size: int = 64
    workers: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ValueError(f"evaluate job name {self.name!r} must be letters, digits, '_', '.', '-'")
        if not self.dataset:
            raise ValueError(f"evaluate job {self.name}: dataset must be given")
        if self.task not in TASKS:
            raise ValueError(f"evaluate job {self.name}: task must be one of {list(TASKS)}, got {self.task!r}")


@dataclass
class EvaluateStageConfig:
    # The jobs (the run config's `evaluate:` list).
    jobs: list[EvalJob] = field(default_factory=list)
    # Set by the runner: the train stage's committed directory (its export/ is evaluated) and the shard
    # stage's (for the overlap analysis), where this stage commits, and how to reach them.
    train: str = ""
    shards: str = ""
    output: str = ""
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        names = [j.name for j in self.jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate job names must be unique, got {names}")


def job_config(cfg: EvaluateStageConfig, job: EvalJob) -> EvalConfig:
    export = Storage.from_uri(cfg.train, cfg.s3).uri("export")
    return EvalConfig(checkpoint=export, dataset=job.dataset, output=Storage.from_uri(cfg.output, cfg.s3).uri(job.name),
                      task=job.task, classnames=job.classnames, templates=job.templates,
                      single_template=job.single_template, label_col=job.label_col,
                      train_manifest=cfg.shards if job.overlap else None, overlap_hamming=job.overlap_hamming,
                      probe_train=job.probe_train, batch_size=job.batch_size, workers=job.workers, s3=cfg.s3,
                      ray=cfg.ray)


def fingerprint_of(cfg: EvaluateStageConfig) -> str:
    _, train = read_committed(cfg.train, cfg.s3, "evaluate's train directory", producer="train")
    jobs = []
    for job in cfg.jobs:
        d = to_dict(job)
        for key in ("templates", "classnames"):
            path = getattr(job, key)
            if path and os.path.isfile(path):
                with open(path, "rb") as f:
                    d[f"{key}_sha256"] = hashlib.sha256(f.read()).hexdigest()
        jobs.append(d)
    # What is evaluated is the weights: their hash and the train stage's fingerprint, not the train manifest's
    # file list (its logs and metrics differ from run to run, so a retrain to the same weights would re-evaluate).
    return fingerprint("evaluate", {"jobs": jobs, "model_sha256": train.extra.get("model_sha256"),
                                    "train_fingerprint": train.fingerprint})


def run(cfg: EvaluateStageConfig) -> Manifest:
    started = time.time()
    fp = fingerprint_of(cfg)
    out = Storage.from_uri(cfg.output, cfg.s3)
    from pipelines.evaluate.stage import EmbeddingCache, evaluate  # torch: only when the stage runs

    files, images, results = [], 0, {}
    cache = EmbeddingCache()
    for job in cfg.jobs:
        cache.add_job(job.dataset, job.label_col)
    for job in cfg.jobs:
        r = evaluate(job_config(cfg, job), cache)
        results[job.name] = {k: r[k] for k in ("task", "top1", "top5", "n", "mean_per_class") if k in r}
        images += int(r.get("n") or r.get("n_images") or 0)
        job_dir = Storage.from_uri(out.uri(job.name), cfg.s3)
        files += [{"path": f"{job.name}/{p}", "rows": 0, "bytes": job_dir.size(p)} for p in job_dir.list("")]
    manifest = Manifest(stage="evaluate", fingerprint=fp, files=files, rows_in=images, rows_out=images,
                        config={"jobs": [to_dict(j) for j in cfg.jobs]},
                        extra={"results": results, "embedding_passes": cache.passes},
                        timings={"total_s": round(time.time() - started, 3)})
    write_manifest(out, "", manifest)
    return manifest


def validate(cfg: EvaluateStageConfig) -> None:
    """Every job's eval set and its template and class-name files exist, before any stage runs."""
    for job in cfg.jobs:
        check_dataset(job.dataset, cfg.s3, f"evaluate job {job.name}: dataset")
        if job.probe_train:
            check_dataset(job.probe_train, cfg.s3, f"evaluate job {job.name}: probe_train")
        for key in ("classnames",):
            path = getattr(job, key)
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"evaluate job {job.name}: {key} file {path} does not exist")
        if job.templates not in ("openai-imagenet", "simple") and not os.path.isfile(job.templates):
            raise FileNotFoundError(f"evaluate job {job.name}: templates {job.templates!r} is neither "
                                    "'openai-imagenet', 'simple' nor an existing file")


def _wire(jobs: list[EvalJob], w: Wiring) -> EvaluateStageConfig:
    return EvaluateStageConfig(jobs=list(jobs), train=w.dirs.get("train", ""), shards=w.dirs.get("shard", ""),
                               output=w.output, s3=w.s3, ray=w.ray)


STAGE = Stage(
    name="evaluate", section=list[EvalJob], default=list, upstream="train", wired=(), wire=_wire,
    doc="zero-shot, linear probe and retrieval jobs against the run's export, with the train/eval overlap",
    fingerprint=fingerprint_of, run=run, validate=validate,
    skip_when=lambda jobs: None if jobs else "no evaluate jobs configured")

