"""Read URL + caption lists into a Ray Dataset of (url, caption_bytes, query) rows.

Formats: Parquet (also img2dataset's own output), CSV, TSV and JSONL, each optionally gzipped.
Captions are carried as bytes until the crawl decodes them, so an invalid UTF-8 caption becomes a
counted rejection ("invalid_utf8_caption") instead of a reader crash that loses the whole file.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray.data

from .stage import data_args

FORMATS = ("parquet", "csv", "tsv", "jsonl")


@dataclass
class InputConfig:
    # Files or directories of URL lists (local paths or s3:// URIs).
    paths: list[str] = field(default_factory=list)
    # "auto" picks by extension (.parquet, .csv, .tsv, .jsonl/.json, each optionally + .gz).
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    # Column names; img2dataset's defaults.
    url_col: str = "url"
    caption_col: str = "caption"
    # Optional column naming the metadata query / source (used by the per-query cap). None = none.
    query_col: str | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("input.paths is empty: give at least one URL list file or directory")


def detect_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    fmt = {"parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}.get(ext)
    if fmt is None:
        raise ValueError(f"cannot tell the format of URL list {path!r} from its extension; set input.format "
                         f"to one of {FORMATS}")
    return fmt


def _normalise(table: pa.Table, cfg: InputConfig, source: str) -> pa.Table:
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in table.column_names]
    if missing:
        raise ValueError(f"URL list {source} has no column(s) {missing}; its columns are {table.column_names}. "
                         f"Set input.url_col / input.caption_col.")
    n = table.num_rows
    url = pc.cast(table[cfg.url_col], pa.string())
    caption = table[cfg.caption_col]
    if not pa.types.is_binary(caption.type):
        caption = pc.cast(pc.cast(caption, pa.string()), pa.binary())
    if cfg.query_col and cfg.query_col in table.column_names:
        query = pc.cast(table[cfg.query_col], pa.string())
    elif cfg.query_col:
        raise ValueError(f"URL list {source} has no query column {cfg.query_col!r}; its columns are "
                         f"{table.column_names}")
    else:
        query = pa.array([""] * n, pa.string())
    return pa.table({"url": url, "caption_bytes": caption, "query": query})


def _jsonl_lines(batch: dict[str, Any], cfg: InputConfig) -> dict[str, list]:
    """Parse JSONL files line by line: a malformed line is kept as an 'input_parse_error' row."""
    urls, caps, queries = [], [], []
    for raw, path in zip(batch["bytes"], batch["path"]):
        # Ray decompresses .gz by extension already; a gzip magic left means it did not.
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
                url = obj[cfg.url_col]
                cap = obj.get(cfg.caption_col)
            except (ValueError, KeyError, TypeError, AttributeError):
                urls.append(f"invalid-input://{path}#L{lineno}")
                caps.append(line[:200])
                queries.append("")
                continue
            urls.append(str(url))
            caps.append(cap.encode("utf-8", "surrogateescape") if isinstance(cap, str) else None)
            queries.append(str(obj.get(cfg.query_col, "")) if cfg.query_col else "")
    return {"url": urls, "caption_bytes": caps, "query": queries}


def check_columns(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, fmt: str) -> None:
    """Fail on the driver, naming the file, before any Ray task starts (JSONL rows are checked per line)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open_input_file(path) as f:
            columns = pq.read_schema(f).names
    elif fmt in ("csv", "tsv"):
        with filesystem.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
            header = f.read(64 * 1024).split(b"\n", 1)[0].decode("utf-8", "replace").strip("\r")
        columns = [c.strip('"') for c in header.split("\t" if fmt == "tsv" else ",")]
    else:
        return
    wanted = [cfg.url_col, cfg.caption_col] + ([cfg.query_col] if cfg.query_col else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"URL list {path} has no column(s) {missing}; its columns are {columns}. "
                         f"Set input.url_col / input.caption_col / input.query_col.")


def read_url_list(cfg: InputConfig, filesystem: pa.fs.FileSystem | None = None,
                  paths: list[str] | None = None) -> ray.data.Dataset:
    """One dataset over all input files; all files must share one format."""
    paths = paths or cfg.paths
    formats = {cfg.format if cfg.format != "auto" else detect_format(p) for p in paths}
    if len(formats) != 1:
        raise ValueError(f"input.paths mix formats {sorted(formats)}; run one crawl per format or set input.format")
    fmt = formats.pop()
    if filesystem is not None:
        for p in paths:
            check_columns(cfg, filesystem, p, fmt)
    gz = any(p.endswith(".gz") for p in paths)
    stream_args = {"compression": "gzip"} if gz else None
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=filesystem, ray_remote_args=data_args())
        return ds.map_batches(_normalise, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "source": str(paths)}, **data_args())
    if fmt in ("csv", "tsv"):
        column_types = {cfg.caption_col: pa.binary(), cfg.url_col: pa.string()}
        ds = ray.data.read_csv(
            paths, filesystem=filesystem, arrow_open_stream_args=stream_args,
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
            convert_options=pacsv.ConvertOptions(column_types=column_types), ray_remote_args=data_args())
        return ds.map_batches(_normalise, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "source": str(paths)}, **data_args())
    ds = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True, ray_remote_args=data_args())
    return ds.map_batches(_jsonl_lines, fn_kwargs={"cfg": cfg}, **data_args())
