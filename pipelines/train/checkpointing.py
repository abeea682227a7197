"""Checkpoints of a DeepSpeed ZeRO run, saved and restored through Ray Train.

Layout of one checkpoint directory (Ray's `checkpoint_%08d` under the run directory):

    ds/...               DeepSpeed save_checkpoint output: every rank writes its own ZeRO shards
    rng/rank_<r>.pt      python, numpy and torch RNG states of rank r
    train_state.json     step, data position, world size, ZeRO stage, loss history, config (rank 0)
    _COMPLETE.json       the commit marker, written by rank 0 LAST

What must stay true: a checkpoint is used only if it has the marker, and rank 0 writes the
marker only after every rank's `ray.train.report` (which uploads its files synchronously) has
returned and a barrier has passed. A checkpoint cut off while being written therefore has no
marker and is skipped in favour of the newest complete one.

Elastic resume: a plain ZeRO checkpoint is tied to the data-parallel world size. When the saved
world size differs, each rank converts the checkpoint with DeepSpeed's `ds_to_universal` into a
private directory and loads it with `checkpoint.load_universal`; weights and Adam moments are
restored exactly (the tests check both), the global batch is kept and the per-worker batch
recomputed (see pipelines.train).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
STATE_FILE = "train_state.json"
MARKER_FILE = "_COMPLETE.json"
# Without this entry ds_to_universal refuses the checkpoint (see ARCHITECTURE.md).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


@dataclass
class TrainState:
    step: int = 0
    # Data position: samples consumed over all workers; epoch and in-epoch offset derive from it.
    samples_seen: int = 0
    world_size: int = 1
    zero_stage: int = 2
    global_batch_size: int = 0
    # One dict per step (loss, logit scale, lr, ...), so a resumed run reports its whole history.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Steps at which this run was resumed, and from which world size.
    resumes: list[dict[str, int]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


# -- saving ------------------------------------------------------------------------------------
def save_local(engine, state: TrainState, directory: str, rank: int) -> None:
    """Every rank calls this (ZeRO shards are per rank) into its own local directory."""
    engine.save_checkpoint(directory, tag=DS_TAG, client_state=dict(UNIVERSAL_INFO))
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(directory, "rng", f"rank_{rank}.pt"))
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(state), f)
    else:
        # Only rank 0's `latest` file may reach storage: all ranks upload into one directory.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, "latest"))


def report_and_commit(metrics: dict[str, Any], directory: str, step: int, rank: int) -> None:
    """Upload this rank's files as part of checkpoint `step`, then (rank 0) write the marker."""
    import ray.train
    import torch.distributed as dist

    name = checkpoint_dir_name(step)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)
    if dist.is_initialized():
        dist.barrier()  # every rank's upload has finished
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        path = storage.build_checkpoint_path_from_name(name) + "/" + MARKER_FILE
        with storage.storage_filesystem.open_output_stream(path) as f:
            f.write(json.dumps({"step": step}).encode())
    if dist.is_initialized():
        dist.barrier()  # nobody starts the next step (which may crash) before the commit


# -- finding and loading -----------------------------------------------------------------------
def is_complete(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path.rstrip('/')}/{MARKER_FILE}").type == pafs.FileType.File


def newest_complete(fs: pafs.FileSystem, run_path: str) -> str | None:
    """The newest committed checkpoint directory under a run directory, by step."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    candidates = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                         and os.path.basename(i.path).startswith("checkpoint_")), reverse=True)
    return next((p for p in candidates if is_complete(fs, p)), None)


def resume_checkpoint():
    """Ray's latest reported checkpoint if it was committed, else the newest committed one beside it."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None or is_complete(ckpt.filesystem, ckpt.path):
        return ckpt
    found = newest_complete(ckpt.filesystem, os.path.dirname(ckpt.path.rstrip("/")))
    return ray.train.Checkpoint(path=found, filesystem=ckpt.filesystem) if found else None


def read_state(directory: str) -> TrainState:
    with open(os.path.join(directory, STATE_FILE)) as f:
        return TrainState(**json.load(f))


@contextlib.contextmanager
def load_dir(directory: str, universal: bool) -> Iterator[tuple[str, str]]:
    """(load_dir, tag) for engine.load_checkpoint, converted to a universal checkpoint if asked.

    Each rank converts into its own temporary directory: the checkpoint directory may be the
    shared storage itself (local storage_path) and must never be modified by a reader.
    """
    if not universal:
        yield directory, DS_TAG
        return
    tmp = tempfile.mkdtemp(prefix="ds_universal_")
    try:
        to_universal(os.path.join(directory, DS_TAG), os.path.join(tmp, UNIVERSAL_TAG))
        yield tmp, UNIVERSAL_TAG
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's own converter, called in-process (its CLI is a thin argparse wrapper)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        ds_to_universal.main(args)


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(directory: str, rank: int) -> bool:
    """Restore this rank's RNG streams; False if the checkpoint has none for it (world grew)."""
    path = os.path.join(directory, "rng", f"rank_{rank}.pt")
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    return True
