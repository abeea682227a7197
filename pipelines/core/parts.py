"""What every data stage shares: part-wise commits and the manifest at the end.

A stage splits its work into parts with deterministic names (`part-00012`). A part writes its kept
rows to `part-00012.parquet`, its rejected rows to `_rejected/part-00012.parquet`, and last a small
marker `_parts/part-00012.json` holding its counts and the stage fingerprint. A rerun skips parts
whose marker carries the same fingerprint and redoes the rest (overwriting by name, so no
duplicates). When all parts are done the driver writes `_manifest.json`, the commit: readers read
only the files it lists, so a stage killed midway leaves nothing a reader would take for a result.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines.core.manifest import Manifest, schema_fields, write_manifest
from pipelines.core.runtime import data_args
from pipelines.core.storage import S3Options, Storage


@dataclass
class OutputConfig:
    # Where the stage writes: a local directory or s3://bucket/prefix.
    path: str = "out"
    # Parquet row group size for data files (streaming readers read one group at a time).
    row_group_size: int = 1000
    # Connection settings when path is on S3 (credentials come from the AWS env/profile, never here).
    s3: S3Options = field(default_factory=S3Options)


def part_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass
class PartResult:
    name: str
    rows_in: int
    rows_out: int
    rejected: dict[str, int]
    files: list[dict[str, Any]]  # [{path, rows, bytes}] data files, relative to the stage dir
    rejected_files: list[dict[str, Any]]
    skipped: bool = False  # already committed by an earlier run
    # Stage-specific measurements of the part (e.g. the crawl's peak memory and bytes fetched).
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "skipped"}

    def dumps(self) -> str:
        """For returning from a Ray task: one short string per part."""
        return json.dumps({**self.to_json(), "skipped": self.skipped})

    @staticmethod
    def loads(text: str) -> "PartResult":
        return PartResult(**json.loads(text))


class PartStore:
    """Commits and finds parts of one stage output directory. Picklable; safe to use from Ray tasks."""

    def __init__(self, storage: Storage, stage: str, fingerprint: str, row_group_size: int = 1000) -> None:
        self.storage = storage
        self.stage = stage
        self.fingerprint = fingerprint
        self.row_group_size = row_group_size

    def done(self, name: str) -> PartResult | None:
        marker = f"_parts/{name}.json"
        if not self.storage.exists(marker):
            return None
        data = json.loads(self.storage.read_bytes(marker))
        if data.get("fingerprint") != self.fingerprint:
            return None  # written by a run with another config: redo
        data.pop("fingerprint")
        return PartResult(**data, skipped=True)

    def commit(self, name: str, kept: pa.Table, rejected: pa.Table, rows_in: int,
               stats: dict[str, Any] | None = None) -> PartResult:
        files = []
        if kept.num_rows:
            path = f"{name}.parquet"
            size = self.storage.write_parquet(kept, path, row_group_size=self.row_group_size)
            files.append({"path": path, "rows": kept.num_rows, "bytes": size})
        return self.finish(name, files, kept.num_rows, rejected, rows_in, stats)

    def writer(self, name: str, schema: pa.Schema, flush_bytes: int) -> PartWriter:
        """Kept rows streamed to `name.parquet` a row group at a time; `finish` the part after closing it."""
        return PartWriter(self.storage, f"{name}.parquet", schema, self.row_group_size, flush_bytes)

    def finish(self, name: str, files: list[dict[str, Any]], rows_out: int, rejected: pa.Table, rows_in: int,
               stats: dict[str, Any] | None = None) -> PartResult:
        """Write the part's rejected rows, then its marker (last: a part without one is redone on rerun)."""
        if rows_out + rejected.num_rows != rows_in:
            raise AssertionError(f"{self.stage} {name}: {rows_in} rows in but {rows_out} kept + "
                                 f"{rejected.num_rows} rejected; every input row must be accounted for")
        rejected_files = []
        if rejected.num_rows:
            path = f"_rejected/{name}.parquet"
            size = self.storage.write_parquet(rejected, path)
            rejected_files.append({"path": path, "rows": rejected.num_rows, "bytes": size})
        reasons = Counter(rejected.column("reason").to_pylist()) if rejected.num_rows else Counter()
        result = PartResult(name, rows_in, rows_out, dict(sorted(reasons.items())), files, rejected_files,
                            stats=stats or {})
        self.storage.write_bytes(f"_parts/{name}.json",
                                 json.dumps({**result.to_json(), "fingerprint": self.fingerprint}).encode())
        return result


