"""Ingest: a download made with img2dataset (or any WebDataset) -> sample rows with a manifest, so filter,
dedup and shard run on it as on a crawl.

    python -m pipelines.ingest --config configs/ingest.yaml [input=DIR] [key=value ...]

The whole DAG starts from it too, in place of the crawl, when the run config sets ingest.input:
`python -m pipelines.run --config configs/run_tiny.yaml crawl=null ingest.input=DIR` (pipelines/run/dag.py).

img2dataset writes shards `00000.parquet` (output_format=parquet: one row per input URL, the image bytes
in a `jpg`/`png`/`webp` column, null when the download failed) or `00000.tar` + `00000.parquet`
(output_format=webdataset: the tar holds each downloaded sample as `KEY.jpg`, `KEY.txt`, `KEY.json`; the
parquet beside it holds every row's metadata, failures included). Each shard is one part. Every input
row becomes a sample row (key, url, caption, query, image, sizes, sha256, phash) or a rejected row with a
reason: img2dataset's own failures keep its status (`img2dataset_failed_to_download`, detail = its error
message); then `caption_missing`, `invalid_utf8_caption`, `image_missing`, `image_undecodable`,
`bad_json` (a .json member that is not a JSON object), `duplicate_input_row` (the same url and caption
twice in one shard), `missing_from_tar` (a success the metadata lists that the tar does not hold, e.g. a
truncated tar), `unreadable_tar` / `unreadable_file` (the rest of a shard that cannot be read: one row).

Images are kept byte for byte (img2dataset already resized them); sha256 and phash are computed here on
those bytes (img2dataset's sha256 is of the downloaded original, not of what it stored).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.core.images import decode_caption, phash_of_encoded
from pipelines.core.manifest import Manifest, fingerprint
from pipelines.core.parts import OutputConfig, PartResult, PartStore, already_committed, finish_stage, part_name, \
    run_file_parts
from pipelines.core.runtime import RayConfig, init_ray
from pipelines.core.schema import SAMPLE_SCHEMA, rejected_table, sample_key
from pipelines.core.stage import Stage, Wiring
from pipelines.core.storage import S3Options, Storage

NAME = "ingest"
FORMATS = ("auto", "parquet", "webdataset")
# img2dataset's encode_format values, and what other WebDataset writers name their images.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# WebDataset's rule: a member's key is its path up to the first dot of its file name.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class IngestConfig:
    # img2dataset's output folder (local or s3://): its NNNNN.parquet shards, or NNNNN.tar shards with the
    # NNNNN.parquet metadata img2dataset writes beside them. Any other WebDataset folder works too.
    input: str = ""
    input_s3: S3Options = field(default_factory=S3Options)
    # auto (tars present -> webdataset, else parquet), parquet or webdataset.
    format: str = "auto"
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # A metadata column (img2dataset's save_additional_columns, or a key of the .json) to use as the query,
    # for filter's per-query cap. null = no query ("").
    query_column: str | None = None
    # Parallel shard workers; None = all logical CPUs.
    workers: int | None = None
    # Buffered bytes after which a part flushes a row group (bounds a worker's memory on large shards).
    flush_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("ingest.input is empty: give img2dataset's output folder")
        if self.format not in FORMATS:
            raise ValueError(f"ingest.format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.flush_bytes < 1:
            raise ValueError(f"ingest.flush_bytes must be >= 1, got {self.flush_bytes}")


# ------------------------------------------------------------------------------------------- one row


@dataclass
class _Rows:
    """A part's output, row by row: kept rows stream to the writer, rejects are held (they are small)."""

    writer: Any
    query_column: str | None
    rows_in: int = 0
    seen: set[str] = field(default_factory=set)
    rejected: dict[str, list] = field(default_factory=lambda: {"key": [], "url": [], "reason": [], "detail": []})

    def reject(self, key: str, url: str, reason: str, detail: str = "") -> None:
        self.rows_in += 1
        for name, value in (("key", key), ("url", url), ("reason", reason), ("detail", detail[:500])):
            self.rejected[name].append(value)

    def add(self, source: str, image: bytes | None, caption: Any, meta: dict[str, Any]) -> None:
        """One input sample -> kept or rejected; `source` is its key in the input, for rejects without a url.
        Nothing about the row may raise: unknown failures are `internal_error` with the exception. (A failing
        write is not the row's fault and does stop the part.)"""
        url = meta.get("url") if isinstance(meta.get("url"), str) else ""
        try:
            row = self._row(source, url, image, caption, meta)
        except Exception as err:  # noqa: BLE001 - the row's boundary: no row can stop a part
            return self.reject(source, url, "internal_error", f"{type(err).__name__}: {err}")
        if row is not None:
            self.writer.add(row, len(row["image"]))
            self.seen.add(row["key"])
            self.rows_in += 1

    def _row(self, source: str, url: str, image: bytes | None, caption: Any, meta: dict[str, Any]) -> dict | None:
        text = decode_caption(caption)
        if not text.ok:
            return self.reject(source, url, text.reason)
        if not image:
            return self.reject(source, url, "image_missing")
        key = sample_key(url, text.text)
        if key in self.seen:
            return self.reject(key, url, "duplicate_input_row", f"input key {source}")
        try:
            phash = phash_of_encoded(image)
            width, height = _displayed_size(image)
        except (ValueError, OSError, SyntaxError) as err:
            return self.reject(source, url, "image_undecodable", str(err))
        query = meta.get(self.query_column) if self.query_column else None
        return {
            "key": key, "url": url, "caption": text.text, "query": "" if query is None else str(query),
            "image": bytes(image), "width": width, "height": height,
            "original_width": _int_or(meta.get("original_width"), width),
            "original_height": _int_or(meta.get("original_height"), height),
            "sha256": hashlib.sha256(image).hexdigest(), "phash": phash,
        }

    def table(self) -> pa.Table:
        r = self.rejected
        return rejected_table(r["key"], r["url"], NAME, r["reason"], r["detail"])


