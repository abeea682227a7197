"""The paper's data-overlap analysis (section 5): which eval images lie within a few phash bits of a training row.

The training phashes stream through Ray Data tasks that match them against the small eval index (dedup's exact
pigeonhole lookup); only matched eval indices come back. A module of its own, without torch or scikit-learn:
the workers that run these tasks import it, and the evaluate stage's imports (~3.5 s of CPU) are not theirs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.manifest import Manifest
from pipelines.core.runtime import data_args
from pipelines.core.storage import Storage


def overlap_mask(train: tuple[Storage, Manifest], phashes: np.ndarray, radius: int) -> np.ndarray:
    """True for eval images within `radius` bits of some training row's phash."""
    import ray.data

    from pipelines.dedup.plan import build_eval_index

    st, manifest = train
    mask = np.zeros(len(phashes), dtype=bool)
    if not manifest.files or not len(phashes):
        return mask
    index = build_eval_index({"eval": [int(h) for h in phashes]})
    hits = (ray.data.read_parquet(**st.ray_read_args(manifest.file_paths()), ray_remote_args=data_args()).select_columns(["phash"])
            .map_batches(_drop_null_phash, batch_format="pyarrow", **data_args())
            .map_batches(_match, batch_format="pyarrow", fn_kwargs={"index": index, "radius": radius}, **data_args())
            .map_batches(_hit_images, batch_format="pyarrow", **data_args()))
    for batch in hits.iter_batches(batch_format="numpy", batch_size=None):
        mask[batch["image"]] = True
    return mask


def _match(batch: pa.Table, index: Any, radius: int) -> pa.Table:
    """dedup's EvalMatcher as a plain task: Ray Data reuses warm workers for tasks, while an actor
    pool starts fresh processes; rebuilding the pigeonhole tables of a small eval set per batch is
    cheaper than that start-up."""
    from pipelines.dedup.plan import EvalMatcher

    return EvalMatcher(index, radius)(batch)


def _drop_null_phash(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column("phash").is_valid())


def _hit_images(batch: pa.Table) -> pa.Table:
    """Distinct eval image indices hit in this batch (bounded by the eval set size per batch)."""
    found = {int(label.rpartition("#")[2]) for labels in batch.column("eval_hits").to_pylist() for label in labels}
    return pa.table({"image": pa.array(sorted(found), pa.int64())})
