"""The all-to-all steps on synthetic rows (hashes, captions, keys; no images) at 100k, 1M and 10M rows.

    .venv/bin/python -m benchmarks.scale_sim [--sizes 100000 1000000 10000000] [--steps dedup curate shard]
                                              [--object-store-mib 2048] [--out benchmarks/out]

The steps whose cost can grow faster than the rows, each through the project's own code on a fresh local Ray
(one node: this machine) with a fixed object store, so that spilling shows when the data outgrows it:

- dedup: `pipelines.dedup.plan.plan_dedup` (no eval index): URL / sha256 / phash-equal stars and 40-table phash
  LSH buckets in groupby passes of at most `max_shuffle_rows` rows (`--dedup KEY=VALUE` sets any DedupConfig
  key, e.g. the cluster's LSH), then the connected components rounds (pipelines/dedup/components.py), then two
  groupbys that attach components and pick representatives. Rows: random 64-bit phashes and colour signatures;
  1% exact image copies (same sha256 and phash), 1% near copies (phash with 2 bits flipped), 0.5% repeated URLs.
- curate: the global entry counts of `pipelines.curate.stage._sum_counts`: per input file (10,000 rows) a table
  of (entry, matches), summed by a Ray Data groupby over the cluster. Each synthetic row matches 1-8 entries
  drawn Zipf(1.1) from 500,000 (MetaCLIP's metadata size). The Aho-Corasick matching itself is per row
  (measured in benchmarks/scale_costs.py), not all-to-all.
- shard: `pipelines.shard.stage`'s seeded order key and range-partition sort with fixed boundaries, then the
  Parquet write of the shards (to local disk here). Rows: key (24 hex) + caption (~50 chars) + 64 bytes
  standing in for the other columns; real rows also carry the image (10-30 KB), which the sort moves too.

Measured per step: wall seconds, CPU seconds of the whole process tree, peak PSS of the tree (one node, so
"per node"), the object store's spilled and restored bytes (Ray's own store stats), the spill directory's
largest size, and the step's output size. A size that fails (out of memory, a Ray error) or exceeds --timeout is recorded as such, not retried.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from benchmarks.scale_costs import Tree, fit

ROWS_PER_FILE = 10_000
ENTRIES = 500_000


# ------------------------------------------------------------------------------------ synthetic rows

def _dedup_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    ids = batch["id"].astype(np.int64)
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    n = len(ids)
    # "Original" row of each row: itself, except planted copies, which point at an earlier id (any block).
    src = ids.copy()
    kind = rng.random(n)
    copy = (kind < 0.025) & (ids > 0)
    src[copy] = (rng.random(copy.sum()) * ids[copy]).astype(np.int64)
    base = np.random.default_rng(0)
    phash = _hash64(src, 1)
    colour = _hash64(src, 2) & 0x7FFFFFFF
    near = copy & (kind >= 0.01) & (kind < 0.02)  # 1% near copies: 2 bits flipped
    flips = (np.int64(1) << rng.integers(1, 62, near.sum())) | (np.int64(1) << rng.integers(1, 62, near.sum()))
    phash[near] ^= flips
    exact = copy & (kind < 0.01)
    sha = np.where(exact, src, ids)
    url_rep = copy & (kind >= 0.02)  # 0.5%: the same URL crawled twice (same image too)
    url = np.where(url_rep, src, ids)
    del base
    return pa.table({
        "key": pa.array([f"{i:024x}" for i in ids]),
        "url": pa.array([f"http://host{u % 5000}.example/img/{u}.jpg" for u in url]),
        "sha256": pa.array([f"{s:064x}" for s in sha.astype(np.uint64)]),
        "phash": phash, "colour_sig": colour,
        "width": np.full(n, 256, np.int64), "height": np.full(n, 256, np.int64),
        "original_width": (200 + ids % 800).astype(np.int64), "original_height": np.full(n, 600, np.int64),
        "file_idx": ids // ROWS_PER_FILE})


def _hash64(x: np.ndarray, salt: int) -> np.ndarray:
    from pipelines.dedup.near_dup import splitmix64

    with np.errstate(over="ignore"):
        return splitmix64(x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)).view(np.int64)


def _file_counts(batch: dict[str, np.ndarray]) -> pa.Table:
    """One input file's (entry, n) table, as curate's MatchFiles returns it."""
    f = int(batch["id"][0])
    rng = np.random.default_rng(f)
    per_row = rng.integers(1, 9, ROWS_PER_FILE)
    entries = (rng.zipf(1.1, per_row.sum()) - 1) % ENTRIES
    ids, n = np.unique(entries, return_counts=True)
    return pa.table({"entry": ids.astype(np.int64), "n": n.astype(np.int64)})


def _shard_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    ids = batch["id"].astype(np.int64)
    pad = b"x" * 64
    return pa.table({"key": pa.array([f"{i:024x}" for i in ids]),
                     "caption": pa.array([f"a photo of item {i} on a table, taken outdoors" for i in ids]),
                     "rest": pa.array([pad] * len(ids), pa.binary())})


# ------------------------------------------------------------------------------------ the steps

def step_dedup(n: int, blocks: int, tmp: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import ray.data

    from pipelines.dedup.plan import DedupConfig, plan_dedup

    keys = ray.data.range(n, override_num_blocks=blocks).map_batches(_dedup_rows, batch_format="numpy")
    # shuffle_strategy None: the context's, set by measure(). overrides: --dedup KEY=VALUE (e.g. the LSH of
    # configs/cluster.yaml).
    cfg = DedupConfig(**{"partitions": max(64, blocks), "shuffle_strategy": None, **(overrides or {})})
    dropped = plan_dedup(keys, cfg).materialize()
    by = {}
    for row in dropped.groupby("reason").count().take_all():
        by[row["reason"]] = int(row["count()"])
    # The groups per shuffle the plan used (one per rows_per_partition rows, capped at cfg.partitions) and
    # its LSH passes (as many tables per pass as max_shuffle_rows allows).
    out = {"dropped": by, "partitions": cfg.partitions_for(n), "lsh_passes": len(cfg.lsh_passes(n))}
    return {**out, "dedup": overrides} if overrides else out


def step_curate(n: int, blocks: int, tmp: str) -> dict[str, Any]:
    import ray.data

    from pipelines.curate.stage import _sum_counts

    files = max(1, n // ROWS_PER_FILE)
    per_file = ray.data.range(files, override_num_blocks=min(files, 200)).map_batches(
        _file_counts, batch_size=1, batch_format="numpy")
    counts = _sum_counts(per_file, ENTRIES)
    return {"files": files, "entries_matched": int((counts > 0).sum()), "matches": int(counts.sum())}


def step_shard(n: int, blocks: int, tmp: str) -> dict[str, Any]:
    import ray.data

    from pipelines.shard.stage import _ORDER, _ORDER_BITS, _order_keys

    num_shards = max(1, math.ceil(n / ROWS_PER_FILE))
    step = 2 ** _ORDER_BITS / num_shards
    boundaries = [int(step * i) for i in range(1, num_shards)]
    out = os.path.join(tmp, "shards")
    (ray.data.range(n, override_num_blocks=blocks).map_batches(_shard_rows, batch_format="numpy")
     .map_batches(_order_keys, batch_format="pyarrow", fn_kwargs={"seed": 0})
     .sort(_ORDER, boundaries=boundaries or None).drop_columns([_ORDER])
     .write_parquet(out, max_rows_per_file=2 * ROWS_PER_FILE))
    written = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    size = sum(os.path.getsize(p) for p in written)
    shutil.rmtree(out, ignore_errors=True)
    return {"shards": num_shards, "files": len(written), "bytes_written": size}


STEPS: dict[str, Callable[[int, int, str], dict[str, Any]]] = {
    "dedup": step_dedup, "curate": step_curate, "shard": step_shard}


# ------------------------------------------------------------------------------------ one measurement

def store_stats() -> dict[str, int]:
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    out = {"spilled_mib": 0, "restored_mib": 0}
    m = re.search(r"Spilled (\d+) MiB", text)
    if m:
        out["spilled_mib"] = int(m.group(1))
    m = re.search(r"Restored (\d+) MiB", text)
    if m:
        out["restored_mib"] = int(m.group(1))
    return out


def _tree_bytes(root: str) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):  # Ray deletes spill files as their objects are freed
                total += os.path.getsize(os.path.join(d, f))
    return total


class DiskGuard:
    """Stops a step (KeyboardInterrupt in the main thread) when the disk holding the spill directory falls
    below `min_free_gib`: dedup at 10M rows spilled 26 GB in its first two minutes here, and a full disk
    breaks every other process on the machine. What it saw is kept for the record."""

    def __init__(self, spill_dir: str, min_free_gib: float) -> None:
        import threading

        self.spill_dir, self.floor = spill_dir, min_free_gib * 2**30
        self.tripped: dict[str, Any] | None = None
        # Largest size of the spill directory, sampled each second: what the disk must hold at once (Ray's
        # "Spilled" total counts every object ever spilled, also those freed long before).
        self.peak_spill_bytes = 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "DiskGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import _thread

        while not self._stop.wait(1.0):
            free = shutil.disk_usage(self.spill_dir).free
            spilled = _tree_bytes(self.spill_dir)
            self.peak_spill_bytes = max(self.peak_spill_bytes, spilled)
            if free < self.floor:
                self.tripped = {"after_s": round(time.perf_counter() - self._t0), "spill_dir_gib": round(spilled / 2**30, 1),
                                "free_gib": round(free / 2**30, 1)}
                _thread.interrupt_main()
                return


def measure(step: str, n: int, object_store_mib: int, num_cpus: int,
            shuffle: str = "sort_shuffle_pull_based", min_free_gib: float = 10.0,
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    import ray
    import ray.data

    tmp = tempfile.mkdtemp(prefix=f"scale-sim-{step}-")
    for attempt in range(3):  # a Ray start can time out on a heavily loaded machine
        try:
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mib * 2**20, include_dashboard=False,
                     _system_config={"enable_metrics_collection": False, "object_spilling_config": json.dumps(
                         {"type": "filesystem", "params": {"directory_path": tmp}})})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    from ray.data.context import ShuffleStrategy
    ctx.shuffle_strategy = ShuffleStrategy(shuffle)  # default: the project's setting (RayConfig)
    tree = Tree(set())
    blocks = max(8, n // 50_000)  # ~50k rows per input block
    rec: dict[str, Any] = {"rows": n, "blocks": blocks, "shuffle": shuffle}
    guard = DiskGuard(tmp, min_free_gib)
    try:
        cpu0 = tree.cpu_s()
        tree.start()
        t0 = time.perf_counter()
        with guard:
            rec.update(STEPS[step](n, blocks, tmp, **({"overrides": options} if options else {})))
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        pss, rss = tree.stop()
        rec["cpu_s"] = round(tree.cpu_s() - cpu0 - tree.sampler_cpu_s, 1)
        rec["peak_pss_mib"] = round(pss / 2**20)
        rec["peak_proc_rss_mib"] = round(rss / 2**20)
        rec.update(store_stats())
        rec["peak_spill_on_disk_mib"] = round(guard.peak_spill_bytes / 2**20)
    except (KeyboardInterrupt, Exception) as err:
        tree.stop()
        if guard.tripped is None and not isinstance(err, Exception):
            raise
        # Ray may surface the interrupt as its own error (it raised OutOfDiskError at 95% disk use here).
        # A task's error carries its traceback; the line Ray raised with is the one worth keeping.
        raised = re.findall(r"^ray\.exceptions\.\w+: .*$", str(err), re.M)
        text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(err).__name__}: {(raised[-1] if raised else str(err))[:300]}")
        if guard.tripped is not None:
            t = guard.tripped
            text = (f"stopped after {t['after_s']} s: {t['spill_dir_gib']} GiB spilled, {t['free_gib']} GiB left on the "
                    f"disk (floor --min-free-gib {min_free_gib:g}); {text[:120]}")
        rec["error"] = text
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rec


def markdown(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = [f"All-to-all steps on synthetic rows (`python -m benchmarks.scale_sim`), one node: {meta['cpus']} cores, "
             f"{meta['num_cpus']} logical CPUs for Ray, object store {meta['object_store_mib']} MiB, Ray Data shuffle "
             f"{meta.get('shuffle', 'sort_shuffle_pull_based')}; 1-minute load "
             f"average {meta['load_before']} before, {meta['load_after']} after.", "",
             "| step | rows | wall s | CPU s | CPU s per 1M rows | peak PSS MiB | largest process MiB | spilled MiB | "
             "restored MiB | spill on disk at once, MiB | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for step, recs in results.items():
        for r in recs:
            if "error" in r:
                error = " ".join(r["error"].split())[:160]  # one table line
                lines.append(f"| {step} | {r['rows']:,} | - | - | - | - | - | - | - | - | did not finish: {error} |")
                continue
            notes = {k: v for k, v in r.items() if k not in ("rows", "shuffle", "wall_s", "cpu_s", "peak_pss_mib",
                                                               "peak_proc_rss_mib", "spilled_mib", "restored_mib",
                                                               "peak_spill_on_disk_mib")}
            lines.append(f"| {step} | {r['rows']:,} | {r['wall_s']:,} | {r['cpu_s']:,} | "
                         f"{1e6 * r['cpu_s'] / r['rows']:,.0f} | {r['peak_pss_mib']:,} | {r['peak_proc_rss_mib']:,} | "
                         f"{r['spilled_mib']:,} | {r['restored_mib']:,} | {_mib(r.get('peak_spill_on_disk_mib'))} | "
                         f"{json.dumps(notes)} |")
        ok = [r for r in recs if "error" not in r]
        lines.append(f"| {step} | growth exponent | {fit([(r['rows'], r['wall_s']) for r in ok]) or '-'} | "
                     f"{fit([(r['rows'], r['cpu_s']) for r in ok]) or '-'} | | "
                     f"{fit([(r['rows'], r['peak_pss_mib']) for r in ok]) or '-'} | | | | | |")
    return "\n".join(lines)


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x:,}"  # runs recorded before the column existed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--steps", nargs="+", default=["shard", "curate", "dedup"], choices=list(STEPS))
    ap.add_argument("--object-store-mib", type=int, default=2048)
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--max-dedup-rows", type=int, default=1_000_000,
                    help="skip dedup above this many rows: with the default LSH (16 bits) a 10M-row bucket holds ~150 "
                         "rows, and the first of 8 passes alone took 762 s here; run 10M with the cluster's LSH "
                         "(--dedup hamming_threshold=4 lsh_bits=26 lsh_tables=32 --max-dedup-rows 10000000)")
    ap.add_argument("--shuffle", default="sort_shuffle_pull_based",
                    choices=["sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle"])
    ap.add_argument("--min-free-gib", type=float, default=10.0,
                    help="stop a step (recorded as not finished) when the spill disk has less free space than this")
    ap.add_argument("--dedup", nargs="+", default=[], metavar="KEY=VALUE",
                    help="DedupConfig keys for the dedup step (YAML values), e.g. the LSH of configs/cluster.yaml: "
                         "hamming_threshold=4 lsh_bits=26 lsh_tables=32")
    ap.add_argument("--name", default="scale_sim", help="output file stem (benchmarks/out/<name>.{json,md})")
    ap.add_argument("--resume", action="store_true", help="keep the sizes <name>.json already has; run the rest")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    import yaml

    dedup_options = {}
    for item in args.dedup:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--dedup takes KEY=VALUE, got {item!r}")
        dedup_options[key] = yaml.safe_load(value)
    meta = {"shuffle": args.shuffle, "cpus": os.cpu_count(), "num_cpus": args.num_cpus, "object_store_mib": args.object_store_mib,
            "load_before": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: dict[str, list[dict[str, Any]]] = {step: [] for step in args.steps}
    path = os.path.join(args.out, f"{args.name}.json")
    os.makedirs(args.out, exist_ok=True)
    if args.resume and os.path.exists(path):  # keep what an earlier run measured; run only the rest
        with open(path) as f:
            earlier = json.load(f)
        for step, recs in earlier["results"].items():
            results[step] = [r for r in recs if "error" not in r]
        meta["earlier_runs"] = [earlier["meta"], *earlier["meta"].get("earlier_runs", [])]
    for n in sorted(args.sizes):  # size-major: every step at the small sizes before any at the largest
        for step in args.steps:
            if any(r["rows"] == n for r in results.get(step, [])):
                continue
            if step == "dedup" and n > args.max_dedup_rows:
                results.setdefault(step, []).append({"rows": n, "error": f"skipped (--max-dedup-rows {args.max_dedup_rows})"})
                continue
            print(f"{step} at {n:,} rows (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            rec = measure(step, n, args.object_store_mib, args.num_cpus, args.shuffle, args.min_free_gib,
                          dedup_options if step == "dedup" else None)
            print(f"  {rec}", flush=True)
            results.setdefault(step, []).append(rec)
            meta["load_after"] = round(os.getloadavg()[0], 2)
            with open(path, "w") as f:  # after every size: a long run that dies keeps what it measured
                json.dump({"meta": meta, "results": results}, f, indent=2)
    text = markdown(results, meta)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
