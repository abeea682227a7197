"""The per-worker training loop: DeepSpeed ZeRO over the process group Ray Train set up.

Every worker computes its own rows of the global similarity matrix over embeddings gathered with
gradient from all workers (clip_model.loss with world_size/rank), so DeepSpeed's gradient
averaging yields exactly the gradient of the loss over the global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip_model import CLIP, build_loss, build_model
from clip_model.model import LOGIT_SCALE_MAX
from clip_model.optim import adamw
from pipelines.core.storage import Storage
from pipelines.train import checkpointing as ckpt_io
from pipelines.train.config import TrainConfig, run_dir
from pipelines.train.data import InputSpec, SamplePlan, StepFeeder, load_tokenizer
from pipelines.train.ds_import import import_deepspeed
from pipelines.train.hooks import TrainHooks
from pipelines.train.tracking import MetricSinks


class ContrastiveModel(nn.Module):
    """CLIP plus its loss in one forward, so ZeRO-3 gathers every parameter the loss touches
    (logit_bias is read outside CLIP.forward) inside the engine's forward hooks."""

    def __init__(self, clip: CLIP, loss: nn.Module, accum_freq: int = 1) -> None:
        super().__init__()
        self.clip = clip
        self.loss = loss
        self.accum_freq = accum_freq
        # DeepSpeed 0.19.8's initial broadcast views every parameter as bytes, which a 0-d tensor
        # (logit_scale, logit_bias) cannot do: train them as shape [1], export in the original shape.
        self.export_shapes = {n: tuple(p.shape) for n, p in clip.named_parameters()}
        for p in clip.parameters():
            if p.dim() == 0:
                p.data = p.data.reshape(1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, cached: tuple[list, list] | None = None,
                index: int = 0, features_only: bool = False):
        img, txt, scale = self.clip(images, tokens)  # B_micro, D each
        if features_only:
            return img, txt
        bias = self.clip.logit_bias
        if cached is not None:
            # Feature caching: the other micro-batches enter as constants, so this backward only
            # reaches micro-batch `index`; summed over all micro-batches it is the full gradient.
            imgs, txts = list(cached[0]), list(cached[1])
            imgs[index], txts[index] = img, txt
            img, txt = torch.cat(imgs), torch.cat(txts)  # B_local, D
            # logit_scale/bias are in every micro-batch's graph: count their gradient once in total.
            scale = _one_share(scale, self.accum_freq)
            bias = _one_share(bias, self.accum_freq) if bias is not None else None
        return self.loss(img, txt, scale, bias), scale.detach()


def _one_share(x: torch.Tensor, parts: int) -> torch.Tensor:
    """Same value as x, 1/parts of its gradient."""
    return x.detach() + (x - x.detach()) / parts


def feature_cached_step(forward, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], backward) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP's accum-freq: all accumulated samples stay negatives of each other.

    Pass 1 embeds every micro-batch without gradient; pass 2 recomputes each micro-batch with
    gradient and the cached features of the others, and back-propagates the full-batch loss.
    Returns (loss, logit scale) of the accumulated batch.
    """
    with torch.no_grad():
        feats = [forward(i, t, features_only=True) for i, t in micro_batches]
    cached = ([f[0] for f in feats], [f[1] for f in feats])
    loss = scale = None
    for j, (images, tokens) in enumerate(micro_batches):
        loss, scale = forward(images, tokens, cached=cached, index=j)
        backward(loss)
    return loss.detach(), scale


def ds_config(cfg: TrainConfig, per_worker: int, universal: bool) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": per_worker // cfg.accum_freq,
        "gradient_accumulation_steps": cfg.accum_freq,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.resolved_precision() == "bf16"},
        "checkpoint": {"load_universal": universal},
        # torch's AdamW (fused kernel) is the client optimizer: ZeRO wraps it, no DeepSpeed op build needed on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if cfg.optim.grad_clip > 0:
        conf["gradient_clipping"] = cfg.optim.grad_clip
    return conf


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building and loading its shared-memory comm op, which training never uses.

    On the CPU accelerator DeepSpeed's comm init JIT-compiles `deepspeed_shm_comm` (35-100 s on a fresh machine)
    and, once built, loads it in every worker (a ninja check under a file lock: 9 s a process, measured on the
    loaded 2-core machine). Only `inference_all_reduce` calls it; training's collectives are torch.distributed's
    (gloo on CPU). DeepSpeed keeps `deepspeed.ops.__compatible_ops__` as one dict so that edits persist, and
    skips an op marked incompatible there. CPU only: the CUDA accelerator has no such op, and reading the dict
    makes DeepSpeed probe every op builder, which it defers because the probe is slow."""
    import_deepspeed().ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: TrainConfig, per_worker: int, total_steps: int, universal: bool, world: int, rank: int):
    deepspeed = import_deepspeed()

    if not cfg.use_gpu:
        skip_shm_comm_op()
    # Ray Train already initialised torch.distributed (gloo on CPU): DeepSpeed wraps that group.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in the test's reference
    clip = build_model(cfg.model_config())
    model = ContrastiveModel(clip, build_loss(cfg.loss, world_size=world, rank=rank), cfg.accum_freq)
    o = cfg.optim
    optimizer = adamw(model, o.lr, o.weight_decay, o.betas, o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(o.warmup_steps, total_steps, o.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, per_worker, universal))
    return engine, scheduler


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier for optimizer step index i (0-based): linear warmup reaching 1 at step
    `warmup`, then cosine to min_ratio at `total`. Unlike DeepSpeed's WarmupCosineLR (whose first
    two steps run at lr 0 here) the very first step already learns."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- full (unpartitioned) state, for export and the elastic tests --------------------------------
