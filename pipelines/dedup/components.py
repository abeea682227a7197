"""Connected components of a Ray Dataset of edges, with Ray Data groupby/map_groups rounds only.

Alternating large-star / small-star (Kiveris et al., "Connected Components in MapReduce and Beyond",
SoCC 2014). Every round is two shuffles keyed by a node; at the fixed point the edge set is a star
forest whose centres are the component minima, so each non-minimum node has exactly one edge
(node -> min). Convergence is detected by comparing a (count, checksum) aggregate of the edge set
between rounds: equal multisets in, equal multisets out, so an unchanged aggregate means the
deterministic round function has reached its fixed point (up to a 2**-62 checksum collision).
Nothing is ever collected to the driver except those two numbers per round.

Grouping is by a coarse partition of the node id (`partitions` groups), and each group handles
its many nodes with vectorised NumPy: one map_groups call per node would cost far more in Python
overhead than the work itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from ray.data.aggregate import Count, Sum
from scipy.sparse import coo_matrix, csgraph

from pipelines.dedup.near_dup import partition_of, splitmix64
from pipelines.core.runtime import data_args

EDGE_SCHEMA = pa.schema([("src", pa.int64()), ("dst", pa.int64())])


@dataclass(frozen=True)
class Components:
    # (node, comp) for every node that is not its component's minimum; comp = smallest node id in
    # the component. Component minima and nodes without edges are absent: they label themselves.
    labels: ray.data.Dataset
    rounds: int


def connected_components(edges: ray.data.Dataset, partitions: int = 64, max_rounds: int = 40) -> Components:
    """edges: int64 columns src, dst (undirected; duplicates and self-loops allowed)."""
    if partitions < 1 or max_rounds < 1:
        raise ValueError(f"connected_components needs partitions >= 1 and max_rounds >= 1, "
                         f"got {partitions} and {max_rounds}")
    missing = {"src", "dst"} - set(edges.columns())
    if missing:
        raise ValueError(f"edges dataset lacks columns {sorted(missing)}; it has {edges.columns()}")
    current = edges.map_batches(_orient, batch_format="pyarrow", **data_args()).materialize()
    previous = _fingerprint(current)
    if previous[0] == 0:
        return Components(current.map_batches(_to_labels, batch_format="pyarrow", **data_args()), 0)
    for rounds in range(1, max_rounds + 1):
        current = _small_star(_large_star(current, partitions), partitions).materialize()
        stats = _fingerprint(current)
        if stats == previous:
            labels = current.map_batches(_to_labels, batch_format="pyarrow", **data_args())
            return Components(labels, rounds)
        previous = stats
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds "
                       f"(edge count/checksum still changing: {previous})")


def _orient(batch: pa.Table) -> pa.Table:
    """Contract the block's own edges to stars (node -> smallest node of its local component).

    Components of the union are unchanged, but a chain that sits inside one block arrives as a
    star, which saves the rounds its diameter would otherwise cost.
    """
    a = batch.column("src").to_numpy(zero_copy_only=False).astype(np.int64)
    b = batch.column("dst").to_numpy(zero_copy_only=False).astype(np.int64)
    keep = a != b
    a, b = a[keep], b[keep]
    nodes, inverse = np.unique(np.r_[a, b], return_inverse=True)  # sorted: local index order = id order
    n = len(nodes)
    graph = coo_matrix((np.ones(len(a), np.int8), (inverse[:len(a)], inverse[len(a):])), shape=(n, n))
    _, local = csgraph.connected_components(graph, directed=False)
    smallest = np.full(local.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(smallest, local, np.arange(n))
    centre = nodes[smallest[local]]
    off = centre != nodes
    return _edges(nodes[off], centre[off])


def _edges(hi: np.ndarray, lo: np.ndarray) -> pa.Table:
    with np.errstate(over="ignore"):
        mixed = splitmix64(hi.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ lo.view(np.uint64))
    # 31-bit terms: the Sum aggregate of billions of them still fits an int64 exactly.
    check = (mixed >> np.uint64(33)).astype(np.int64)
    return pa.table({"src": hi, "dst": lo, "check": check})


def _fingerprint(ds: ray.data.Dataset) -> tuple[int, int]:
    out = ds.aggregate(Count(), Sum("check"))
    return int(out["count()"]), int(out["sum(check)"] or 0)


def _keyed(u: np.ndarray, v: np.ndarray, partitions: int) -> pa.Table:
    return pa.table({"part": partition_of(u, partitions), "u": u, "v": v})


def _emit_both_directions(batch: pa.Table, partitions: int) -> pa.Table:
    hi = batch.column("src").to_numpy()
    lo = batch.column("dst").to_numpy()
    return _keyed(np.r_[hi, lo], np.r_[lo, hi], partitions)


def _emit_by_larger(batch: pa.Table, partitions: int) -> pa.Table:
    return _keyed(batch.column("src").to_numpy(), batch.column("dst").to_numpy(), partitions)


def _neighbourhoods(group: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (u, v) sorted by u, and m[u] = min(u, all v of u) broadcast to each row."""
    pairs = np.unique(np.stack([group.column("u").to_numpy(), group.column("v").to_numpy()], axis=1), axis=0)
    u, v = pairs[:, 0], pairs[:, 1]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    low = np.minimum.reduceat(v, starts) if len(u) else v
    sizes = np.diff(np.r_[starts, len(u)])
    return u, v, np.minimum(np.repeat(low, sizes), u)


def _large_star_group(group: pa.Table) -> pa.Table:
    # Connect every strictly larger neighbour of u to the minimum of u's closed neighbourhood.
    u, v, m = _neighbourhoods(group)
    keep = v > u
    return _edges(v[keep], m[keep])


def _small_star_group(group: pa.Table) -> pa.Table:
    # All v here are smaller than u: connect u and its smaller neighbours to the smallest of them.
    u, v, m = _neighbourhoods(group)
    firsts = np.r_[True, u[1:] != u[:-1]] if len(u) else np.zeros(0, bool)
    nodes = np.r_[v, u[firsts]]
    mins = np.r_[m, m[firsts]]
    keep = nodes != mins
    return _edges(nodes[keep], mins[keep])


def _large_star(edges: ray.data.Dataset, partitions: int) -> ray.data.Dataset:
    keyed = edges.map_batches(_emit_both_directions, batch_format="pyarrow", fn_kwargs={"partitions": partitions}, **data_args())
    return keyed.groupby("part", num_partitions=partitions).map_groups(_large_star_group, batch_format="pyarrow", **data_args())


def _small_star(edges: ray.data.Dataset, partitions: int) -> ray.data.Dataset:
    keyed = edges.map_batches(_emit_by_larger, batch_format="pyarrow", fn_kwargs={"partitions": partitions}, **data_args())
    return keyed.groupby("part", num_partitions=partitions).map_groups(_small_star_group, batch_format="pyarrow", **data_args())


def _to_labels(batch: pa.Table) -> pa.Table:
    return pa.table({"node": batch.column("src"), "comp": batch.column("dst")})
