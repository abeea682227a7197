"""The crawl's plan: list files -> parts of rows_per_part rows (todo files), and the rows that repeat an
earlier row anywhere in the input.

Plain Ray tasks: one `plan_file` task per list file streams it through `url_lists.iter_list_rows` (which never raises for a
row), writes its parts as `_plan/part-FFFFF-CCCCC.parquet` (file index, chunk index: deterministic) and
returns the keys of its good rows split into buckets; `find_duplicates` tasks (one per bucket) find every
row whose (url, caption) key an earlier row already has. No Ray Data groupby: on a small cluster its
fixed cost (7-9 s for 10,000 rows on 2 cores, measured) would dominate a crawl of that size, while this
shuffle moves 24 bytes per row. Kept light to import (no image or network code): fresh worker processes
run these tasks, and their imports are on the crawl's critical path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.parts import PartStore
from pipelines.core.runtime import data_args
from pipelines.core.storage import Storage
from pipelines.crawl.lists import iter_list_rows

if TYPE_CHECKING:
    from pipelines.crawl.stage import CrawlConfig

PLAN_DIR = "_plan"
PLAN_MARKER = f"{PLAN_DIR}/_plan.json"

# A row's identity in the duplicate check: its key as 96 bits, and where it sits (file, row in file).
_ROW_ID = np.dtype([("hi", "<u8"), ("lo", "<u4"), ("file", "<i4"), ("row", "<i8")])


def part_of(file_index: int, chunk: int) -> str:
    return f"part-{file_index:05d}-{chunk:05d}"


def todo_path(part: str) -> str:
    """The plan file holding a part's input rows; retry parts (part-X.r2) share their part's."""
    return f"{PLAN_DIR}/{part.split('.', 1)[0]}.parquet"


@dataclass
class Plan:
    """The crawl's parts and, per part, its rows that repeat an earlier row (row in part -> where first seen)."""

    parts: list[tuple[str, int]]
    duplicates: dict[str, dict[int, str]]

    def descriptors(self) -> list[dict[str, Any]]:
        return [{"part": name, "duplicates": json.dumps(self.duplicates.get(name, {}))} for name, _ in self.parts]

    def commit(self, store: PartStore) -> None:
        store.storage.write_bytes(PLAN_MARKER, json.dumps({"fingerprint": store.fingerprint, "parts": self.parts,
                                                           "duplicates": self.duplicates}).encode())


def committed_plan(store: PartStore) -> Plan | None:
    """The plan an earlier run of this fingerprint committed, if any (its todo files are then all there)."""
    if not store.storage.exists(PLAN_MARKER):
        return None
    data = json.loads(store.storage.read_bytes(PLAN_MARKER))
    if data.get("fingerprint") != store.fingerprint:
        return None
    dups = {p: {int(r): f for r, f in d.items()} for p, d in data["duplicates"].items()}
    return Plan([(str(n), int(r)) for n, r in data["parts"]], dups)


@dataclass
class PlanJob:
    """Planning in flight: per list file, the ref of its parts; per bucket, the ref of its duplicates."""

    parts: list[Any]
    duplicates: list[Any]
    rows_per_part: int

    def result(self) -> Plan:
        import ray

        per_file = ray.get(self.parts)
        return Plan([p for file_parts in per_file for p in file_parts],
                    duplicates_by_part(ray.get(self.duplicates), self.rows_per_part))


def start_plan(cfg: CrawlConfig, store: PartStore, files: list[tuple[str, str, Any]]) -> PlanJob:
    """Launch the plan tasks and the duplicate reducers for (uri, format, file info) list files; returns at
    once. One reducer per 256 MiB of lists (at most 64): a small crawl starts no more processes than it needs."""
    import ray

    total = sum(int(getattr(info, "size", 0) or 0) for _, _, info in files)
    buckets = max(1, min(64, total // (256 << 20) + 1))
    task = ray.remote(plan_file).options(num_returns=buckets + 1, num_cpus=0.25, **data_args())
    refs = [task.remote(cfg, store, i, uri, fmt, buckets) for i, (uri, fmt, _) in enumerate(files)]
    reduce = ray.remote(find_duplicates).options(num_cpus=0.25, **data_args())
    dups = [reduce.remote(*[r[1 + b] for r in refs]) for b in range(buckets)]
    return PlanJob([r[0] for r in refs], dups, cfg.rows_per_part)


def plan_file(cfg: CrawlConfig, store: PartStore, index: int, uri: str, fmt: str, buckets: int) -> tuple:
    """One input file -> its parts' todo files (rows_per_part rows each, in file order), plus the keys of its
    good rows split into `buckets` arrays for the duplicate check (returned as separate Ray objects)."""
    storage = Storage.from_uri(uri, cfg.input_s3)
    parts: list[tuple[str, int]] = []
    ids: list[np.ndarray] = []
    pending: list[pa.Table] = []
    pending_rows = row = 0
    for table in iter_list_rows(cfg.input, storage.fs, storage.root, fmt):
        good = pc.is_null(table.column("error"))
        positions = np.flatnonzero(good.to_numpy(zero_copy_only=False)) + row
        ids.append(_key_ids(table.filter(good).column("key").to_pylist(), index, positions))
        row += table.num_rows
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= cfg.rows_per_part:
            whole = pa.concat_tables(pending)
            parts.append(_write_todo(store, index, len(parts), whole.slice(0, cfg.rows_per_part)))
            rest = whole.slice(cfg.rows_per_part)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        parts.append(_write_todo(store, index, len(parts), pa.concat_tables(pending)))
    keyed = np.concatenate(ids) if ids else np.empty(0, _ROW_ID)
    bucket = (keyed["hi"] % np.uint64(buckets)).astype(np.int64)
    return (parts, *(keyed[bucket == b] for b in range(buckets)))


def find_duplicates(*arrays: np.ndarray) -> pa.Table:
    """Every row whose key an earlier row (lower file, then row) already has: (file, row, first_file, first_row)."""
    ids = np.concatenate(arrays) if arrays else np.empty(0, _ROW_ID)
    ids.sort(order=["hi", "lo", "file", "row"])
    same = (ids["hi"][1:] == ids["hi"][:-1]) & (ids["lo"][1:] == ids["lo"][:-1])
    later = np.flatnonzero(same) + 1
    # the first occurrence of each run of equal keys: the nearest earlier position that starts a run
    starts = np.flatnonzero(np.r_[True, ~same])
    first = starts[np.searchsorted(starts, later, side="right") - 1]
    return pa.table({"file": ids["file"][later], "row": ids["row"][later],
                     "first_file": ids["file"][first], "first_row": ids["row"][first]})


def duplicates_by_part(tables: list[pa.Table], rows_per_part: int) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for t in tables:
        for f, row, ff, fr in zip(*(t.column(c).to_pylist() for c in ("file", "row", "first_file", "first_row"))):
            out.setdefault(part_of(f, row // rows_per_part), {})[row % rows_per_part] = (
                f"{part_of(ff, fr // rows_per_part)} row {fr % rows_per_part}")
    return out


def _key_ids(keys: list[str], file_index: int, rows: np.ndarray) -> np.ndarray:
    out = np.empty(len(keys), _ROW_ID)
    out["hi"] = [int(k[:16], 16) for k in keys]
    out["lo"] = [int(k[16:24], 16) for k in keys]
    out["file"] = file_index
    out["row"] = rows
    return out


def _write_todo(store: PartStore, index: int, chunk: int, table: pa.Table) -> tuple[str, int]:
    name = part_of(index, chunk)
    store.storage.write_parquet(table, todo_path(name))
    return name, table.num_rows