class PartWriter:
    """Streams rows into one Parquet file, flushing a row group at `row_group_size` rows or `flush_bytes`
    buffered bytes, so a part's memory does not grow with its row count. The file may be partial until
    `close`; only a part marker written after it (PartStore.finish) makes it count."""

    def __init__(self, storage: Storage, path: str, schema: pa.Schema, row_group_size: int, flush_bytes: int) -> None:
        self.storage, self.path, self.schema = storage, path, schema
        self.row_group_size, self.flush_bytes = row_group_size, flush_bytes
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffered_bytes = 0
        self._stream: pa.NativeFile | None = None
        self._writer: Any = None

    def add(self, row: dict[str, Any], nbytes: int) -> None:
        self._buffer.append(row)
        self._buffered_bytes += nbytes
        if len(self._buffer) >= self.row_group_size or self._buffered_bytes >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        import pyarrow.parquet as pq

        if self._writer is None:
            self._stream = self.storage.open_output(self.path)
            self._writer = pq.ParquetWriter(self._stream, self.schema)
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
        self.rows += len(self._buffer)
        self._buffer, self._buffered_bytes = [], 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the file; the manifest entries for it ([] when no row was kept)."""
        self._flush()
        if self._writer is None:
            return []
        self._writer.close()
        assert self._stream is not None
        self._stream.close()
        return [{"path": self.path, "rows": self.rows, "bytes": self.storage.size(self.path)}]

    def abort(self) -> None:
        """Drop what was buffered and close the stream without committing anything (the part is redone)."""
        self._buffer = []
        for closer in (self._writer, self._stream):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # noqa: BLE001 - best effort on a path that is already failing
                    pass


def already_committed(storage: Storage, stage: str, fp: str) -> Manifest | None:
    """manifest.committed, said aloud: a stage run again on the same config and inputs does nothing."""
    from pipelines.core.manifest import committed

    existing = committed(storage, fp)
    if existing is not None:
        print(f"{stage}: {storage.uri()} already committed with this config and input; nothing to do", flush=True)
    return existing


def run_file_parts(items: list[dict[str, Any]], worker_cls: type, ctor: dict[str, Any],
                   workers: int | None = None, *, stateful: bool = False) -> list[PartResult]:
    """One part per input file: `worker_cls(**ctor)` runs on batches of one item, each returning
    {"result": [PartResult.dumps()]}. Only these short strings reach the driver.
    `workers` = files in flight at most; None = one per logical CPU of the cluster.

    stateful=False (the worker holds only its arguments): each file is a Ray task that builds the worker for
    itself. Task workers are processes Ray keeps and reuses across every stage of a run, so a stage needs no
    processes of its own. stateful=True (the worker loads something costly, a model): an actor pool, which loads
    it once per actor (a new process each)."""
    import ray
    import ray.data

    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    cap = max(1, min(workers, len(items)))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if stateful:
        mapped = ds.map_batches(worker_cls, batch_size=1, fn_constructor_kwargs=ctor, concurrency=(1, cap),
                                num_cpus=1, **data_args())
    else:
        mapped = ds.map_batches(_run_part, batch_size=1, fn_kwargs={"worker_cls": worker_cls, "ctor": ctor},
                                concurrency=cap, num_cpus=1, **data_args())
    return collect_parts(mapped, len(items))


def _run_part(batch: dict[str, Any], worker_cls: type, ctor: dict[str, Any]) -> dict[str, list]:
    """A stateless part worker as a Ray task: built for this batch, then called on it."""
    return worker_cls(**ctor)(batch)


def collect_parts(ds: Any, total: int) -> list[PartResult]:
    """Run `ds`, whose rows are {"result": PartResult.dumps()} ("" = nothing done for that item), and gather
    the parts as they finish, counting them (and their input rows) on the stage's status line."""
    from pipelines.core import console

    parts, rows = [], 0
    console.progress(done=0, total=total, unit="parts")
    for row in ds.iter_rows():
        if row["result"]:
            parts.append(PartResult.loads(row["result"]))
            rows += parts[-1].rows_in
            console.progress(done=len(parts), rows=rows)
    return parts


def finish_stage(storage: Storage, stage: str, fingerprint: str, parts: list[PartResult], schema: pa.Schema,
                 config: dict[str, Any], started: float, inputs: list[str], extra: dict[str, Any] | None = None,
                 timings: dict[str, float] | None = None) -> Manifest:
    """Write the manifest (the commit) from all parts' results and print the funnel."""
    from pipelines.core.manifest import format_funnel

    parts = sorted(parts, key=lambda p: p.name)
    rejected: Counter = Counter()
    for p in parts:
        rejected.update(p.rejected)
    rows_in = sum(p.rows_in for p in parts)
    rows_out = sum(p.rows_out for p in parts)
    if rows_in != rows_out + sum(rejected.values()):
        raise AssertionError(f"{stage}: funnel does not add up: {rows_in} in, {rows_out} out, "
                             f"{sum(rejected.values())} rejected")
    manifest = Manifest(
        stage=stage,
        fingerprint=fingerprint,
        files=[f for p in parts for f in p.files],
        schema=schema_fields(schema),
        rows_in=rows_in,
        rows_out=rows_out,
        rejected=dict(sorted(rejected.items())),
        timings={"total_s": round(time.time() - started, 3), **(timings or {})},
        config=config,
        extra={"rejected_files": [f for p in parts for f in p.rejected_files],
               "parts_reused": sum(p.skipped for p in parts), "inputs": inputs, **(extra or {})},
    )
    write_manifest(storage, "", manifest)
    from pipelines.core import console

    console.end()  # the stage's status line stays above its funnel
    print(format_funnel(manifest), flush=True)
    return manifest