def _displayed_size(image: bytes) -> tuple[int, int]:
    """(width, height) as shown: EXIF orientations 5-8 turn the picture a quarter."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def _int_or(value: Any, default: int) -> int:
    try:
        if value is None or value != value:  # None or NaN (pandas wrote a failed row's size as NaN)
            return default
        return int(value)
    except (TypeError, ValueError):
        return default


def _failure(meta: dict[str, Any]) -> tuple[str, str] | None:
    """img2dataset's verdict on a row that it did not store: (reason, its error message)."""
    status = meta.get("status")
    if status is None or status == "success":
        return None
    return f"img2dataset_{status}", str(meta.get("error_message") or "")


# ------------------------------------------------------------------------------------------- one shard


class IngestShards:
    """Ray Data callable class: one input shard per call, committed as one part."""

    def __init__(self, inp: Storage, store: PartStore, cfg: IngestConfig) -> None:
        self.inp, self.store, self.cfg = inp, store, cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out = []
        for path, name, kind in zip(batch["path"], batch["name"], batch["kind"]):
            out.append((self.store.done(name) or self.ingest(name, path, kind)).dumps())
        return {"result": out}

    def ingest(self, name: str, path: str, kind: str) -> PartResult:
        writer = self.store.writer(name, SAMPLE_SCHEMA, self.cfg.flush_bytes)
        rows = _Rows(writer, self.cfg.query_column)
        try:
            if kind == "webdataset":
                self._tar(path, rows)
            else:
                self._parquet(path, rows)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        kept = rows.rows_in - len(rows.rejected["key"])
        return self.store.finish(name, files, kept, rows.table(), rows.rows_in)

    def _parquet(self, path: str, rows: _Rows) -> None:
        try:
            with self.inp.open_input(path) as fh:
                self._parquet_rows(pq.ParquetFile(fh), rows)
        except (OSError, pa.ArrowException) as err:
            rows.reject(path, "", "unreadable_file", f"{type(err).__name__}: {err}")

    def _parquet_rows(self, f: pq.ParquetFile, rows: _Rows) -> None:
        names = f.schema_arrow.names
        image_col = next((c for c in IMAGE_EXTENSIONS if c in names), None)
        caption_col = "txt" if "txt" in names else "caption"
        for batch in f.iter_batches(batch_size=256):
            for meta in batch.to_pylist():
                source = str(meta.get("key") or "")
                failed = _failure(meta)
                if failed and not (image_col and meta.get(image_col)):
                    rows.reject(source, meta.get("url") or "", *failed)
                    continue
                rows.add(source, meta.get(image_col) if image_col else None, meta.get(caption_col), meta)

    def _tar(self, path: str, rows: _Rows) -> None:
        expected = self._sidecar(path)  # img2dataset's metadata of every row of the shard, by its key
        try:
            with self.inp.open_input(path) as stream:
                for source, members in _tar_samples(stream):
                    meta_bytes = members.get("json")
                    meta: dict[str, Any] = {}
                    if meta_bytes is not None:
                        try:
                            meta = json.loads(meta_bytes)
                        except (ValueError, UnicodeDecodeError):
                            meta = None  # type: ignore[assignment]
                        if not isinstance(meta, dict):
                            rows.reject(source, "", "bad_json", meta_bytes[:200].decode("utf-8", "replace"))
                            expected.pop(os.path.basename(source), None)
                            continue
                    known = expected.pop(os.path.basename(source), None) or {}
                    meta = {**known, **meta}
                    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    caption = members["txt"] if "txt" in members else meta.get("caption")
                    rows.add(source, image, caption, meta)
        except (OSError, tarfile.TarError, EOFError, pa.ArrowException) as err:
            if not expected:  # nothing tells how many rows were lost: one row stands for the rest
                rows.reject(path, "", "unreadable_tar", f"{type(err).__name__}: {err}")
        for source, meta in expected.items():
            failed = _failure(meta)
            rows.reject(source, meta.get("url") or "", *(failed or ("missing_from_tar", path)))

    def _sidecar(self, tar_path: str) -> dict[str, dict[str, Any]]:
        """img2dataset's NNNNN.parquet beside NNNNN.tar (no images in it), else {}."""
        stem = tar_path[: -len(next(s for s in _TAR_SUFFIXES if tar_path.endswith(s)))]
        meta_path = stem + ".parquet"
        if not self.inp.exists(meta_path):
            return {}
        try:
            table = pq.read_table(self.inp.open_input(meta_path))
        except (OSError, pa.ArrowException):
            return {}
        return {str(m.get("key")): m for m in table.to_pylist() if m.get("key") is not None}


