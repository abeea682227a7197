"""The training job's settings (read by the driver in stage.py and by every worker in loop.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.core.runtime import RayConfig
from pipelines.core.storage import S3Options, Storage


@dataclass
class OptimConfig:
    # Peak learning rate after warmup (AdamW; the paper uses 5e-4 at batch 32k).
    lr: float = 5e-4
    # Linear warmup from 0 to lr over this many optimizer steps, then cosine decay to lr * min_lr_ratio.
    warmup_steps: int = 1
    min_lr_ratio: float = 0.0
    # Decoupled weight decay on matrices and embeddings only (clip_model.optim.param_groups).
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # Global gradient-norm clip; 0 disables.
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 1:
            raise ValueError(f"optim.warmup_steps must be >= 1 (DeepSpeed's WarmupCosineLR needs it), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be in [0, 1), got {self.betas}")


@dataclass
class TrainDataConfig:
    # Directory (local or s3://) holding the shard stage's _manifest.json; only listed files are read.
    manifest: str = ""
    # Connection settings when manifest is on S3.
    s3: S3Options = field(default_factory=S3Options)
    # Random square crop covering this fraction of the image area, seeded per sample by (seed, epoch, key);
    # [1.0, 1.0] disables augmentation (the tests compare against a single-process run without it).
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # The order's read unit: each shard file splits into chunks of this many rows, and an epoch permutes
    # the chunks (match shard.row_group_size: a chunk is then one Parquet row group).
    chunk_rows: int = 256
    # Rows shuffled together: an epoch cuts its chunk order into windows of this many rows and permutes
    # the rows inside each. Larger mixes better; each loader caches what it reads of a window.
    shuffle_window_rows: int = 16384
    # Loader actors (read + decode + augment + tokenise) per training worker, and the CPUs each holds. 0 = one
    # loader on a thread of the training worker (no actor to start; for CPU runs where decode keeps up).
    loaders_per_worker: int = 1
    loader_num_cpus: float = 1.0
    # Steps each training worker has in flight (being loaded or ready) ahead of the one it trains on.
    prefetch_steps: int = 4

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.chunk_rows < 1 or self.shuffle_window_rows < self.chunk_rows:
            raise ValueError("data.chunk_rows must be >= 1 and data.shuffle_window_rows >= data.chunk_rows")
        if self.loaders_per_worker < 0 or self.loader_num_cpus <= 0 or self.prefetch_steps < 1:
            raise ValueError("data.loaders_per_worker >= 0, data.loader_num_cpus > 0 and data.prefetch_steps >= 1 "
                             "are required")


@dataclass
class MlflowConfig:
    # MLflow tracking URI (http://host:5000, databricks, sqlite:///mlflow.db, file:///dir); "" = no MLflow.
    # Rank 0 logs every step's metrics and, on a new run, the resolved config as params. A rerun of the
    # same run_name (a resume) continues the MLflow run tagged with the run directory's URI.
    tracking_uri: str = ""
    experiment: str = "clip-on-ray"


@dataclass
class WandbConfig:
    # W&B project; "" = no W&B. The run id is derived from the run directory's URI, so a resume continues
    # the same W&B run.
    project: str = ""
    entity: str = ""
    # online needs WANDB_API_KEY on the training nodes; offline writes to `dir` for a later `wandb sync`.
    mode: Literal["online", "offline"] = "online"
    # Where W&B keeps its local files ("" = W&B's default, ./wandb in the worker's working directory).
    dir: str = ""


@dataclass
class MetricsConfig:
    # TensorBoard events under <run>/tensorboard (also on S3: copied there as the run goes).
    tensorboard: bool = True
    # Copy TensorBoard events and metrics.jsonl to the run directory every N steps as well as at every
    # checkpoint and at the end (0 = at checkpoints and the end only). Local run directories get events
    # as they are written; this matters for s3:// runs.
    upload_every: int = 0
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.upload_every < 0:
            raise ValueError(f"metrics.upload_every must be >= 0, got {self.upload_every}")
        if self.wandb.mode not in ("online", "offline"):
            raise ValueError(f"metrics.wandb.mode must be online or offline, got {self.wandb.mode!r}")


@dataclass
class TrainConfig:
    # A named architecture from clip_model.config (e.g. "ViT-B/32", "tiny-vit").
    model: str = "tiny-vit"
    # "clip" = the paper's softmax loss; "siglip" needs a model built with a logit bias (set automatically).
    loss: Literal["clip", "siglip"] = "clip"
    # Samples per optimizer step over all workers = negatives per sample; see the module docstring.
    global_batch_size: int = 256
    epochs: int = 1
    # Stop after this many optimizer steps (overrides epochs when set).
    max_steps: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    # DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
    zero_stage: Literal[1, 2, 3] = 2
    # auto = bf16 with CUDA, fp32 on CPU (gloo and CPU kernels gain nothing from bf16 here).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_checkpointing: bool = False
    # FLIP: fraction of image patches dropped in training (ViT only).
    patch_dropout: float = 0.0
    # Micro-batches per optimizer step with feature caching: every accumulated sample stays a
    # negative of every other (OpenCLIP's accum-freq), so the contrastive batch is never smaller.
    accum_freq: int = 1
    # Save every N optimizer steps (and always at the end); the newest keep_checkpoints complete ones are
    # kept (older ones are deleted only after a newer one is committed).
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Run output root (local directory or s3://bucket/prefix): checkpoints, TensorBoard, export.
    storage_path: str = "runs"
    # Run name under storage_path; rerunning with the same name resumes from its newest complete checkpoint.
    run_name: str = "clip-train"
    # Connection settings when storage_path is on S3.
    s3: S3Options = field(default_factory=S3Options)
    # A worker count, or [min, max] for an elastic run (Ray Train V2 resizes between them).
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    # Logical CPUs each training worker holds for the whole run: leave CPUs for the input loaders.
    cpus_per_worker: float = 1.0
    # Custom resources each training worker also asks for, e.g. {train_node: 1} to keep training on the node
    # group that advertises it (see cluster/README.md).
    worker_resources: dict[str, float] = field(default_factory=dict)
    # Elastic runs: how often Ray Train checks whether more workers fit (and restarts the group larger from
    # the newest complete checkpoint). Losing a worker restarts the group at once, whatever this is.
    resize_check_s: float = 60.0
    # Worker-group restarts (from the newest complete checkpoint) before the run fails.
    max_failures: int = 0
    seed: int = 0
    # Print a progress line every N steps (rank 0).
    log_every: int = 1
    # Where the per-step metrics go besides metrics.jsonl: TensorBoard, MLflow, W&B (rank 0 only).
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.epochs < 1:
            raise ValueError("global_batch_size and epochs must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.accum_freq < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("accum_freq, checkpoint_every, keep_checkpoints and log_every must be >= 1")
        if self.resize_check_s <= 0 or any(v <= 0 for v in self.worker_resources.values()):
            raise ValueError("resize_check_s and worker_resources amounts must be > 0")
        if self.cpus_per_worker <= 0 or self.max_failures < -1:
            raise ValueError("cpus_per_worker must be > 0 and max_failures >= -1 (-1 = unlimited)")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        for n in self.worker_counts():
            per, rem = divmod(self.global_batch_size, n)
            if rem:
                raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by {n} workers "
                                 "(the global batch is kept on resize, so every allowed worker count must divide it)")
            if per % self.accum_freq:
                raise ValueError(f"per-worker batch {per} (at {n} workers) is not divisible by accum_freq {self.accum_freq}")

    def worker_counts(self) -> range:
        if isinstance(self.num_workers, int):
            lo = hi = self.num_workers
        elif len(self.num_workers) == 2:
            lo, hi = self.num_workers
        else:
            raise ValueError(f"num_workers must be an int or [min, max], got {self.num_workers!r}")
        if not 1 <= lo <= hi:
            raise ValueError(f"num_workers must satisfy 1 <= min <= max, got {self.num_workers!r}")
        return range(lo, hi + 1)

    def per_worker_batch(self, world_size: int) -> int:
        if self.global_batch_size % world_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by world size {world_size}")
        return self.global_batch_size // world_size

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def model_config(self):
        from clip_model import get_config

        overrides: dict[str, Any] = {"grad_checkpointing": self.grad_checkpointing}
        if self.loss == "siglip":
            overrides["init_logit_bias"] = -10.0  # SigLIP's init (Zhai et al., 2023)
        cfg = get_config(self.model, **overrides)
        if self.patch_dropout:
            if not cfg.vision.is_vit:
                raise ValueError(f"patch_dropout needs a ViT image tower; {self.model} is a ResNet")
            cfg.vision = dataclasses.replace(cfg.vision, patch_dropout=self.patch_dropout)
        return cfg


def run_dir(cfg: TrainConfig) -> Storage:
    """The run's output directory (checkpoints are Ray's, under the same prefix)."""
    return Storage.from_uri(cfg.storage_path.rstrip("/") + "/" + cfg.run_name, cfg.s3)
