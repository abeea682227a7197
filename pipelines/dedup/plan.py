"""The dedup plan as Ray Data transformations: eval decontamination, then one duplicate graph.

    keys ──prepare──> rows ──EvalMatcher (tasks, or actors for a large banded eval index)──> eval_overlap drops
                              └─ clean rows ──emit──> groupby(part): url / sha256 / phash-equal stars,
                                   phash LSH buckets (+ caption MinHash buckets), verified edges
                                   └─ connected components (components.py)
                                        └─ groupby(node): attach comp ── groupby(comp): keep one
                                             representative, drop the rest with a reason

Every shuffle groups by a coarse partition number (`partitions` groups) and each group does its
work vectorised over many keys. Nothing but counts and checksums comes back to the driver.
The output is deterministic: every choice is a minimum over ids/keys, never "the first row seen".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy
from ray.data.aggregate import Count, Sum

from pipelines.dedup import near_dup as nd
from pipelines.dedup.components import connected_components
from pipelines.dedup.semantic import SemanticConfig
from pipelines.core.runtime import data_args

# semantic_dup and eval_semantic_dup come from semantic.plan_semantic, when DedupConfig.semantic is on.
REASONS = ("exact_dup_url", "exact_dup_image", "near_dup_image", "near_dup_caption", "eval_overlap",
           "semantic_dup", "eval_semantic_dup", "semantic_undecodable")
REQUIRED_COLUMNS = ("key", "url", "sha256", "phash", "width", "height", "original_width", "original_height",
                    "file_idx")  # and colour_sig unless DedupConfig.colour_threshold is None
DROPPED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("file_idx", pa.int64()),
    ("reason", pa.string()),  # one of REASONS
    # the kept representative's key, or the eval set name for eval_overlap; the semantic reasons add
    # " cos=0.9876" (semantic_dup: "<representative key> cos=..", eval_semantic_dup: "<set>#<image> cos=..")
    ("detail", pa.string()),
    ("eval_hits", pa.list_(pa.string())),  # eval_overlap only: "set#index" of every eval image matched
])

# Edge kinds: bits, so that a node's kinds can be OR-ed.
K_URL, K_SHA, K_PHASH, K_IMAGE_LSH, K_CAPTION = 1, 2, 4, 8, 16
_IMAGE_KINDS = K_PHASH | K_IMAGE_LSH
_SHUFFLE_SCHEMA = pa.schema([("part", pa.int64()), ("kind", pa.int8()), ("bucket", pa.int64()),
                             ("text", pa.string()), ("id", pa.int64()), ("phash", pa.int64()),
                             ("colour", pa.int64()), ("sig", pa.binary())])
_MEMBER_SCHEMA = pa.schema([("part", pa.int64()), ("tag", pa.int8()), ("node", pa.int64()), ("comp", pa.int64()),
                            ("key", pa.string()), ("url", pa.string()), ("sha256", pa.string()),
                            ("area", pa.int64()), ("file_idx", pa.int64())])
_ROW, _LABEL, _CENTRE, _IMAGE_ENDPOINT = 0, 1, 2, 3


@dataclass
class DedupConfig:
    # Two images are near duplicates when their 64-bit phashes differ in at most this many bits.
    # Measured on our synthetic test images: JPEG re-encode and 2/3 resize stay within 4 bits; ~5%
    # crops spread to 4-14. Unrelated images: 10+ bits; random hashes: P(d <= 8) ~ 3e-10 per pair.
    hamming_threshold: int = 8
    # ... and their colour signatures (core.images.colour_signature: how much of the picture is which hue or
    # grey) differ by at most this many levels in any bin: phash is colour-blind. Measured (issue 14): JPEG
    # re-encode <= 2, 2/3 resize <= 3, the demo's 4%-crop copies <= 2; the demo's shapes of two different
    # palette colours >= 4. On the demo's synthetic set at hamming_threshold 8, phash alone merged 77% of
    # the distinct shapes, with this check 30% (same colour, shape and background, nearly the same place).
    # The same rule applies to eval decontamination. None = phash only (the colour_sig column is not needed).
    colour_threshold: int | None = 3
    # Banded LSH over the phash: `lsh_tables` tables, each keyed by `lsh_bits` bit positions drawn
    # from `seed` (of the 63 non-DC bits). P(pair at distance d is a candidate) =
    # 1 - (1 - C(63-d, k)/C(63, k))**L (near_dup.lsh_recall): 0.966 at d=8, 0.999 at d=6,
    # 0.999999 at d=4 for k=16, L=40; the mean bucket at 1M random hashes is 1M / 2**16 = 15 rows.
    # Shuffle volume is L rows per sample.
    lsh_tables: int = 40
    lsh_bits: int = 16
    seed: int = 0
    # A training row within this many bits of any eval image is dropped first (eval_overlap).
    # The eval lookup is exact (pigeonhole bands), not sampled.
    eval_hamming: int = 8
    # Caption near-dups by MinHash LSH (character `caption_shingle`-grams, lowercased). Off by
    # default: short generic captions ("image", "photo") are shared by unrelated pairs.
    caption_minhash: bool = False
    caption_jaccard: float = 0.8  # estimated Jaccard >= this (verified on the signatures)
    num_perm: int = 128
    caption_shingle: int = 5
    # Buckets with more distinct values than this compare against a bounded sample (see
    # near_dup.bucket_edges), so one pathological bucket cannot go quadratic.
    max_bucket: int = 512
    # Groups per shuffle, at most; each group handles ~rows/partitions keys vectorised. A smaller input uses
    # fewer: one group per `rows_per_partition` input rows (at least one). The plan's result does not depend
    # on either (tests/test_dedup_core.py), only its task count does: a 148-row input split 64 ways ran 64
    # tasks per shuffle round, and its plan took 9-12 s on 2 cores.
    partitions: int = 64
    # Input rows per shuffle group (so groups = rows / this, within [1, partitions]); sets task counts, not
    # results, and is not in the fingerprint. ~2 KB of shuffle rows per input row (40 LSH tables + url,
    # sha256, phash stars), so ~100 MB per group.
    rows_per_partition: int = 50_000
    # Shuffle rows per pass, at most. The image LSH emits lsh_tables rows per input row, and a sort shuffle
    # holds them about three times over (map outputs, shuffled blocks, groups) in the object store or its
    # spill: one pass over 1M rows x 40 tables spilled 5.4 GiB here, and 10M rows filled a 58 GB disk
    # (docs/SCALING.md section 3). Above this many rows the tables are split into passes, each its own
    # shuffle whose edges are kept and whose rows are freed before the next. Sets passes, not results, and
    # is not in the fingerprint. The budget is for the whole cluster: scale it with the nodes' spill disks.
    max_shuffle_rows: int = 50_000_000
    max_rounds: int = 40  # connected-components rounds before giving up
    eval_actors: int = 2  # actors holding the eval index (an index of over EVAL_TASK_HASHES images)
    # Ray Data shuffle strategy for this plan only (set on the plan's own DataContext copy; the
    # caller's context is untouched). Hash shuffle starts aggregator actors per groupby: ~20 s
    # each on a loaded 2-core box vs ~1-2 s for the pull-based sort shuffle. None = leave as is.
    shuffle_strategy: str | None = "sort_shuffle_pull_based"
    # Semantic dedup on CLIP image embeddings of the rows the rules above keep (semantic.py). Off unless
    # semantic.checkpoint is set; it counts in the stage's fingerprint only when on.
    semantic: SemanticConfig = field(default_factory=SemanticConfig)

    def __post_init__(self) -> None:
        _check_range("hamming_threshold", self.hamming_threshold, 0, 32)
        _check_range("eval_hamming", self.eval_hamming, 0, 32)
        if self.colour_threshold is not None:
            _check_range("colour_threshold", self.colour_threshold, 0, 31)
        _check_range("lsh_tables", self.lsh_tables, 1, 1024)
        _check_range("lsh_bits", self.lsh_bits, 1, 48)  # table index is packed above the band bits
        _check_range("num_perm", self.num_perm, 2, 4096)
        _check_range("caption_shingle", self.caption_shingle, 1, 64)
        _check_range("max_bucket", self.max_bucket, 2, 1 << 20)
        _check_range("partitions", self.partitions, 1, 1 << 16)
        _check_range("rows_per_partition", self.rows_per_partition, 1, 1 << 40)
        _check_range("max_shuffle_rows", self.max_shuffle_rows, 1, 1 << 50)
        _check_range("max_rounds", self.max_rounds, 1, 1000)
        _check_range("eval_actors", self.eval_actors, 1, 1024)
        if not 0.0 < self.caption_jaccard <= 1.0:
            raise ValueError(f"dedup caption_jaccard must be in (0, 1], got {self.caption_jaccard}")
        if self.lsh_bits + self.hamming_threshold > nd.PHASH_BITS:
            raise ValueError(f"dedup lsh_bits ({self.lsh_bits}) + hamming_threshold ({self.hamming_threshold}) "
                             "must be <= 64, or no near pair could ever share a bucket")
        if self.shuffle_strategy is not None:
            from ray.data.context import ShuffleStrategy
            allowed = [s.value for s in ShuffleStrategy]
            if self.shuffle_strategy not in allowed:
                raise ValueError(f"dedup shuffle_strategy must be one of {allowed} or null, "
                                 f"got {self.shuffle_strategy!r}")

    def partitions_for(self, rows: int) -> int:
        """Groups per shuffle for an input of `rows` rows: one per rows_per_partition, within [1, partitions]."""
        return max(1, min(self.partitions, -(-rows // self.rows_per_partition)))

    def lsh_passes(self, rows: int) -> list[range]:
        """The LSH tables each shuffle pass emits for an input of `rows` rows: as many tables per pass as
        max_shuffle_rows allows (at least one), so one pass for a small input."""
        per_pass = max(1, min(self.lsh_tables, self.max_shuffle_rows // max(rows, 1)))
        return [range(a, min(a + per_pass, self.lsh_tables)) for a in range(0, self.lsh_tables, per_pass)]

    def pass_partitions(self, rows: int, tables: range, stars: bool) -> int:
        """Groups for one pass's shuffle: partitions_for sizes groups for all lsh_tables + 3 star rows per input
        row, and a pass of fewer tables takes proportionally fewer groups of the same size. A sort shuffle makes
        one object per (input block, group): at 10M rows, 200 groups in each of 8 passes would make 40,000
        objects a pass (38 and 24 groups: 7,600 and 4,800)."""
        share = (len(tables) + (3 if stars else 0)) / (self.lsh_tables + 3)
        return self.partitions_for(math.ceil(rows * share))


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"dedup {name} must be an int in [{lo}, {hi}], got {value!r}")


# ---------------------------------------------------------------- eval index

@dataclass
class EvalIndex:
    names: list[str]  # eval set names, sorted
    hashes: np.ndarray  # (m,) int64 phashes of the distinct (phash, colour signature) pairs over all sets
    colours: np.ndarray  # (m,) int64 colour signatures aligned with hashes (0: unknown, matches any colour)
    owner_offsets: np.ndarray  # CSR: owners of hashes[i] are owner_set/owner_image[off[i]:off[i+1]]
    owner_set: np.ndarray
    owner_image: np.ndarray
    sizes: dict[str, int]  # images per eval set


def build_eval_index(eval_sets: dict[str, list[bytes] | list[int] | list[tuple[int, int]]]) -> EvalIndex:
    """Eval sets as encoded images (hashed here, like the crawl does), as (phash, colour signature) pairs, or
    as bare int64 phashes (colour unknown: such an image is matched on its phash alone)."""
    if not isinstance(eval_sets, dict) or not eval_sets:
        raise ValueError("build_eval_index needs a non-empty dict {eval set name: images or phashes}")
    names = sorted(eval_sets)
    sets, images, hashes = [], [], []
    for s, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"eval set names must be non-empty strings, got {name!r}")
        values = [_eval_hashes(name, i, item) for i, item in enumerate(eval_sets[name])]
        sets += [s] * len(values)
        images += range(len(values))
        hashes += values
    pairs = np.asarray(hashes, dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((np.asarray(images, np.int64), np.asarray(sets, np.int64), pairs[:, 1], pairs[:, 0]))
    uniq, first = np.unique(pairs[order], axis=0, return_index=True)
    return EvalIndex(names, uniq[:, 0].copy(), uniq[:, 1].copy(), np.r_[first, len(order)].astype(np.int64),
                     np.asarray(sets, np.int64)[order], np.asarray(images, np.int64)[order],
                     {n: len(eval_sets[n]) for n in names})


def _eval_hashes(name: str, i: int, item: Any) -> tuple[int, int]:
    if isinstance(item, (bytes, bytearray, memoryview)):
        from pipelines.core.images import hashes_of_encoded

        try:
            return hashes_of_encoded(bytes(item))
        except ValueError as err:
            raise ValueError(f"eval set {name!r} item {i}: {err}") from err
    if _is_int64(item):
        return int(item), 0
    if isinstance(item, tuple) and len(item) == 2 and _is_int64(item[0]) and _is_int64(item[1]):
        return int(item[0]), int(item[1])
    raise ValueError(f"eval set {name!r} item {i}: expected image bytes, an int64 phash or a (phash, colour "
                     f"signature) pair, got {type(item).__name__}")


def _is_int64(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and -(1 << 63) <= int(x) < (1 << 63)


class EvalMatcher:
    """Ray Data callable class: builds the banded eval tables once per actor, tags each row.

    With `colour_threshold`, a row with a `colour_sig` column matches an eval image only when their colour
    signatures are that close too (the near-duplicate rule); unknown colours (0) match on the phash alone."""

    def __init__(self, index: EvalIndex, radius: int, colour_threshold: int | None = None) -> None:
        self.index = index
        self.radius = radius
        self.colour_threshold = colour_threshold
        self.table = nd.HammingIndex(index.hashes, radius)

    def __call__(self, batch: pa.Table) -> pa.Table:
        phash = batch.column("phash").to_numpy()
        q, i, dist = self.table.query(phash, self.radius)
        if self.colour_threshold is not None and "colour_sig" in batch.column_names:
            ok = nd.colour_close(batch.column("colour_sig").to_numpy()[q], self.index.colours[i], self.colour_threshold)
            q, i, dist = q[ok], i[ok], dist[ok]
        ix = self.index
        owners = [np.arange(ix.owner_offsets[k], ix.owner_offsets[k + 1]) for k in i]
        hits: list[list[tuple[int, int, int]]] = [[] for _ in range(len(phash))]
        for row, d, own in zip(q, dist, owners):
            hits[row] += [(int(d), int(ix.owner_set[o]), int(ix.owner_image[o])) for o in own]
        # detail = the set holding the closest eval image (ties: the set name that sorts first)
        best = [ix.names[min(h)[1]] if h else "" for h in hits]
        labels = [sorted(f"{ix.names[s]}#{img}" for _, s, img in h) for h in hits]
        return batch.append_column("eval_set", pa.array(best, pa.string())) \
                    .append_column("eval_hits", pa.array(labels, pa.list_(pa.string())))


def _match_eval(batch: pa.Table, index: EvalIndex, radius: int, colour_threshold: int | None) -> pa.Table:
    """EvalMatcher as a Ray Data task: builds the banded tables for its own block (see EVAL_TASK_HASHES)."""
    return EvalMatcher(index, radius, colour_threshold)(batch)


# An eval index of at most this many distinct images is matched by Ray Data tasks that each build its banded
# tables for their block (100,000 hashes: 0.09 CPU-s here), on task workers that are already running; a larger
# one by a pool of EvalMatcher actors that build them once each. An actor's start cost 2-3 CPU-s on 2 cores.
EVAL_TASK_HASHES = 200_000


# ---------------------------------------------------------------- the plan

def plan_dedup(keys: ray.data.Dataset, cfg: DedupConfig, eval_index: EvalIndex | None = None) -> ray.data.Dataset:
    """One row per dropped sample (DROPPED_SCHEMA). Kept samples are the input minus these keys."""
    missing = [c for c in REQUIRED_COLUMNS if c not in keys.columns()]
    if cfg.caption_minhash and "caption" not in keys.columns():
        missing.append("caption")
    if cfg.colour_threshold is not None and "colour_sig" not in keys.columns():
        missing.append("colour_sig")  # the stage computes it from the image bytes for inputs without it
    if missing:
        raise ValueError(f"plan_dedup: keys dataset lacks columns {missing}; it has {keys.columns()}")
    rows = keys.map_batches(_prepare, batch_format="pyarrow", fn_kwargs={"with_caption": cfg.caption_minhash,
                            "with_colour": cfg.colour_threshold is not None}, **data_args())
    rows = rows.materialize()
    n = rows.count()
    cfg = replace(cfg, partitions=cfg.partitions_for(n))
    if cfg.shuffle_strategy is not None:
        rows.context.shuffle_strategy = cfg.shuffle_strategy  # a copy owned by this plan's lineage
    if eval_index is None:
        return _graph_drops(rows, cfg, n)
    matcher_args = (eval_index, cfg.eval_hamming, cfg.colour_threshold)
    if len(eval_index.hashes) <= EVAL_TASK_HASHES:
        tagged = rows.map_batches(_match_eval, fn_args=matcher_args, batch_format="pyarrow", **data_args())
    else:
        tagged = rows.map_batches(EvalMatcher, fn_constructor_args=matcher_args, batch_format="pyarrow",
                                  compute=ActorPoolStrategy(min_size=1, max_size=cfg.eval_actors), **data_args())
    tagged = tagged.materialize()
    overlap = tagged.map_batches(_eval_drops, batch_format="pyarrow", **data_args())
    clean = tagged.map_batches(_without_eval_hits, batch_format="pyarrow", **data_args())
    return overlap.union(_graph_drops(clean, cfg, n))


def _prepare(batch: pa.Table, with_caption: bool, with_colour: bool) -> pa.Table:
    for name in ("key", "url", "sha256", "phash") + (("colour_sig",) if with_colour else ()):
        if batch.column(name).null_count:
            bad = batch.column("key")[pc.index(pc.is_null(batch.column(name)), True).as_py()]
            raise ValueError(f"plan_dedup: column {name!r} is null (key {bad})")
    keys = batch.column("key").to_pylist()
    ids = np.array([_node_id(k) for k in keys], dtype=np.int64)
    area = pc.multiply(pc.cast(batch.column("original_width"), pa.int64()),
                       pc.cast(batch.column("original_height"), pa.int64()))
    out = {"id": ids, "key": batch.column("key"), "url": batch.column("url"), "sha256": batch.column("sha256"),
           "phash": pc.cast(batch.column("phash"), pa.int64()),
           "colour_sig": pc.cast(batch.column("colour_sig"), pa.int64()) if with_colour else np.zeros(len(ids), np.int64),
           "area": pc.fill_null(area, 0),
           "file_idx": pc.cast(batch.column("file_idx"), pa.int64())}
    if with_caption:
        out["caption"] = pc.fill_null(batch.column("caption"), "")
    return pa.table(out)


def _node_id(key: str) -> int:
    # 64-bit node ids keep the graph numeric; a collision between two real keys would merge them,
    # at odds ~ n^2 / 2^65 (3e-8 at 1M rows).
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def _eval_drops(batch: pa.Table) -> pa.Table:
    hit = batch.filter(pc.not_equal(batch.column("eval_set"), ""))
    return pa.table({"key": hit.column("key"), "file_idx": hit.column("file_idx"),
                     "reason": pa.array(["eval_overlap"] * hit.num_rows, pa.string()),
                     "detail": hit.column("eval_set"), "eval_hits": hit.column("eval_hits")}, schema=DROPPED_SCHEMA)


def _without_eval_hits(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("eval_set"), "")).drop_columns(["eval_set", "eval_hits"])


def _graph_drops(rows: ray.data.Dataset, cfg: DedupConfig, n: int) -> ray.data.Dataset:
    """n: the rows of `rows` (at most; eval drops may have removed some), which sets passes and group counts."""
    # The first pass also carries the url / sha256 / phash stars (and caption buckets). Each pass is
    # materialized before the next starts, so only one pass's shuffle rows are ever held. A pass's shuffle
    # groups only need to agree within the pass: each finds the edges of its own buckets.
    per_pass = []
    for i, tables in enumerate(cfg.lsh_passes(n)):
        groups = cfg.pass_partitions(n, tables, stars=i == 0)
        pass_cfg = replace(cfg, partitions=groups)
        per_pass.append(rows.map_batches(_emit_shuffle_rows, batch_format="pyarrow",
                                         fn_kwargs={"cfg": pass_cfg, "tables": tables, "stars": i == 0}, **data_args())
                        .groupby("part", num_partitions=groups)
                        .map_groups(_edges_in_partition, batch_format="pyarrow", fn_kwargs={"cfg": pass_cfg},
                                    **data_args())
                        .materialize())
    # The same pair can meet in two passes: connected components takes duplicate edges as they are.
    edges = per_pass[0].union(*per_pass[1:]).materialize() if len(per_pass) > 1 else per_pass[0]
    labels = connected_components(edges.select_columns(["src", "dst"]), cfg.partitions, cfg.max_rounds).labels
    parts = [rows.map_batches(_member_rows, batch_format="pyarrow", fn_kwargs={"partitions": cfg.partitions}, **data_args()),
             labels.map_batches(_label_rows, batch_format="pyarrow", fn_kwargs={"partitions": cfg.partitions}, **data_args())]
    if cfg.caption_minhash:  # otherwise every non-exact drop is an image near-dup
        parts.append(edges.map_batches(_image_endpoint_rows, batch_format="pyarrow",
                                       fn_kwargs={"partitions": cfg.partitions}, **data_args()))
    members = (parts[0].union(*parts[1:])
               .groupby("part", num_partitions=cfg.partitions)
               .map_groups(_attach_component, batch_format="pyarrow",
                           fn_kwargs={"partitions": cfg.partitions, "caption": cfg.caption_minhash}, **data_args()))
    return members.groupby("part", num_partitions=cfg.partitions).map_groups(_choose_representatives,
                                                                             batch_format="pyarrow", **data_args())


# ---------------------------------------------------------------- edges

def _emit_shuffle_rows(batch: pa.Table, cfg: DedupConfig, tables: range, stars: bool) -> pa.Table:
    """Shuffle rows of the LSH `tables` (a slice of the lsh_tables), plus with `stars` the url / sha256 /
    phash-equal stars and the caption buckets."""
    n = batch.num_rows
    ids = batch.column("id").to_numpy()
    phash = batch.column("phash").to_numpy()
    colour = batch.column("colour_sig").to_numpy()
    url, sha = batch.column("url"), batch.column("sha256")
    p = cfg.partitions
    out = []
    if stars:
        out += [_shuffle_rows(K_URL, _string_buckets(url), ids, p, text=url),
                _shuffle_rows(K_SHA, _string_buckets(sha), ids, p, text=sha),
                _shuffle_rows(K_PHASH, nd.image_value_keys(phash, colour), ids, p)]  # equal phash and colour
    positions = nd.lsh_positions(cfg.lsh_tables, cfg.lsh_bits, cfg.seed)[tables.start:tables.stop]
    bands = nd.band_keys(phash, positions)  # (n, len(tables))
    table_ids = np.arange(tables.start, tables.stop, dtype=np.int64) << cfg.lsh_bits
    k = len(tables)
    out.append(_shuffle_rows(K_IMAGE_LSH, (bands | table_ids).ravel(), np.repeat(ids, k), p,
                             phash=np.repeat(phash, k), colour=np.repeat(colour, k)))
    if stars and cfg.caption_minhash and n:
        sigs, has_text = nd.caption_signatures(batch.column("caption").to_pylist(), cfg.num_perm, cfg.seed,
                                               cfg.caption_shingle)
        b, r = nd.minhash_bands(cfg.caption_jaccard, cfg.num_perm)
        sigs, cap_ids = sigs[has_text], ids[has_text]
        buckets = nd.signature_band_keys(sigs, b, r)  # (n', b)
        raw = [s.tobytes() for s in sigs]
        out.append(_shuffle_rows(K_CAPTION, buckets.ravel(), np.repeat(cap_ids, b), p,
                                 sig=pa.array([x for x in raw for _ in range(b)], pa.binary())))
    return pa.concat_tables(out).combine_chunks()


def _string_buckets(col: pa.ChunkedArray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little", signed=True) for s in col.to_pylist()], dtype=np.int64)


def _shuffle_rows(kind: int, bucket: np.ndarray, ids: np.ndarray, partitions: int, *, text: Any = None,
                  phash: np.ndarray | None = None, colour: np.ndarray | None = None,
                  sig: pa.Array | None = None) -> pa.Table:
    n = len(ids)
    return pa.table({
        "part": nd.partition_of(np.asarray(bucket, np.int64) ^ kind, partitions),
        "kind": np.full(n, kind, np.int8), "bucket": np.asarray(bucket, np.int64),
        "text": text if text is not None else pa.nulls(n, pa.string()), "id": ids,
        "phash": phash if phash is not None else pa.nulls(n, pa.int64()),
        "colour": colour if colour is not None else pa.nulls(n, pa.int64()),
        "sig": sig if sig is not None else pa.nulls(n, pa.binary())}, schema=_SHUFFLE_SCHEMA)


def _edges_in_partition(group: pa.Table, cfg: DedupConfig) -> pa.Table:
    kind = group.column("kind").to_numpy()
    out = []
    for k in (K_URL, K_SHA):
        sel = group.filter(pa.array(kind == k))
        if sel.num_rows:
            out.append(_equal_text_stars(sel, k))
    for k in (K_PHASH,):
        sel = np.flatnonzero(kind == k)
        if sel.size:
            out.append(_equal_value_stars(group.column("bucket").to_numpy()[sel], group.column("id").to_numpy()[sel], k))
    sel = group.filter(pa.array(kind == K_IMAGE_LSH))
    if sel.num_rows:
        out.append(_lsh_edges(sel, K_IMAGE_LSH, cfg))
    sel = group.filter(pa.array(kind == K_CAPTION))
    if sel.num_rows:
        out.append(_lsh_edges(sel, K_CAPTION, cfg))
    src = np.concatenate([o[0] for o in out]) if out else np.zeros(0, np.int64)
    dst = np.concatenate([o[1] for o in out]) if out else np.zeros(0, np.int64)
    kinds = np.concatenate([o[2] for o in out]) if out else np.zeros(0, np.int8)
    keep = src != dst
    lo, hi, kinds = np.minimum(src, dst)[keep], np.maximum(src, dst)[keep], kinds[keep]
    uniq, first = np.unique(np.stack([lo, hi, kinds.astype(np.int64)], axis=1), axis=0, return_index=True)
    return pa.table({"src": uniq[:, 0], "dst": uniq[:, 1], "kind": uniq[:, 2].astype(np.int8)})


def _equal_value_stars(values: np.ndarray, ids: np.ndarray, kind: int) -> tuple[np.ndarray, ...]:
    order = np.lexsort((ids, values))
    v, i = values[order], ids[order]
    starts, ends = nd.run_bounds(v)
    head = np.repeat(i[starts], ends - starts)
    return head, i, np.full(len(i), kind, np.int8)


def _equal_text_stars(sel: pa.Table, kind: int) -> tuple[np.ndarray, ...]:
    order = pc.sort_indices(sel, sort_keys=[("text", "ascending"), ("id", "ascending")])
    text = sel.column("text").take(order).to_numpy(zero_copy_only=False)
    ids = sel.column("id").take(order).to_numpy()
    starts, ends = nd.run_bounds(text)
    head = np.repeat(ids[starts], ends - starts)
    same = (head == ids) & (np.arange(len(ids)) != np.repeat(starts, ends - starts))
    if kind == K_URL and same.any():
        raise ValueError(f"plan_dedup: two rows share key and url {text[np.argmax(same)]!r}; keys must be unique "
                         "(the crawl drops repeated url+caption as duplicate_input_row)")
    return head, ids, np.full(len(ids), kind, np.int8)


def _lsh_edges(sel: pa.Table, kind: int, cfg: DedupConfig) -> tuple[np.ndarray, ...]:
    buckets, ids = sel.column("bucket").to_numpy(), sel.column("id").to_numpy()
    if kind == K_IMAGE_LSH:
        values = nd.as_uint64(sel.column("phash").to_numpy())
        colour = sel.column("colour").to_numpy()
        keys = nd.image_value_keys(values.view(np.int64), colour)
        t, ct = cfg.hamming_threshold, cfg.colour_threshold

        def similar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            near = nd.hamming(values[a], values[b]) <= t
            return near if ct is None else near & nd.colour_close(colour[a], colour[b], ct)
    else:
        sigs = np.frombuffer(b"".join(sel.column("sig").to_pylist()), np.uint32).reshape(sel.num_rows, cfg.num_perm)
        keys = nd.signature_value_keys(sigs)
        need = int(np.ceil(cfg.caption_jaccard * cfg.num_perm - 1e-9))

        def similar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (sigs[a] == sigs[b]).sum(axis=1) >= need
    # Identical values also meet through K_PHASH stars, so only the caption kind keeps its own.
    eq_src, eq_dst, src, dst = nd.bucket_edges(buckets, ids, keys, similar, cfg.max_bucket)
    if kind == K_CAPTION:
        src, dst = np.r_[eq_src, src], np.r_[eq_dst, dst]
    return src, dst, np.full(len(src), kind, np.int8)


# ---------------------------------------------------------------- components -> drops

def _members(part: np.ndarray, tag: int, node: np.ndarray, comp: Any = None, batch: pa.Table | None = None) -> pa.Table:
    n = len(node)

    def col(name: str, typ: pa.DataType) -> Any:
        return batch.column(name) if batch is not None else pa.nulls(n, typ)
    return pa.table({"part": part, "tag": np.full(n, tag, np.int8), "node": node,
                     "comp": comp if comp is not None else pa.nulls(n, pa.int64()),
                     "key": col("key", pa.string()), "url": col("url", pa.string()),
                     "sha256": col("sha256", pa.string()), "area": col("area", pa.int64()),
                     "file_idx": col("file_idx", pa.int64())}, schema=_MEMBER_SCHEMA)


def _member_rows(batch: pa.Table, partitions: int) -> pa.Table:
    ids = batch.column("id").to_numpy()
    return _members(nd.partition_of(ids, partitions), _ROW, ids, batch=batch)


def _label_rows(batch: pa.Table, partitions: int) -> pa.Table:
    node, comp = batch.column("node").to_numpy(), batch.column("comp").to_numpy()
    return pa.concat_tables([_members(nd.partition_of(node, partitions), _LABEL, node, comp),
                             _members(nd.partition_of(comp, partitions), _CENTRE, comp)])


def _image_endpoint_rows(batch: pa.Table, partitions: int) -> pa.Table:
    image = (batch.column("kind").to_numpy() & _IMAGE_KINDS) != 0
    nodes = np.unique(np.r_[batch.column("src").to_numpy()[image], batch.column("dst").to_numpy()[image]])
    return _members(nd.partition_of(nodes, partitions), _IMAGE_ENDPOINT, nodes)


def _attach_component(group: pa.Table, partitions: int, caption: bool) -> pa.Table:
    tag, node = group.column("tag").to_numpy(), group.column("node").to_numpy()
    lab_node = node[tag == _LABEL]
    lab_comp = group.column("comp").filter(pa.array(tag == _LABEL)).to_numpy()
    order = np.lexsort((lab_comp, lab_node))
    lab_node, lab_comp = lab_node[order], lab_comp[order]
    dup = (lab_node[1:] == lab_node[:-1]) & (lab_comp[1:] != lab_comp[:-1])
    if dup.any():  # the star-forest fixed point gives each node one centre
        raise RuntimeError(f"connected components gave node {lab_node[1:][dup][0]} two labels")
    rows = group.filter(pa.array(tag == _ROW))
    ids = rows.column("node").to_numpy()
    pos = np.clip(np.searchsorted(lab_node, ids), 0, max(len(lab_node) - 1, 0))
    labelled = (lab_node[pos] == ids) if len(lab_node) else np.zeros(len(ids), bool)
    centre = np.isin(ids, node[tag == _CENTRE])
    comp = np.where(labelled, lab_comp[pos] if len(lab_node) else ids, ids)
    keep = labelled | centre  # the rest are singletons: nothing to drop
    image = np.isin(ids, node[tag == _IMAGE_ENDPOINT]) if caption else np.ones(len(ids), bool)
    rows = rows.filter(pa.array(keep))
    return pa.table({"part": nd.partition_of(comp[keep], partitions), "comp": comp[keep], "node": ids[keep],
                     "key": rows.column("key"), "url": rows.column("url"), "sha256": rows.column("sha256"),
                     "area": rows.column("area"), "file_idx": rows.column("file_idx"), "image": image[keep]})


def _choose_representatives(group: pa.Table) -> pa.Table:
    df = group.to_pandas()
    if df["node"].duplicated().any():
        key = df.loc[df["node"].duplicated(), "key"].iloc[0]
        raise ValueError(f"plan_dedup: key {key!r} appears in more than one row, or two keys share a 64-bit id")
    # Representative: largest original area, ties -> smallest key.
    df = df.sort_values(["comp", "area", "key"], ascending=[True, False, True], kind="mergesort")
    rep_key = df.groupby("comp")["key"].transform("first")
    url_shared = df.groupby(["comp", "url"])["key"].transform("size") > 1
    sha_shared = df.groupby(["comp", "sha256"])["key"].transform("size") > 1
    reason = np.where(url_shared, "exact_dup_url", np.where(sha_shared, "exact_dup_image",
                      np.where(df["image"], "near_dup_image", "near_dup_caption")))
    drop = (df["key"] != rep_key).to_numpy()
    return pa.table({"key": df["key"].to_numpy()[drop], "file_idx": df["file_idx"].to_numpy()[drop],
                     "reason": reason[drop], "detail": rep_key.to_numpy()[drop],
                     "eval_hits": pa.array([[]] * int(drop.sum()), pa.list_(pa.string()))}, schema=DROPPED_SCHEMA)


# ---------------------------------------------------------------- report

def overlap_report(dropped: ray.data.Dataset, eval_index: EvalIndex | None = None) -> dict[str, dict[str, int]]:
    """Per eval set: train rows dropped with a match in that set, distinct eval images matched.

    With the index, sets without any match are listed too, with their size.
    """
    hits = dropped.map_batches(_explode_hits, batch_format="pyarrow", **data_args()).materialize()
    report: dict[str, dict[str, int]] = {}
    if eval_index is not None:
        report = {n: {"train_rows_dropped": 0, "eval_images_hit": 0, "eval_images": eval_index.sizes[n]}
                  for n in eval_index.names}
    if hits.count() == 0:  # no overlap at all: nothing to group
        return report
    per_image = hits.groupby(["eval_set", "image"]).aggregate(Sum("first_in_row"))
    per_set = per_image.groupby("eval_set").aggregate(Count(), Sum("sum(first_in_row)"))
    for row in per_set.take_all():  # one row per eval set: small by construction
        entry = report.setdefault(row["eval_set"], {})
        entry["train_rows_dropped"] = int(row["sum(sum(first_in_row))"])
        entry["eval_images_hit"] = int(row["count()"])
    return report


def _explode_hits(batch: pa.Table) -> pa.Table:
    rows = batch.filter(pc.equal(batch.column("reason"), "eval_overlap"))
    sets, images, first = [], [], []
    for labels in rows.column("eval_hits").to_pylist():
        seen: set[str] = set()
        for label in labels or []:
            name, _, image = label.rpartition("#")
            sets.append(name), images.append(int(image)), first.append(int(name not in seen))
            seen.add(name)
    return pa.table({"eval_set": pa.array(sets, pa.string()), "image": pa.array(images, pa.int64()),
                     "first_in_row": pa.array(first, pa.int64())})
