"""Checkpoints of a DeepSpeed ZeRO run: written by every rank straight to the run directory, committed by
a marker, pruned only after the commit, and loaded without running any code from storage.

Layout of one checkpoint directory under the run directory (`<storage_path>/<run_name>/checkpoint_%08d`):

    ds/...               DeepSpeed save_checkpoint output: every rank writes its own ZeRO shards
    rng/rank_<r>.json    python, numpy and torch RNG states of rank r (plain JSON)
    train_state.json     step, data position, world size, ZeRO stage, loss history, config (rank 0)
    _COMPLETE.json       the commit marker, written by rank 0 LAST

What must stay true:
- A checkpoint is used only if it has the marker, and rank 0 writes the marker only after every rank's
  upload has finished (a barrier). A checkpoint cut off while being written has no marker and is
  skipped in favour of the newest complete one.
- Old checkpoints are deleted only after the new marker exists, so at every moment at least one
  complete checkpoint exists once the first has been committed, whatever keep_checkpoints is. (Ray's
  CheckpointConfig(num_to_keep) deletes when the new checkpoint is reported, before our marker: with
  num_to_keep=1 a crash in between left none. So Ray's checkpoint manager is not used: ray.train.report
  carries metrics only, and resume looks here, not at ray.train.get_checkpoint.)
- Nothing read back from storage is unpickled with arbitrary globals: DeepSpeed's files load under
  `safe_torch_load()` (torch's weights_only unpickler, which DeepSpeed's explicit weights_only=False
  cannot override, plus an allowlist of the few DeepSpeed/torch classes its files hold); RNG states and
  train state are JSON.

Elastic resume: a plain ZeRO checkpoint is tied to the data-parallel world size. When the saved world
size differs, each rank converts the checkpoint with DeepSpeed's `ds_to_universal` into a private
directory and loads it with `checkpoint.load_universal`; weights and Adam moments are restored exactly
(the tests check both), the global batch is kept and the per-worker batch recomputed.
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

from pipelines.core.storage import Storage
from pipelines.train.ds_import import import_deepspeed

DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
STATE_FILE = "train_state.json"
MARKER_FILE = "_COMPLETE.json"
PREFIX = "checkpoint_"
# Without this entry ds_to_universal refuses the checkpoint (see ARCHITECTURE.md).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


@dataclass
class TrainState:
    step: int = 0
    # Data position: samples consumed over all workers; with the plan (data.SamplePlan) the step alone
    # says which samples come next.
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
    return f"{PREFIX}{step:08d}"


def _step_of(name: str) -> int | None:
    tail = name.rstrip("/").rsplit("/", 1)[-1]
    return int(tail[len(PREFIX):]) if tail.startswith(PREFIX) and tail[len(PREFIX):].isdigit() else None


# -- safe loading ------------------------------------------------------------------------------
def _allowed_globals() -> list:
    """Classes DeepSpeed 0.19.8's ZeRO-1/2/3 and universal checkpoints pickle besides tensors and containers
    (found by loading them under the weights_only unpickler). Each is a plain data holder: allowing it
    lets the unpickler build it, nothing else."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address, argparse.Namespace]


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's included, which pass weights_only=False) uses torch's
    weights_only unpickler: tensors, containers, primitives and the allowlist, never arbitrary globals.
    TORCH_FORCE_WEIGHTS_ONLY_LOAD is read by torch.load at each call and wins over the argument."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


# -- saving ------------------------------------------------------------------------------------
def save_local(engine, state: TrainState, directory: str, rank: int) -> None:
    """Every rank calls this (ZeRO shards are per rank) into its own local directory."""
    engine.save_checkpoint(directory, tag=DS_TAG, client_state=dict(UNIVERSAL_INFO))
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    with open(os.path.join(directory, "rng", f"rank_{rank}.json"), "w") as f:
        json.dump(rng_state(), f)
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(state), f)
    else:
        # Only rank 0's `latest` file may reach storage: all ranks upload into one directory.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, "latest"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save(engine, state: TrainState, storage: Storage, rank: int, keep: int, before_commit=None) -> str:
    """Write checkpoint `state.step` from every rank, commit it, then prune. Returns its directory name.
    A collective: every rank calls it. `before_commit` is the tests' hook into the window between
    upload and marker."""
    name = checkpoint_dir_name(state.step)
    if rank == 0 and storage.list(name):
        # Left by a run that crashed before committing this step (we resumed from an older one):
        # its files, perhaps from another world size, must not mix with ours.
        storage.delete_prefix(name)
    _barrier()
    local = tempfile.mkdtemp(prefix=f"ckpt_rank{rank}_")
    try:
        save_local(engine, state, local, rank)
        storage.fs.create_dir(storage.fs_path(name), recursive=True)
        pafs.copy_files(local, storage.fs_path(name), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=storage.fs)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    _barrier()  # every rank's files are in storage
    if before_commit is not None:
        before_commit(state.step, rank)
    if rank == 0:
        storage.write_bytes(f"{name}/{MARKER_FILE}", json.dumps({"step": state.step}).encode())
        prune(storage, keep)
    _barrier()  # nobody starts the next step (which may crash) before the commit
    return name


def prune(storage: Storage, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest
    complete one (crashed writes). Called only right after a commit. Returns what it deleted."""
    names = checkpoint_names(storage)
    complete = [n for n in names if storage.exists(f"{n}/{MARKER_FILE}")]
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = _step_of(complete[-1])
    doomed = [n for n in names if n not in kept and (n in complete or _step_of(n) < newest)]
    for n in doomed:
        storage.delete_prefix(n)
    return doomed


# -- finding and loading -----------------------------------------------------------------------
def checkpoint_names(storage: Storage) -> list[str]:
    """Checkpoint directory names under the run directory that hold files, oldest first (an object store
    may keep a deleted directory's empty entry: SeaweedFS does)."""
    names = {p.split("/", 1)[0] for p in storage.list("", recursive=True) if "/" in p}
    return sorted((n for n in names if _step_of(n) is not None), key=_step_of)


def newest_complete(storage: Storage) -> str | None:
    """The newest committed checkpoint directory name, by step."""
    return next((n for n in reversed(checkpoint_names(storage)) if storage.exists(f"{n}/{MARKER_FILE}")), None)


@contextlib.contextmanager
def local_copy(storage: Storage, name: str) -> Iterator[str]:
    """A local directory holding checkpoint `name`: the directory itself on local storage (read only),
    a private download otherwise."""
    if isinstance(storage.fs, pafs.LocalFileSystem):
        yield storage.fs_path(name)
        return
    tmp = tempfile.mkdtemp(prefix="ckpt_dl_")
    try:
        pafs.copy_files(storage.fs_path(name), tmp, source_filesystem=storage.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(open(os.devnull, "w")), safe_torch_load():
        ds_to_universal.main(args)


# -- RNG (JSON: nothing to unpickle) -------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def restore_rng(directory: str, rank: int) -> bool:
    """Restore this rank's RNG streams; False if the checkpoint has none for it (world grew)."""
    path = os.path.join(directory, "rng", f"rank_{rank}.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        set_rng_state(json.load(f))
    return True
