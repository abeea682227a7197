"""Semantic dedup (SemDeDup, Abbas et al. 2023, as in NVIDIA NeMo Curator): CLIP image embeddings,
k-means, and within each cluster the pairs at cosine >= threshold; one row kept per linked group.

    survivors of exact/near dedup ──ImageEmbedder (actors, pipelines.core.embedding)──> key, file_idx, area, embedding
        ├─ hash sample (<= sample_rows, sorted by key) ──KMeans (driver, seeded)──> centroids
        └─ _tag: nearest centroid; best eval-image cosine ──> eval_semantic_dup drops
             └─ groupby(cluster): all pairs >= threshold, components, keep one ──> semantic_dup drops

What scales and what does not: embedding is data-parallel (an actor pool); k-means fits on a bounded
hash sample on the driver (sample_rows x dim floats); assignment is a map. Within a cluster every pair is
compared: O(m^2 * dim) time for a cluster of m rows (memory is bounded by comparing `_BLOCK` rows at a
time), so the default sqrt(n) clusters cost ~n^1.5 overall and one huge cluster costs m^2; the usual fix
is more clusters or splitting oversized ones (the manifest records the largest cluster, to see it).
Edges never cross clusters, so components are found inside each group (no global graph rounds): a pair
split by a cluster boundary is missed, the known approximation of SemDeDup. Eval embeddings are held
whole by every task (fine for eval sets of ~100k images).

Deterministic: the sample is a hash of the key, rows are sorted by key before the fit and by the
representative rule inside a cluster, and every choice is a minimum. (Float sums inside the model may
differ in the last bit with the batch a row is embedded in; only a pair within ~1e-6 of the threshold
could notice.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

_BLOCK = 1024  # rows compared at once within a cluster: memory _BLOCK x m floats
_SUMMARY = ""  # reason of the one summary row per cluster (rows, edges); never a drop


@dataclass
class SemanticConfig:
    # A CLIP checkpoint whose image tower embeds the rows (any format evaluate loads: our export, OpenAI
    # layout, open_clip, HF; local or s3://, read with the stage's input_s3). None = semantic dedup off.
    checkpoint: str | None = None
    # quick_gelu or gelu, for checkpoints that do not record their activation (as evaluate's key).
    activation: str | None = None
    # Two images are semantic duplicates at cosine >= this; an eval image that close to a training row
    # rejects the row (eval_semantic_dup). Measured in tests/test_dedup_core.py on a random tiny ViT:
    # crops/recolours/re-encodes >= 0.998, distinct scenes <= 0.997; a trained CLIP spreads them far more
    # (SemDeDup keeps ~0.9-0.95 on LAION with ViT-B/16).
    threshold: float = 0.95
    # k-means clusters; None = ceil(sqrt(rows embedded)), capped at one per 10 sampled rows.
    clusters: int | None = None
    # k-means fits on at most this many rows (a deterministic hash sample of the keys).
    sample_rows: int = 100_000
    kmeans_iter: int = 100  # Lloyd iterations at most (one seeded init; seed below)
    seed: int = 0
    actors: int = 2  # embedding actors, each loads the checkpoint once
    batch_size: int = 64  # images per forward pass

    def __post_init__(self) -> None:
        if self.activation not in (None, "quick_gelu", "gelu"):
            raise ValueError(f"dedup semantic.activation must be quick_gelu, gelu or null, got {self.activation!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup semantic.threshold must be a cosine in (-1, 1], got {self.threshold!r}")
        for name, lo in (("sample_rows", 1), ("kmeans_iter", 1), ("actors", 1), ("batch_size", 1)):
            _check_int(name, getattr(self, name), lo)
        if self.clusters is not None:
            _check_int("clusters", self.clusters, 1)

    @property
    def enabled(self) -> bool:
        return bool(self.checkpoint)


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"dedup semantic.{name} must be an int >= {lo}, got {value!r}")


# ---------------------------------------------------------------- pure pieces (no Ray)

def in_sample(keys: Any, fraction: float) -> np.ndarray:
    """Rows whose key hashes into the lowest `fraction` of 64-bit space: the same keys on every run."""
    if fraction >= 1.0:
        return np.ones(len(keys), bool)
    cut = int(fraction * 2 ** 64)
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") < cut for k in keys], dtype=bool)


def n_clusters(rows: int, sampled: int, cfg: SemanticConfig) -> int:
    want = cfg.clusters or max(1, min(math.ceil(math.sqrt(rows)), sampled // 10))
    return max(1, min(want, sampled))


def fit_centroids(sample: np.ndarray, k: int, cfg: SemanticConfig) -> np.ndarray:
    """k x D centroids of the sample (rows in a fixed order: sorted by key)."""
    from sklearn.cluster import KMeans

    if k >= len(sample):
        return sample.astype(np.float32)
    km = KMeans(n_clusters=k, n_init=1, max_iter=cfg.kmeans_iter, random_state=cfg.seed).fit(sample)
    return km.cluster_centers_.astype(np.float32)


def nearest_centroid(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    # argmin |x - c|^2 = argmin |c|^2 - 2 x.c (the k-means metric); ties -> the lower index
    return np.argmin((centroids ** 2).sum(1)[None, :] - 2.0 * emb @ centroids.T, axis=1).astype(np.int64)


def best_eval_match(emb: np.ndarray, eval_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the closest eval image, its cosine) per row; ties -> the lower index."""
    if len(eval_emb) == 0:
        return np.zeros(len(emb), np.int64), np.full(len(emb), -np.inf, np.float32)
    best, cos = np.zeros(len(emb), np.int64), np.zeros(len(emb), np.float32)
    for i in range(0, len(emb), _BLOCK):
        sims = emb[i:i + _BLOCK] @ eval_emb.T  # b, m
        best[i:i + _BLOCK] = sims.argmax(1)
        cos[i:i + _BLOCK] = sims.max(1)
    return best, cos