def _tar_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, streaming: WebDataset writers put a sample's members together."""
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            m = _MEMBER.match(info.name)
            if not m or os.path.basename(info.name).startswith(("_", ".")):
                continue
            if m.group(1) != key:  # the previous sample is complete: hand it on before reading further
                if key is not None:
                    yield key, members
                key, members = m.group(1), {}
            members[m.group(2).lower()] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


# ------------------------------------------------------------------------------------------- the stage


def input_shards(cfg: IngestConfig) -> tuple[Storage, list[dict[str, Any]]]:
    """The shards to ingest, in name order, each a part: [{path, name, kind, size, mtime_ns}]."""
    inp = Storage.from_uri(cfg.input, cfg.input_s3)
    files = [f for f in inp.list("") if not os.path.basename(f).startswith(("_", "."))]
    tars = [f for f in files if f.endswith(_TAR_SUFFIXES)]
    kind = cfg.format if cfg.format != "auto" else ("webdataset" if tars else "parquet")
    chosen = tars if kind == "webdataset" else [f for f in files if f.endswith(".parquet")]
    if not chosen:
        raise FileNotFoundError(f"ingest.input {cfg.input}: no {'.tar' if kind == 'webdataset' else '.parquet'} "
                                f"shards there (format={cfg.format})")
    out = []
    for i, path in enumerate(chosen):
        info = inp.fs.get_file_info(inp.fs_path(path))
        out.append({"path": path, "name": part_name(i), "kind": kind, "size": info.size,
                    "mtime_ns": info.mtime_ns or 0})
    return inp, out


def fingerprint_of(cfg: IngestConfig) -> str:
    """The settings that shape rows, and the shards by path, size and modification time (as the crawl does)."""
    _, shards = input_shards(cfg)
    conf = {"query_column": cfg.query_column,
            "shards": [f"{s['path']}:{s['kind']}:{s['size']}:{s['mtime_ns']}" for s in shards]}
    return fingerprint(NAME, conf)


def run(cfg: IngestConfig) -> Manifest:
    started = time.time()
    inp, shards = input_shards(cfg)
    fp = fingerprint_of(cfg)
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    existing = already_committed(out, NAME, fp)
    if existing is not None:
        return existing
    init_ray(cfg.ray)
    store = PartStore(out, NAME, fp, cfg.output.row_group_size)
    items = [{"path": s["path"], "name": s["name"], "kind": s["kind"]} for s in shards]
    parts = run_file_parts(items, IngestShards, {"inp": inp, "store": store, "cfg": cfg}, cfg.workers)
    return finish_stage(out, NAME, fp, parts, SAMPLE_SCHEMA, to_dict(cfg), started, [cfg.input],
                        extra={"format": shards[0]["kind"], "shards": {s["name"]: s["path"] for s in shards}})


def _wire(cfg: IngestConfig, w: Wiring) -> IngestConfig:
    import dataclasses

    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, path=w.output or cfg.output.path, s3=w.s3),
                               ray=w.ray)


def _check_input(cfg: IngestConfig) -> None:
    """The input holds shards of the configured format (in a DAG run: before any stage starts)."""
    input_shards(cfg)


# The DAG's other source (pipelines/run/dag.py: SOURCES): a run whose config sets ingest.input starts here.
STAGE = Stage(
    name=NAME, section=IngestConfig, default=None, doc="img2dataset / WebDataset downloads as sample rows",
    upstream=None, wired=("output.path", "output.s3", "ray"), wire=_wire, fingerprint=fingerprint_of, run=run,
    validate=_check_input, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("ingest", IngestConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
