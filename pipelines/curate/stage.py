"""Stage 4, curate: match captions against metadata, count per entry, balance (MetaCLIP).

    python -m pipelines.curate --config configs/curate.yaml [key=value ...]

Reads dedup's committed output (balancing runs last, after dedup, as in MetaCLIP: duplicates would
inflate the counts) and commits the rows a model should see:

1. Match: an actor pool (each actor builds the Aho-Corasick automaton once, from the metadata the
   driver put in the object store) matches every caption of one input file and writes the matched
   entry ids to `_work/<fp>/match-NNNNN.parquet` (a rerun reuses them); it returns per-entry counts
   of its file, and a Ray Data groupby sums them over the cluster. Only the counts (one row per
   matched entry) reach the driver.
2. Balance: an entry matched by c pairs keeps each pair with p = min(1, t / c); a pair survives when
   any of its entries keeps it. The draw for (pair, entry) is a hash of (seed, key, entry), so the
   result is the same for any block layout, worker count or rerun. Each input file is one part:
   rows without a match are rejected as `no_metadata_match`, rows no entry kept as `balanced_out`
   (the detail names their entries and counts), both kept under `_rejected/` for audit.
3. The manifest's `extra["entry_counts"]` has the distribution before and after (head, tail, entries
   at the cap, a rank curve the report plots); `entry_counts.parquet` beside it has every matched
   entry's counts (not a data file: readers read only what the manifest lists).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.core.manifest import Manifest, fingerprint, read_committed
from pipelines.core.parts import OutputConfig, PartResult, PartStore, already_committed, collect_parts, finish_stage
from pipelines.core.runtime import RayConfig, actors_for, data_args, init_ray
from pipelines.core.schema import rejected_table
from pipelines.core.stage import DATA_STAGE_WIRED, Stage, wire_data_stage
from pipelines.core.storage import S3Options, Storage
from pipelines.curate.counts import distribution
from pipelines.curate.match import Matcher, balance, entry_hashes, keep_probabilities, key_hashes
from pipelines.metadata.store import read_metadata

NAME = "curate"
MATCH_SCHEMA = pa.schema([("key", pa.string()), ("entries", pa.list_(pa.int32()))])
COUNT_SCHEMA = pa.schema([("entry", pa.int64()), ("n", pa.int64())])
DETAIL_ENTRIES = 5  # entries named in a balanced_out row's detail


@dataclass
class CurateConfig:
    # The committed output of the dedup stage, local or s3://.
    input: str = ""
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The metadata file (python -m pipelines.metadata writes it), local or s3:// (read with input_s3).
    metadata: str = "out/metadata/metadata.jsonl"
    # Pairs kept per entry (MetaCLIP and the paper: 20,000). null or .inf = no balancing (every matched row stays).
    t: float | None = 20000
    # Seed of the balancing draw: another seed, another (equally balanced) sample.
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    # Parallel file workers (each holds one automaton); None = one per 100,000 input rows (ROWS_PER_WORKER), at most
    # the cluster's logical CPUs.
    workers: int | None = None

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("curate.input is empty: give the dedup stage's output directory")
        if not self.metadata:
            raise ValueError("curate.metadata is empty: give a metadata file (python -m pipelines.metadata)")
        if self.t is not None and math.isinf(self.t) and self.t > 0:
            self.t = None  # infinity: kept as null, which JSON (manifests, fingerprints) can hold
        if self.t is not None and not self.t > 0:
            raise ValueError(f"curate.t must be > 0 (or null for no balancing), got {self.t}")


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _counts_table(counter: Counter) -> pa.Table:
    ids = sorted(counter)
    return pa.table({"entry": pa.array(ids, pa.int64()), "n": pa.array([counter[i] for i in ids], pa.int64())},
                    schema=COUNT_SCHEMA)


# Input rows per matcher actor when `workers` is unset. An actor's start (a process, its imports, the automaton)
# took 2-3 CPU-s on a 2-core machine; one matched ~170,000 captions a second against the demo's 1,114 entries.
ROWS_PER_WORKER = 100_000


class MatchFiles:
    """Actor: one automaton for its lifetime; per input file, the matches (written) and their counts (returned)."""

    def __init__(self, inp: Storage, out: Storage, work: str, entries_ref: Any) -> None:
        import ray

        self.inp, self.out, self.work = inp, out, work
        self.matcher = Matcher(ray.get(entries_ref))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        counts: Counter = Counter()
        for idx, path in zip(batch["idx"], batch["path"]):
            for ids in self.matches(int(idx), str(path)):
                counts.update(ids)
        return _counts_table(counts)

    def matches(self, idx: int, path: str) -> list[list[int]]:
        name = f"{self.work}/match-{idx:05d}.parquet"
        if self.out.exists(name):  # written by an interrupted run of this fingerprint (one put: complete)
            return self.out.read_parquet(name, columns=["entries"]).column("entries").to_pylist()
        table = self.inp.read_parquet(path, columns=["key", "caption"])
        found = self.matcher.match_many(table.column("caption").to_pylist())
        self.out.write_bytes(name, _parquet_bytes(pa.table({"key": table.column("key"), "entries": found},
                                                           schema=MATCH_SCHEMA)))
        return found


def apply_balance(batch: dict[str, Any], inp: Storage, store: PartStore, work: str, tables_ref: Any) -> dict[str, list]:
    """Ray Data task (no state worth an actor: the tables come from the object store, numpy zero-copy)."""
    balancer = None
    out = []
    for idx, path in zip(batch["idx"], batch["path"]):
        name = os.path.splitext(os.path.basename(str(path)))[0]
        done = store.done(name)
        if done is None:
            balancer = balancer or ApplyBalance(inp, store, work, tables_ref)
            done = balancer.apply(name, int(idx), str(path))
        out.append(done.dumps())
    return {"result": out}


class ApplyBalance:
    """Per input file, keep or reject each row by its matches and the global probabilities."""

    def __init__(self, inp: Storage, store: PartStore, work: str, tables_ref: Any) -> None:
        import ray

        self.inp, self.store, self.work = inp, store, work
        self.entries, self.counts, self.p, self.hashes = ray.get(tables_ref)

    def apply(self, name: str, idx: int, path: str) -> PartResult:
        table = self.inp.read_parquet(path)
        found = self.store.storage.read_parquet(f"{self.work}/match-{idx:05d}.parquet")
        if found.column("key").to_pylist() != table.column("key").to_pylist():
            raise AssertionError(f"curate {name}: match file rows differ from {path} (input changed mid-run?)")
        matches = found.column("entries").to_pylist()
        keys = table.column("key").to_pylist()
        keep = balance(key_hashes(keys), matches, self.p, self.hashes)
        after: Counter = Counter()
        reasons, details = [], []
        for k, ids in zip(keep, matches):
            if k:
                after.update(ids)
            elif not ids:
                reasons.append("no_metadata_match"), details.append("")
            else:
                reasons.append("balanced_out"), details.append(self.detail(ids))
        # The after counts land before the part's marker: a committed part always has them.
        self.store.storage.write_bytes(f"{self.work}/after-{idx:05d}.parquet", _parquet_bytes(_counts_table(after)))
        mask = pa.array(keep)
        gone = table.filter(pc.invert(mask)).select(["key", "url"])
        rejected = rejected_table(gone.column("key"), gone.column("url"), NAME, reasons, details)
        return self.store.commit(name, table.filter(mask), rejected, table.num_rows)

    def detail(self, ids: list[int]) -> str:
        rarest = sorted(ids, key=lambda i: (self.counts[i], i))[:DETAIL_ENTRIES]
        more = f" +{len(ids) - len(rarest)} more" if len(ids) > len(rarest) else ""
        return "; ".join(f"{self.entries[i]} (c={self.counts[i]}, p={self.p[i]:.3g})" for i in rarest) + more


def _sum_counts(ds: Any, n_entries: int) -> np.ndarray:
    """Per-entry count tables of many files -> one array, summed by a Ray Data groupby across the cluster."""
    counts = np.zeros(n_entries, dtype=np.int64)
    summed = ds.groupby("entry").sum("n")
    for batch in summed.iter_batches(batch_format="numpy", batch_size=65536):
        counts[batch["entry"].astype(np.int64)] += batch["sum(n)"].astype(np.int64)
    return counts


def _prepare(cfg: CurateConfig) -> tuple[Storage, Manifest, str, str]:
    inp, in_manifest = read_committed(cfg.input, cfg.input_s3, "curate.input (the dedup's output)", column="caption",
                                      producer="dedup")
    meta = read_metadata(cfg.metadata, cfg.input_s3, what="curate.metadata", parse=False)
    conf = {"t": cfg.t, "seed": cfg.seed, "metadata_sha256": meta.sha256}
    return inp, in_manifest, meta.sha256, fingerprint(NAME, conf, [in_manifest])


def fingerprint_of(cfg: CurateConfig) -> str:
    """What run(cfg) would commit under: t, seed, the metadata's content hash and the committed input."""
    return _prepare(cfg)[3]