def full_fp32_state(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights in OpenAI's key layout. A collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.clip.named_parameters():
        full = safe_get_full_fp32_param(p)
        shape = engine.module.export_shapes[name]
        out[name] = (full if full is not None else p).detach().float().cpu().clone().reshape(shape)
    for name, b in engine.module.clip.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


def full_optimizer_state(engine, key: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    zero12 = engine.optimizer
    if hasattr(zero12, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19.8 (ZeRO-1/2) links the Adam state fragments after the FIRST param group's
        # first step, before the second group has any state: relink now that every group has it.
        zero12._hp_optimizer_states_linked = False
        zero12._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.clip.named_parameters():
        t = safe_get_full_optimizer_state(p, key)
        if t is not None:
            out[name] = t.detach().float().cpu().clone().reshape(engine.module.export_shapes[name])
    return out


def clamp_logit_scale(engine) -> None:
    """The paper's clip at 100, applied to the fp32 master copy (which ZeRO owns and copies into
    the module after each step); CLIP.logit_scale_value also clamps the value used in between."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    p = engine.module.clip.logit_scale
    value = safe_get_full_fp32_param(p)
    if value is not None and float(value.reshape(-1)[0]) > LOGIT_SCALE_MAX:
        safe_set_full_fp32_param(p, torch.full_like(value, LOGIT_SCALE_MAX))


def dump_state(engine, hooks: TrainHooks, name: str, rank: int) -> None:
    if not hooks.debug_dump_dir:
        return
    state = {"params": full_fp32_state(engine), "exp_avg": full_optimizer_state(engine, "exp_avg"),
             "exp_avg_sq": full_optimizer_state(engine, "exp_avg_sq"),
             "lr": [g["lr"] for g in engine.optimizer.param_groups], "global_steps": engine.global_steps}
    if rank == 0:
        os.makedirs(hooks.debug_dump_dir, exist_ok=True)
        path = os.path.join(hooks.debug_dump_dir, f"{name}.pt")
        if os.path.exists(path):  # a step redone after a restart: the previous attempt's state stays beside it
            os.replace(path, os.path.join(hooks.debug_dump_dir, f"{name}.earlier.pt"))
        torch.save(state, path)


# -- the loop -----------------------------------------------------------------------------------
class Progress:
    """Per-step progress lines (rank 0) and the metric sinks (pipelines.train.tracking); all ranks measure."""

    def __init__(self, cfg: TrainConfig, rank: int, total_steps: int, spe: int, sinks: MetricSinks | None) -> None:
        self.cfg, self.rank, self.total, self.spe = cfg, rank, total_steps, spe
        self.start = time.time()
        self.steps_timed = 0
        self.sinks = sinks

    def step(self, step: int, record: dict[str, float], history: list[dict[str, Any]]) -> None:
        self.steps_timed += 1
        if self.rank != 0:
            return
        if self.sinks is not None:
            self.sinks.log(step, record, history)
        if step % self.cfg.log_every == 0 or step == self.total:
            elapsed = time.time() - self.start
            eta = elapsed / self.steps_timed * (self.total - step)
            epoch = (step - 1) // self.spe + 1
            print(f"[train] step {step}/{self.total} epoch {epoch}/{math.ceil(self.total / self.spe)} "
                  f"loss {record['loss']:.4f} logit_scale {record['logit_scale']:.2f} lr {record['lr']:.2e} "
                  f"{record['samples_per_s']:.1f} samples/s data_wait {record['data_wait_ms']:.1f} ms workers {record['world_size']} "
                  f"ETA {eta:.0f} s", flush=True)
        if step % self.spe == 0:
            print(f"[train] epoch {step // self.spe} finished at step {step} ({time.time() - self.start:.1f} s)", flush=True)

    def checkpointed(self, history: list[dict[str, Any]]) -> None:
        if self.sinks is not None:
            self.sinks.flush(history)


def _mean_over_workers(x: torch.Tensor, world: int) -> float:
    x = x.detach().clone().float()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return float(x)


def _maybe_fail(hooks: TrainHooks, step: int, rank: int) -> None:
    if hooks.fail_at_step == step and rank == 1 and not os.path.exists(hooks.fail_marker):
        with open(hooks.fail_marker, "w") as f:
            f.write(str(step))
        print(f"[train] rank 1 exiting hard at step {step} (fail_at_step test hook)", flush=True)
        os._exit(1)


def _before_commit_hook(hooks: TrainHooks):
    """The window between a checkpoint's upload and its marker: rank 0 dies there once (tests only)."""
    if hooks.fail_before_commit_at_step is None:
        return None

    def hook(step: int, rank: int) -> None:
        if step == hooks.fail_before_commit_at_step and rank == 0 and not os.path.exists(hooks.fail_marker):
            with open(hooks.fail_marker, "w") as f:
                f.write(str(step))
            print(f"[train] rank 0 exiting hard before committing checkpoint {step} (test hook)", flush=True)
            os._exit(1)

    return hook


def train_step(engine, cfg: TrainConfig, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.accum_freq == 1:
        loss, scale = engine(images, tokens)
        engine.backward(loss)
        engine.step()
        return loss.detach(), scale
    micro = list(zip(images.chunk(cfg.accum_freq), tokens.chunk(cfg.accum_freq)))

    def backward(loss: torch.Tensor) -> None:
        # Each micro-batch's loss is the whole accumulated batch's loss: no 1/accum scaling.
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()  # DeepSpeed updates only at the accumulation boundary

    return feature_cached_step(engine, micro, backward)


def _resume_point(cfg: TrainConfig, storage: Storage) -> tuple[str | None, ckpt_io.TrainState | None]:
    """The newest complete checkpoint in the run directory `storage`: its name and state (read before the engine
    exists, so the input can start loading the resume step while DeepSpeed initialises)."""
    name = ckpt_io.newest_complete(storage)
    if name is None:
        return None, None
    state = ckpt_io.TrainState(**json.loads(storage.read_bytes(f"{name}/{ckpt_io.STATE_FILE}")))
    if state.global_batch_size != cfg.global_batch_size:
        raise ValueError(f"checkpoint {storage.uri(name)} was trained at global_batch_size {state.global_batch_size}, "
                         f"config says {cfg.global_batch_size}: the global batch is kept across resumes")
    return name, state


def _resume(engine_args: dict[str, Any], cfg: TrainConfig, world: int, rank: int, hooks: TrainHooks,
            storage: Storage, name: str | None, state: ckpt_io.TrainState | None):
    """Build the engine, loading checkpoint `name` (whose state is `state`) if there is one."""
    if name is None or state is None:
        engine, _ = build_engine(cfg, universal=False, world=world, rank=rank, **engine_args)
        return engine, ckpt_io.TrainState(world_size=world, zero_stage=cfg.zero_stage,
                                          global_batch_size=cfg.global_batch_size)
    # A plain ZeRO checkpoint only loads into the same world size and stage (the latter is untested).
    universal = state.world_size != world or state.zero_stage != cfg.zero_stage
    engine, _ = build_engine(cfg, universal=universal, world=world, rank=rank, **engine_args)
    with ckpt_io.local_copy(storage, name) as directory:
        with ckpt_io.load_dir(directory, universal) as (load_dir, tag), ckpt_io.safe_torch_load():
            path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {storage.uri(name)} (tag {tag})")
        if not universal:
            ckpt_io.restore_rng(directory, rank)
    if rank == 0:
        print(f"[train] resumed from {storage.uri(name)} at step {state.step} (saved by {state.world_size} "
              f"workers, now {world}{', universal checkpoint' if universal else ''})", flush=True)
    state.resumes.append({"step": state.step, "from_world_size": state.world_size, "world_size": world})
    state.world_size, state.zero_stage = world, cfg.zero_stage
    dump_state(engine, hooks, f"load_step{state.step}_ws{world}", rank)
    return engine, state


def _save(engine, cfg: TrainConfig, hooks: TrainHooks, storage: Storage, state: ckpt_io.TrainState, rank: int) -> None:
    # Dumped first, so that a rank killed inside save (the commit-window hook) has left its state behind.
    dump_state(engine, hooks, f"save_step{state.step}_ws{state.world_size}", rank)
    ckpt_io.save(engine, state, storage, rank, cfg.keep_checkpoints, before_commit=_before_commit_hook(hooks))


def _feeder(cfg: TrainConfig, files: list[str], plan: SamplePlan, rank: int, world: int, start: int,
            stop: int) -> StepFeeder:
    mcfg = cfg.model_config()
    spec = InputSpec(manifest=cfg.data.manifest, s3=cfg.data.s3, files=tuple(files),
                     image_size=mcfg.vision.image_size, context_length=mcfg.text.context_length,
                     crop_scale=tuple(cfg.data.crop_scale), seed=cfg.seed)
    return StepFeeder(spec, plan, rank, world, start, stop, loaders=cfg.data.loaders_per_worker,
                      cpus=cfg.data.loader_num_cpus, prefetch=cfg.data.prefetch_steps,
                      resources=cfg.ray.data_resources)


def _log_keys(hooks: TrainHooks, step: int, rank: int, keys) -> None:
    if hooks.keys_dir:
        os.makedirs(hooks.keys_dir, exist_ok=True)
        with open(os.path.join(hooks.keys_dir, f"rank{rank}_pid{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "keys": [str(k) for k in keys]}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    cfg: TrainConfig = config["cfg"]
    hooks: TrainHooks = config.get("hooks") or TrainHooks()
    t_start = time.perf_counter()
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    per_worker = cfg.per_worker_batch(world)
    plan = SamplePlan(config["rows_per_file"], cfg.global_batch_size, cfg.seed, cfg.data.chunk_rows,
                      cfg.data.shuffle_window_rows)
    spe = plan.steps_per_epoch
    total = cfg.max_steps or cfg.epochs * spe
    # One run directory for the whole loop: on S3 each opening builds a boto3 client (~0.15 s CPU).
    storage = run_dir(cfg)
    name, saved = _resume_point(cfg, storage)
    # The loaders start (actor start-up, tokenizer) while DeepSpeed builds the engine.
    feeder = _feeder(cfg, config["files"], plan, rank, world, saved.step if saved else 0, total)
    try:
        engine, state = _resume({"per_worker": per_worker, "total_steps": total}, cfg, world, rank, hooks, storage,
                                name, saved)
    except BaseException:
        feeder.close()
        raise
    startup = {"engine_s": time.perf_counter() - t_start}
    state.config = config.get("cfg_dict", {})
    random.seed(cfg.seed + rank + state.step)
    np.random.seed((cfg.seed + rank + state.step) % 2**32)
    state.history = [h for h in state.history if h["step"] <= state.step]
    sinks = MetricSinks(cfg, state.history, state.config, storage) if rank == 0 else None
    progress = Progress(cfg, rank, total, spe, sinks)
    engine.train()
    # One stream from here to the last step, across epochs: nothing restarts at an epoch boundary.
    batches = iter(feeder)
    try:
        while state.step < total:
            _maybe_fail(hooks, state.step + 1, rank)
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            startup.setdefault("first_batch_s", t1 - t_start)
            _log_keys(hooks, state.step + 1, rank, batch["key"])
            # Copies: the arrays are read-only views of Ray's object store.
            images, tokens = torch.from_numpy(batch["image"].copy()), torch.from_numpy(batch["tokens"].copy())
            if cfg.use_gpu:
                import ray.train.torch

                device = ray.train.torch.get_device()
                images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            lr = float(engine.get_lr()[0])  # the rate this step's update uses
            loss, scale = train_step(engine, cfg, images, tokens)
            clamp_logit_scale(engine)
            state.step += 1
            state.samples_seen += cfg.global_batch_size
            dt = time.perf_counter() - t0
            record = {"step": state.step, "loss": _mean_over_workers(loss, world), "logit_scale": float(scale),
                      "lr": lr, "samples_per_s": cfg.global_batch_size / dt, "data_wait_ms": 1000 * (t1 - t0),
                      "load_ms": 1000 * float(batch["load_s"]), "step_s": dt, "world_size": world}
            state.history.append(record)
            progress.step(state.step, record, state.history)
            if hooks.step_delay_s:
                time.sleep(hooks.step_delay_s)
            if hooks.stop_file and _stop_requested(hooks.stop_file, rank, world):
                total = state.step
            if state.step % cfg.checkpoint_every == 0 or state.step == total:
                _save(engine, cfg, hooks, storage, state, rank)
                progress.checkpointed(state.history)
    except BaseException:
        if sinks is not None:
            sinks.abort(state.history)
        raise
    finally:
        feeder.close()
    _finish(engine, cfg, storage, state, rank, sinks, startup)


def _stop_requested(path: str, rank: int, world: int) -> bool:
    """TrainHooks.stop_file: rank 0's look, the same answer on every rank (a collective)."""
    flag = [rank == 0 and os.path.exists(path)]
    if world > 1:
        dist.broadcast_object_list(flag, src=0)
    return bool(flag[0])


def _finish(engine, cfg: TrainConfig, storage: Storage, state: ckpt_io.TrainState, rank: int,
            sinks: MetricSinks | None, startup: dict[str, float]) -> None:
    """Export the fp32 weights in OpenAI's layout + tokenizer + config, and the run summary."""
    from clip_model.export import MODEL_FILE, save_export

    weights = full_fp32_state(engine)  # collective
    if rank != 0:
        return
    local = tempfile.mkdtemp(prefix="export_")
    hashes = {}
    try:
        save_export(engine.module.clip, local, tokenizer=load_tokenizer(), state_dict=weights)
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as f:
                data = f.read()
            hashes[name] = hashlib.sha256(data).hexdigest()
            storage.write_bytes(f"export/{name}", data)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if sinks is not None:
        sinks.close(state.history)  # metrics.jsonl, TensorBoard, MLflow, W&B
    timed = [h for h in state.history[1:]] or state.history
    summary = {
        "steps": state.step, "samples_seen": state.samples_seen, "world_size": state.world_size,
        "zero_stage": cfg.zero_stage, "global_batch_size": cfg.global_batch_size,
        "first_loss": state.history[0]["loss"] if state.history else None,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        # The first step includes DeepSpeed's and Ray Data's warm-up; leave it out of the rates.
        "mean_samples_per_s": cfg.global_batch_size * len(timed) / sum(h["step_s"] for h in timed) if timed else None,
        "mean_data_wait_ms": float(np.mean([h["data_wait_ms"] for h in timed])) if timed else None,
        "p99_data_wait_ms": float(np.percentile([h["data_wait_ms"] for h in timed], 99)) if timed else None,
        "resumes": state.resumes, "export": storage.uri("export"),
        # Seconds from this worker group's start to a ready engine (checkpoint loaded) and to its first batch.
        "startup": {k: round(v, 2) for k, v in startup.items()},
        # Identifies the weights (keys evaluation in pipelines.run) without reading the export back.
        "model_sha256": hashes.get(MODEL_FILE),
        # Metric sinks that failed during the run (training went on without them).
        "metrics_errors": dict(sinks.errors) if sinks is not None else {},
    }
    storage.write_bytes("summary.json", json.dumps(summary, indent=2).encode())
    print(f"[train] done: {json.dumps(summary)}", flush=True)