def cluster_duplicates(keys: list[str], area: np.ndarray, emb: np.ndarray,
                       threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Within one cluster: (dropped row, its representative row, their cosine, edges), row = input index.

    Pairs at cosine >= threshold are linked; each connected component keeps one row by the rule the
    pHash components use (plan._choose_representatives): largest original area, ties -> smallest key."""
    from scipy.sparse import coo_matrix, csgraph

    m = len(keys)
    order = np.lexsort((np.asarray(keys, dtype=object).astype(str), -np.asarray(area, np.int64)))
    x = emb[order]
    src, dst = [], []
    for i in range(0, m, _BLOCK):
        sims = x[i:i + _BLOCK] @ x.T  # b, m
        a, b = np.nonzero(sims >= threshold)
        a = a + i
        keep = a < b  # each pair once, no self-loops
        src.append(a[keep]), dst.append(b[keep])
    src, dst = (np.concatenate(src), np.concatenate(dst)) if m else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(m, m))
    _, comp = csgraph.connected_components(graph, directed=False)
    first = np.full(comp.max() + 1 if m else 0, m, np.int64)
    np.minimum.at(first, comp, np.arange(m))  # sorted by the rule: the smallest position is the representative
    rep = first[comp]
    drop = np.flatnonzero(rep != np.arange(m))
    cos = (x[drop] * x[rep[drop]]).sum(1)
    return order[drop], order[rep[drop]], cos.astype(np.float32), len(src)


# ---------------------------------------------------------------- Ray Data plan

def plan_semantic(emb: Any, cfg: SemanticConfig, eval_emb: np.ndarray | None, eval_labels: list[str],
                  partitions: int, shuffle_strategy: str | None) -> tuple[Any, dict[str, Any]]:
    """emb: a materialized Ray Dataset with key, file_idx, area, embedding (unit rows). Returns the drops
    (key, file_idx, reason, detail; None when there are none) and counts for the manifest."""
    from ray.data.aggregate import Count, Max, Sum

    from pipelines.core.runtime import data_args

    rows = emb.count()
    stats: dict[str, Any] = {"embedded_rows": rows, "eval_images": 0 if eval_emb is None else len(eval_emb),
                             "sampled_rows": 0, "clusters": 0, "largest_cluster": 0, "edges": 0,
                             "semantic_dup": 0, "eval_semantic_dup": 0}
    fraction = min(1.0, cfg.sample_rows / max(rows, 1))
    sample = emb.map_batches(_sample, fn_kwargs={"fraction": fraction}, batch_format="numpy", **data_args())
    batches = [b for b in sample.iter_batches(batch_format="numpy", batch_size=None) if len(b["key"])]
    if not batches:  # nothing embedded
        return None, stats
    keys = np.concatenate([b["key"] for b in batches]).astype(str)
    order = np.argsort(keys, kind="stable")
    vectors = np.concatenate([b["embedding"] for b in batches]).astype(np.float32)[order]
    centroids = fit_centroids(vectors, n_clusters(rows, len(vectors), cfg), cfg)
    stats.update(sampled_rows=len(vectors), clusters=len(centroids))
    tagged = emb.map_batches(_tag, batch_format="numpy", **data_args(),
                             fn_kwargs={"centroids": centroids, "eval_emb": eval_emb, "eval_labels": eval_labels,
                                        "threshold": cfg.threshold}).materialize()
    if shuffle_strategy is not None:
        tagged.context.shuffle_strategy = shuffle_strategy  # this lineage's own context, as plan_dedup does
    eval_drops = tagged.map_batches(_eval_drops, batch_format="pyarrow", **data_args())
    out = (tagged.map_batches(_without_eval_hits, batch_format="pyarrow", **data_args())
           .groupby("cluster", num_partitions=partitions)
           .map_groups(_cluster_group, batch_format="numpy", fn_kwargs={"threshold": cfg.threshold}, **data_args())
           .materialize())
    summary = out.map_batches(_summary_only, batch_format="pyarrow", **data_args())
    if summary.count():
        agg = summary.aggregate(Max("rows"), Sum("edges"))
        stats.update(largest_cluster=int(agg["max(rows)"]), edges=int(agg["sum(edges)"]))
    drops = out.map_batches(_drops_only, batch_format="pyarrow", **data_args()).union(eval_drops).materialize()
    if drops.count() == 0:
        return None, stats
    for row in drops.groupby("reason").aggregate(Count()).take_all():  # two rows at most
        stats[row["reason"]] = int(row["count()"])
    return drops, stats


DROPS_SCHEMA = pa.schema([("key", pa.string()), ("file_idx", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])


def _sample(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    keep = in_sample(batch["key"], fraction)
    return {"key": batch["key"][keep], "embedding": batch["embedding"][keep]}


def _tag(batch: dict[str, np.ndarray], centroids: np.ndarray, eval_emb: np.ndarray | None, eval_labels: list[str],
         threshold: float) -> dict[str, np.ndarray]:
    x = np.asarray(batch["embedding"], np.float32)  # B, D
    out = {k: batch[k] for k in ("key", "file_idx", "area", "embedding")}
    out["cluster"] = nearest_centroid(x, centroids)
    hit = [""] * len(x)
    if eval_emb is not None and len(eval_emb):
        best, cos = best_eval_match(x, eval_emb)
        hit = [f"{eval_labels[b]} cos={c:.4f}" if c >= threshold else "" for b, c in zip(best, cos)]
    out["eval_hit"] = np.array(hit, dtype=object)
    return out


def _eval_drops(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    hit = batch.filter(pc.not_equal(batch.column("eval_hit"), ""))
    return pa.table({"key": hit.column("key"), "file_idx": hit.column("file_idx"),
                     "reason": pa.array(["eval_semantic_dup"] * hit.num_rows, pa.string()),
                     "detail": hit.column("eval_hit")}, schema=DROPS_SCHEMA)


def _without_eval_hits(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("eval_hit"), "")).drop_columns(["eval_hit"])


def _cluster_group(group: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """Drops of one cluster, plus one summary row (reason "", rows, edges) for the manifest."""
    keys = [str(k) for k in group["key"]]
    drop, rep, cos, edges = cluster_duplicates(keys, group["area"], np.asarray(group["embedding"], np.float32),
                                               threshold)
    n = len(drop)
    return {"key": np.array([keys[i] for i in drop] + [""], dtype=object),
            "file_idx": np.r_[np.asarray(group["file_idx"], np.int64)[drop], -1],
            "reason": np.array(["semantic_dup"] * n + [_SUMMARY], dtype=object),
            "detail": np.array([f"{keys[r]} cos={c:.4f}" for r, c in zip(rep, cos)] + [""], dtype=object),
            "rows": np.r_[np.zeros(n, np.int64), len(keys)], "edges": np.r_[np.zeros(n, np.int64), edges]}


def _summary_only(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("reason"), _SUMMARY)).select(["rows", "edges"])


def _drops_only(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    kept = batch.filter(pc.not_equal(batch.column("reason"), _SUMMARY))
    return kept.select(["key", "file_idx", "reason", "detail"]).cast(DROPS_SCHEMA)