def validate(cfg: CurateConfig) -> None:
    read_metadata(cfg.metadata, cfg.input_s3, what="curate.metadata", parse=False)


def run(cfg: CurateConfig) -> Manifest:
    started = time.time()
    inp, in_manifest, meta_sha, fp = _prepare(cfg)
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    existing = already_committed(out, NAME, fp)
    if existing is not None:
        return existing
    files = in_manifest.file_paths()
    if not files:
        raise ValueError(f"curate input {cfg.input} lists no data files (dedup kept no rows)")
    meta = read_metadata(cfg.metadata, cfg.input_s3, what="curate.metadata")
    if meta.sha256 != meta_sha:
        raise ValueError(f"curate.metadata {cfg.metadata} changed while the stage started; run again")
    init_ray(cfg.ray)
    import ray
    import ray.data

    workers = max(1, min(cfg.workers or actors_for(in_manifest.rows_out, ROWS_PER_WORKER), len(files)))
    work = f"_work/{fp[:8]}"
    items = [{"idx": i, "path": f} for i, f in enumerate(files)]
    timings = {}

    t0 = time.time()
    entries_ref = ray.put(meta.entries)
    matched = (ray.data.from_items(items, override_num_blocks=len(items))
               .map_batches(MatchFiles, batch_size=1, batch_format="numpy", concurrency=workers, num_cpus=1,
                            fn_constructor_kwargs={"inp": inp, "out": out, "work": work, "entries_ref": entries_ref},
                            **data_args()))
    before = _sum_counts(matched, len(meta.entries))
    timings["match_s"] = round(time.time() - t0, 3)

    t0 = time.time()
    p = keep_probabilities(before, cfg.t)
    tables_ref = ray.put((meta.entries, before, p, entry_hashes(meta.entries, cfg.seed)))
    store = PartStore(out, NAME, fp, cfg.output.row_group_size)
    parts = collect_parts(ray.data.from_items(items, override_num_blocks=len(items))
                          .map_batches(apply_balance, batch_size=1, batch_format="numpy", num_cpus=1,
                                       fn_kwargs={"inp": inp, "store": store, "work": work, "tables_ref": tables_ref},
                                       **data_args()), len(items))
    after = _sum_counts(ray.data.read_parquet(**out.ray_read_args([f"{work}/after-{i:05d}.parquet" for i in
                                                                  range(len(files))]), ray_remote_args=data_args()),
                        len(meta.entries))
    timings["balance_s"] = round(time.time() - t0, 3)

    dist = distribution(before, after, meta.entries, cfg.t)
    matched_ids = np.flatnonzero(before)
    out.write_parquet(pa.table({
        "entry": pa.array([meta.entries[i] for i in matched_ids], pa.string()),
        "count_before": pa.array(before[matched_ids], pa.int64()), "count_after": pa.array(after[matched_ids], pa.int64()),
        "p": pa.array(p[matched_ids], pa.float64())}), "entry_counts.parquet")
    with inp.open_input(files[0]) as f:
        schema = pq.read_schema(f)
    extra = {"metadata": {"path": cfg.metadata, "sha256": meta_sha, "entries": len(meta.entries),
                          "sources": meta.header.get("sources", {})},
             "entry_counts": dist, "entry_counts_file": "entry_counts.parquet"}
    manifest = finish_stage(out, NAME, fp, parts, schema, to_dict(cfg), started, [cfg.input], extra=extra,
                            timings=timings)
    out.delete_prefix(work)
    b, a = dist["before"], dist["after"]
    print(f"curate: {b['entries_matched']:,} of {len(meta.entries):,} entries matched; {dist['entries_at_cap']:,} over "
          f"t={cfg.t}; max count {b['max']:,} -> {a['max']:,}", flush=True)
    return manifest


STAGE = Stage(
    name=NAME, section=CurateConfig, default=CurateConfig,
    doc="metadata matching and balancing (MetaCLIP): rows matching no entry go, entries over t are sampled down",
    upstream="dedup", wired=DATA_STAGE_WIRED, wire=wire_data_stage, fingerprint=fingerprint_of, run=run,
    validate=validate, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("curate", CurateConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
