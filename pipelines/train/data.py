"""Training input with Ray Data: the shards a manifest commits -> decode + augment + tokenise in a
streaming map stage on CPU actors -> each Ray Train worker's `get_dataset_shard("train")`.

The map stage turns rows into fixed-shape numpy columns (`image` float32 B,3,S,S; `tokens` int64
B,ctx) so that `iter_torch_batches` hands the loop ready tensors and the loop never decodes.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clip_model.config import ClipConfig
from clip_model.transforms import TrainTransform
from pipelines.core.manifest import read_committed
from pipelines.core.storage import Storage

# The only columns the trainer needs; the rest of SAMPLE_SCHEMA is never read from the shards.
READ_COLUMNS = ["key", "image", "caption"]


@functools.cache
def load_tokenizer():
    """One tokenizer per process. Ray Data re-creates a stage's actors on every epoch (each epoch
    re-executes the plan), so the map stage runs as tasks in Ray's reused worker processes and this
    cache makes the BPE load (seconds) happen once per process, not once per epoch or batch."""
    import os
    import time

    from clip_model.tokenizer import ClipTokenizer

    start = time.perf_counter()
    tok = ClipTokenizer.from_openai_bpe()
    print(f"[train_data] tokenizer loaded in process {os.getpid()} in {time.perf_counter() - start:.1f} s", flush=True)
    return tok


def committed_files(manifest_uri: str, s3=None) -> tuple[Storage, list[str], int]:
    """(storage, files, rows) of the shard stage's committed output."""
    storage, manifest = read_committed(manifest_uri, s3, "data.manifest (the shard stage's output)", producer="shard")
    if not manifest.files:
        raise ValueError(f"data.manifest {manifest_uri!r} lists no files")
    return storage, manifest.file_paths(), sum(f.rows for f in manifest.files)


def prepare_rows(images: Sequence[bytes], captions: Sequence[str], transform: Callable, tokenizer,
                 context_length: int) -> dict[str, np.ndarray]:
    """Encoded images + captions -> the training columns (also the single-process reference path)."""
    pixels = np.stack([transform(bytes(b)).numpy() for b in images])  # B, 3, S, S
    tokens = tokenizer([str(c) for c in captions], context_length=context_length).numpy()  # B, ctx
    return {"image": pixels.astype(np.float32, copy=False), "tokens": tokens.astype(np.int64, copy=False)}


def prepare_batch(batch: dict[str, Any], image_size: int, context_length: int,
                  crop_scale: tuple[float, float]) -> dict[str, np.ndarray]:
    # A fresh random stream per batch: augmentation differs between epochs. With crop_scale (1, 1)
    # on square images the crop is the whole image, so the output is deterministic.
    transform = TrainTransform(image_size, scale=tuple(crop_scale), seed=random.SystemRandom().randrange(2**32))
    return prepare_rows(batch["image"], batch["caption"], transform, load_tokenizer(), context_length)


def build_train_dataset(data_cfg, model_cfg: ClipConfig):
    """The lazy dataset TorchTrainer splits across workers; nothing runs until workers iterate."""
    import ray.data

    storage, files, _ = committed_files(data_cfg.manifest, data_cfg.s3)
    ds = ray.data.read_parquet(**storage.ray_read_args(files)).select_columns(READ_COLUMNS)
    if data_cfg.cache_encoded:
        ds = ds.materialize()
    if data_cfg.shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=data_cfg.shuffle_seed)
    return ds.map_batches(
        prepare_batch,
        fn_kwargs={"image_size": model_cfg.vision.image_size, "context_length": model_cfg.text.context_length,
                   "crop_scale": tuple(data_cfg.crop_scale)},
        batch_size=data_cfg.map_batch_size,
        batch_format="numpy",
        concurrency=data_cfg.map_concurrency,
        num_cpus=data_cfg.map_num_cpus,
    )


def steps_per_epoch(rows: int, world_size: int, per_worker_batch: int) -> int:
    """Steps every worker can take in one epoch: the split is equal and each worker drops its last
    partial batch, so all workers agree and no collective ever waits for a missing batch."""
    steps = (rows // world_size) // per_worker_batch
    if steps < 1:
        raise ValueError(f"the dataset has {rows} rows: too few for one step of {per_worker_batch} rows on each of "
                         f"{world_size} workers (lower global_batch_size or add data)")
    return steps
