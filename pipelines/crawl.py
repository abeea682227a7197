"""Stage 1, crawl: URL + caption lists -> sample rows (downloaded, verified, resized, hashed).

    python -m pipelines.crawl --config configs/crawl.yaml [key=value ...]

Ray Data reads the URL lists, gives every row its stable key and a part number (hash of the key),
groups rows by part, and a pool of crawler actors fetches each part with many concurrent requests
(threads: the work is network-bound) through the safe fetcher. A part commits its files and then a
marker, so a killed crawl resumes from the parts it already committed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa

from .config import parse_cli, to_dict
from .fetch import FetchConfig, SafeFetcher
from .images import ImageConfig, process_image
from .manifest import Manifest, fingerprint
from .schema import REJECTED_SCHEMA, SAMPLE_SCHEMA, sample_key
from .stage import (OutputConfig, PartResult, PartStore, RayConfig, already_committed, data_args, finish_stage, init_ray,
                    part_name)
from .storage import S3Options, Storage
from .url_lists import InputConfig, read_url_list

STAGE = "crawl"


@dataclass
class CrawlConfig:
    input: InputConfig = field(default_factory=InputConfig)
    # s3 settings used when input paths are s3:// URIs.
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Rows per part: the unit of commit and resume. Parts hold their images in memory while fetching.
    rows_per_part: int = 2000
    # Concurrent requests inside one crawler actor.
    threads_per_worker: int = 32
    # Crawler actors; None = one per two logical CPUs of the cluster (fetching is I/O bound).
    workers: int | None = None
    # Upper bound on hash-shuffle partitions when grouping rows into parts (Ray's default, 200, costs
    # seconds of overhead on small clusters; parts never need more partitions than there are parts).
    shuffle_partitions: int = 64

    def __post_init__(self) -> None:
        if self.rows_per_part < 1:
            raise ValueError(f"crawl.rows_per_part must be >= 1, got {self.rows_per_part}")
        if self.threads_per_worker < 1:
            raise ValueError(f"crawl.threads_per_worker must be >= 1, got {self.threads_per_worker}")


def _assign_parts(batch: pa.Table, num_parts: int) -> pa.Table:
    urls = batch.column("url").to_pylist()
    caps = batch.column("caption_bytes").to_pylist()
    keys = [sample_key(u or "", (c or b"").decode("utf-8", "replace")) for u, c in zip(urls, caps)]
    parts = [int(k[:12], 16) % num_parts for k in keys]
    return batch.append_column("key", pa.array(keys, pa.string())).append_column("part", pa.array(parts, pa.int32()))


def _reject(rows: list[dict], key: str, url: str, reason: str, detail: str = "") -> None:
    rows.append({"key": key, "url": url, "stage": STAGE, "reason": reason, "detail": detail})


class CrawlPart:
    """One actor: fetches whole parts. Holds the fetcher (robots.txt cache, per-host limits) across parts."""

    def __init__(self, cfg: CrawlConfig, store: PartStore) -> None:
        self.cfg = cfg
        self.store = store
        self.fetcher = SafeFetcher(cfg.fetch)

    def __call__(self, group: pa.Table) -> pa.Table:
        name = part_name(int(group.column("part")[0].as_py()))
        result = self.store.done(name) or self._crawl(name, group)
        return pa.table({"part": [name], "result": [result.dumps()]})

    def _crawl(self, name: str, group: pa.Table) -> PartResult:
        group = group.sort_by("key")
        rows_in = group.num_rows
        rejected: list[dict] = []
        todo: list[tuple[str, str, str, str]] = []  # key, url, caption, query
        seen: set[str] = set()
        for key, url, cap, query in zip(group.column("key").to_pylist(), group.column("url").to_pylist(),
                                        group.column("caption_bytes").to_pylist(), group.column("query").to_pylist()):
            url = url or ""
            if key in seen:
                _reject(rejected, key, url, "duplicate_input_row", "same url and caption as an earlier row")
                continue
            seen.add(key)
            if url.startswith("invalid-input://"):
                _reject(rejected, key, url, "input_parse_error")
                continue
            if cap is None:
                _reject(rejected, key, url, "caption_missing")
                continue
            try:
                caption = cap.decode("utf-8")
            except UnicodeDecodeError as err:
                _reject(rejected, key, url, "invalid_utf8_caption", str(err)[:200])
                continue
            todo.append((key, url, caption, query or ""))
        fetched = self.fetcher.fetch_many([t[1] for t in todo], max_workers=self.cfg.threads_per_worker)
        kept: list[dict] = []
        for (key, url, caption, query), res in zip(todo, fetched):
            if not res.ok:
                _reject(rejected, key, url, res.reason, f"status={res.status}" if res.status else "")
                continue
            img = process_image(res.body, self.cfg.image)
            if not img.ok:
                _reject(rejected, key, url, img.reason)
                continue
            kept.append({"key": key, "url": url, "caption": caption, "query": query, "image": img.image,
                         "width": img.width, "height": img.height, "original_width": img.original_width,
                         "original_height": img.original_height, "sha256": img.sha256, "phash": img.phash})
        kept_table = pa.Table.from_pylist(kept, schema=SAMPLE_SCHEMA)
        rejected_table = pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA)
        return self.store.commit(name, kept_table, rejected_table, rows_in)


def _resolve_inputs(cfg: CrawlConfig) -> tuple[pa.fs.FileSystem, list[str]]:
    """Expand directories to their files; all inputs must live on one filesystem."""
    storages, paths = [], []
    for path in cfg.input.paths:
        st = Storage.from_uri(path, cfg.input_s3)
        files = st.list("") if not _is_file(st) else [""]
        if not files:
            raise FileNotFoundError(f"URL list {path} is empty or does not exist")
        storages.append(st)
        paths += [st.fs_path(f) for f in files if not os.path.basename(f).startswith(("_", "."))]
    return storages[0].fs, paths


def _is_file(st: Storage) -> bool:
    import pyarrow.fs as pafs

    return st.fs.get_file_info(st.root).type == pafs.FileType.File


def _prepare(cfg: CrawlConfig):
    fs, paths = _resolve_inputs(cfg)
    # Path, size and modification time, as make decides: an edited list reruns the crawl even when its size
    # is unchanged (a URL swapped for one of equal length), without reading lists that may be gigabytes.
    infos = [fs.get_file_info(p) for p in paths]
    fp = fingerprint(STAGE, {**_fingerprint_config(cfg),
                             "input_files": [f"{p}:{i.size}:{i.mtime_ns}" for p, i in zip(paths, infos)]})
    return fs, paths, fp


def fingerprint_of(cfg: CrawlConfig) -> str:
    """What run(cfg) would commit under: the settings that shape the result and the URL lists (path, size,
    modification time)."""
    return _prepare(cfg)[2]


def run(cfg: CrawlConfig) -> Manifest:
    started = time.time()
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    fs, paths, fp = _prepare(cfg)
    existing = already_committed(out, STAGE, fp)
    if existing is not None:
        return existing
    init_ray(cfg.ray)
    import ray

    ds = read_url_list(cfg.input, filesystem=fs, paths=paths)
    total = ds.count()
    if total == 0:
        raise ValueError(f"URL lists {cfg.input.paths} hold no rows")
    num_parts = max(1, math.ceil(total / cfg.rows_per_part))
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
    store = PartStore(out, STAGE, fp, cfg.output.row_group_size)
    results = (
        ds.map_batches(_assign_parts, batch_format="pyarrow", fn_kwargs={"num_parts": num_parts}, **data_args())
        .groupby("part", num_partitions=min(num_parts, cfg.shuffle_partitions))
        .map_groups(CrawlPart, batch_format="pyarrow", fn_constructor_kwargs={"cfg": cfg, "store": store},
                    concurrency=min(workers, num_parts), num_cpus=0.5, **data_args())
        .take_all()
    )
    parts = [PartResult.loads(r["result"]) for r in results]
    print(f"crawl: {len(parts)} parts ({sum(p.skipped for p in parts)} reused from an earlier run), "
          f"{total} input rows", flush=True)
    return finish_stage(out, STAGE, fp, parts, SAMPLE_SCHEMA, to_dict(cfg), started, cfg.input.paths)


def _fingerprint_config(cfg: CrawlConfig) -> dict:
    """The settings that change what the crawl commits (not where it runs or how fast)."""
    d = to_dict(cfg)
    for k in ("ray", "output", "input_s3", "workers", "threads_per_worker"):
        d.pop(k, None)
    return d


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(CrawlConfig, argv, prog="python -m pipelines.crawl")
    run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
