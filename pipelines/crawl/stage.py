"""Stage 1, crawl: URL + caption lists -> sample rows (downloaded, verified, resized, hashed).

    python -m pipelines.crawl --config configs/crawl.yaml [key=value ...]
    python -m pipelines.crawl --config configs/crawl.yaml ... retry_failed=true   # recrawl transient failures

Two steps:

- plan (Ray tasks): one task per input file streams it through `url_lists.iter_list_rows` (which never
  raises for a row) and cuts it into parts of `rows_per_part` rows in file order, each written as a
  small "todo" Parquet file `_plan/part-FFFFF-CCCCC.parquet` (file index, chunk index: deterministic).
  Rows that repeat an earlier (url, caption) anywhere in the input are found exactly by a shuffle of
  their keys (24 bytes a row) and rejected as `duplicate_input_row`, so keys stay unique. The plan is
  committed as `_plan/_plan.json`; a rerun reuses it, and a recrawl reads the todo files again.
- crawl (a Ray Data actor pool): inside an actor many threads each fetch a row, decode/resize/hash
  it and hand the result to the part's writer, which streams row groups to `part-FFFFF-CCCCC.parquet`;
  rejected rows go to `_rejected/`; the part marker goes last (see stage.PartStore). A killed crawl
  resumes from the parts it committed.

Memory per actor is bounded by `memory_budget_bytes`, whatever `rows_per_part`, `fetch.max_bytes` or
the thread count: response bodies, decoded pixels and the write buffer each get a share (see
`MemoryPlan`). Every row is handled inside one boundary: a failure with a known cause keeps its
reason, anything else becomes `internal_error` with the exception in `detail`; no row can stop a part.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import os
import queue
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator


from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.crawl.fetch import TRANSIENT, ByteBudget, FetchConfig, SafeFetcher
from pipelines.core.images import ImageConfig, process_image
from pipelines.core.manifest import Manifest, fingerprint, format_funnel, read_manifest, write_manifest
from pipelines.core.schema import CRAWL_SCHEMA, rejected_table
from pipelines.core.stage import Stage, Wiring
from pipelines.core import console
from pipelines.core.parts import OutputConfig, PartResult, PartStore, already_committed, collect_parts, finish_stage
from pipelines.core.runtime import RayConfig, actors_for, data_args, init_ray
from pipelines.core.storage import S3Options, Storage
from pipelines.crawl.plan import PLAN_DIR, committed_plan, start_plan, todo_path
from pipelines.crawl.lists import InputConfig, check_columns, detect_format

NAME = "crawl"
MiB = 1024 * 1024


@dataclass
class CrawlConfig:
    input: InputConfig = field(default_factory=InputConfig)
    # s3 settings used when input paths are s3:// URIs.
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Rows per part: the unit of commit, resume and recrawl. A part's rows come from one input file, in order.
    rows_per_part: int = 2000
    # Concurrent rows (fetch + decode) inside one crawler actor.
    threads_per_worker: int = 32
    # Crawler actors; None = one per 2,000 rows of the URL lists (ROWS_PER_WORKER), at most one per two logical CPUs.
    workers: int | None = None
    # Bytes one crawler actor may hold at once: response bodies, decoded pixels and the part's write buffer.
    # Must hold one body of fetch.max_bytes plus one decode of image.max_pixels (8 bytes per pixel).
    memory_budget_bytes: int = 1024 * MiB
    # Recrawl a committed crawl's transient failures (deadline, connection errors, DNS, 429, 5xx, robots.txt
    # unavailable, host busy) and commit the result in place: permanent rejects are never retried.
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if self.rows_per_part < 1:
            raise ValueError(f"crawl.rows_per_part must be >= 1, got {self.rows_per_part}")
        if self.threads_per_worker < 1:
            raise ValueError(f"crawl.threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"crawl.workers must be >= 1 or null, got {self.workers}")
        MemoryPlan.of(self)  # raises naming the keys when the budget cannot hold one body and one decode


@dataclass(frozen=True)
class MemoryPlan:
    """How one actor's memory_budget_bytes is shared: decoded pixels get room for one image of
    image.max_pixels at 8 bytes per pixel (the decode plus one converted copy) or a quarter of the
    budget if that is more; the write buffer an eighth (at most 64 MiB); response bodies the rest."""

    bodies: int
    pixels: int
    write_buffer: int

    @staticmethod
    def of(cfg: CrawlConfig) -> MemoryPlan:
        budget = cfg.memory_budget_bytes
        pixels = max(8 * cfg.image.max_pixels, budget // 4)
        write_buffer = min(64 * MiB, budget // 8)
        bodies = budget - pixels - write_buffer
        if bodies < cfg.fetch.max_bytes:
            need = cfg.fetch.max_bytes + 8 * cfg.image.max_pixels + write_buffer
            raise ValueError(
                f"crawl.memory_budget_bytes={budget} cannot hold one body of fetch.max_bytes={cfg.fetch.max_bytes} "
                f"and one decode of image.max_pixels={cfg.image.max_pixels} (8 bytes per pixel): "
                f"raise it to at least {need} or lower those")
        return MemoryPlan(bodies, pixels, write_buffer)


# --------------------------------------------------------------------------- crawl


@dataclass
class _Outcome:
    kept: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    fetched_bytes: int = 0


class CrawlWorker:
    """One actor: crawls whole parts. Holds the fetcher (robots.txt cache, kept-alive connections,
    per-host limits) and the memory budgets across parts."""

    def __init__(self, cfg: CrawlConfig, store: PartStore) -> None:
        self.cfg, self.store = cfg, store
        _return_large_frees_to_the_os()
        self.memory = MemoryPlan.of(cfg)
        self.bodies = ByteBudget(self.memory.bodies)
        self.pixels = ByteBudget(self.memory.pixels)
        self.fetcher = SafeFetcher(cfg.fetch, budget=self.bodies)
        self.pool = cf.ThreadPoolExecutor(cfg.threads_per_worker, thread_name_prefix="crawl")
        _warm_up(cfg.image)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        name = str(batch["part"][0])
        retry_of = str(batch["retry_of"][0]) if "retry_of" in batch else ""
        if retry_of:
            result = self.store.done(name) or self._retry(name, retry_of)
        else:
            duplicates = {int(k): v for k, v in json.loads(str(batch["duplicates"][0])).items()}
            result = self.store.done(name) or self._crawl_part(name, duplicates)
        return {"result": [result.dumps() if result is not None else ""], "part": [name]}

    # -- a first crawl of a part -----------------------------------------------------------------
    def _crawl_part(self, name: str, duplicates: dict[int, str]) -> PartResult:
        todo = self.store.storage.read_parquet(todo_path(name))
        rejected: list[dict[str, Any]] = []
        work: list[dict[str, Any]] = []
        for i, row in enumerate(todo.to_pylist()):
            if row["error"]:
                rejected.append(_reject(row, row["error"], row["detail"] or row["source"] or ""))
            elif i in duplicates:
                rejected.append(_reject(row, "duplicate_input_row", f"same url and caption as {duplicates[i]}"))
            else:
                work.append(row)
        return self._run(name, work, rejected, todo.num_rows)

    # -- a recrawl of a part's transient failures ------------------------------------------------------
    def _retry(self, name: str, previous: str) -> PartResult | None:
        """`previous` is the part's current rejected file; None when nothing in it is transient."""
        old = self.store.storage.read_parquet(previous)
        transient = {k for k, r in zip(old.column("key").to_pylist(), old.column("reason").to_pylist()) if r in TRANSIENT}
        if not transient:
            return None
        todo = self.store.storage.read_parquet(todo_path(name))
        work = [row for row in todo.to_pylist() if row["key"] in transient and not row["error"]]
        work = list({row["key"]: row for row in work}.values())
        found = {row["key"] for row in work}
        carried = [r for r in old.to_pylist() if r["key"] not in found]
        counts = Counter(old.column("reason").to_pylist())
        result = self._run(name, work, carried, old.num_rows)
        result.stats["replaces"] = {"path": previous, "rows": old.num_rows, "rejected": dict(counts)}
        return result

    # -- the threads ---------------------------------------------------------------------------
    def _run(self, name: str, work: list[dict[str, Any]], rejected: list[dict[str, Any]], rows_in: int) -> PartResult:
        started, cpu_start, rss_start = time.time(), time.process_time(), _rss_bytes()
        writer = self.store.writer(name, CRAWL_SCHEMA, flush_bytes=self.memory.write_buffer)
        fetched = 0
        # Key order spreads one host's rows over the part (keys are hashes), so the per-host slots
        # do not make every thread queue behind one site.
        work.sort(key=lambda row: row["key"])
        # Outcomes in completion order through a SimpleQueue (a C-level put; as_completed's per-future
        # waiter and condition showed up in the profile at 10% of the GIL).
        done: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        try:
            for row in work:
                self.pool.submit(lambda r=row: done.put(self._one(r)))
            for _ in range(len(work)):
                outcome = done.get()
                fetched += outcome.fetched_bytes
                if outcome.kept is not None:
                    writer.add(outcome.kept, len(outcome.kept["image"]))
                else:
                    rejected.append(outcome.rejected)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        stats = {"started_at": round(started, 3), "seconds": round(time.time() - started, 3),
                 "cpu_s": round(time.process_time() - cpu_start, 3),
                 "fetched_bytes": fetched, "rss_start_bytes": rss_start,
                 "peak_rss_bytes": _peak_rss_bytes(), "bodies_peak_bytes": self.bodies.peak,
                 "pixels_peak_bytes": self.pixels.peak}
        table = rejected_table([r["key"] for r in rejected], [r["url"] for r in rejected], NAME,
                               [r["reason"] for r in rejected], [r["detail"] for r in rejected])
        return self.store.finish(name, files, writer.rows, table, rows_in, stats)

    def _one(self, row: dict[str, Any]) -> _Outcome:
        """One row, start to end; never raises (the boundary that keeps one row from stopping a part)."""
        try:
            result = self.fetcher.fetch(row["url"])
            try:
                if not result.ok:
                    detail = result.detail or (f"status={result.status}" if result.status else "")
                    return _Outcome(rejected=_reject(row, result.reason, detail))
                image = process_image(result.body, self.cfg.image, reserve=self._pixels)
            finally:
                self.fetcher.release(result)
            if not image.ok:
                return _Outcome(rejected=_reject(row, image.reason, ""), fetched_bytes=len(result.body or b""))
            kept = {"key": row["key"], "url": row["url"], "caption": row["caption"], "query": row["query"] or "",
                    "image": image.image, "width": image.width, "height": image.height,
                    "original_width": image.original_width, "original_height": image.original_height,
                    "sha256": image.sha256, "phash": image.phash, "colour_sig": image.colour_sig}
            return _Outcome(kept=kept, fetched_bytes=len(result.body or b""))
        except Exception as err:  # noqa: BLE001 - the safety net; known failures have their own reasons
            return _Outcome(rejected=_reject(row, "internal_error", f"{type(err).__name__}: {err}"[:200]))

    @contextlib.contextmanager
    def _pixels(self, nbytes: int) -> Iterator[None]:
        """Hold pixel budget for one decode (images.process_image asks after reading the header)."""
        need = min(nbytes, self.pixels.capacity)
        self.pixels.acquire(need, timeout=3600.0)  # holders only decode, never wait: no deadlock
        try:
            yield
        finally:
            self.pixels.release(need)


def _reject(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"key": row["key"], "url": row["url"] or "", "reason": reason, "detail": detail or ""}


def _warm_up(cfg: ImageConfig) -> None:
    """Run one tiny image through the image step so its lazy imports (decoders, OpenCV, the DCT) happen at
    start-up, not inside the first part (where they would count as the part's memory and time). OpenCV gets
    one thread: the crawl's own threads already keep every core busy, and OpenCV's pool on top of them cost
    15% more CPU per image (3.06 vs 2.62 ms measured for a 300-700 px photo)."""
    import cv2
    from PIL import Image

    cv2.setNumThreads(1)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 30)).save(buf, "PNG")
    process_image(buf.getvalue(), cfg)


def _return_large_frees_to_the_os() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which large
    bodies and pixel buffers come from per-thread arenas that keep their pages: with 32 threads the RSS
    grew far past the bytes actually held (64 bodies of 6 MB under an 80 MiB budget grew the actor by
    370 MiB). A fixed 4 MiB threshold sends such blocks to their own mappings, returned on free (the same
    crawl: 62 MiB, with bodies read into one buffer each), while the ~1 MB buffers of ordinary photos stay
    in the arenas: a 64 KiB threshold also bounded memory but cost 0.85 ms of page faults per 500 px photo
    (4.3 vs 3.45 ms CPU per row, measured). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 4 * MiB)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- the driver


def _input_files(cfg: CrawlConfig) -> list[tuple[str, str, Any]]:
    """(uri, format, file info) of every list file, directories expanded, in a stable order."""
    out = []
    for path in cfg.input.paths:
        st = Storage.from_uri(path, cfg.input_s3)
        import pyarrow.fs as pafs

        info = st.fs.get_file_info(st.root)
        if info.type == pafs.FileType.File:
            files = [(path, info)]
        else:
            names = [f for f in st.list("") if not os.path.basename(f).startswith(("_", "."))]
            files = [(st.uri(f), st.fs.get_file_info(st.fs_path(f))) for f in names]
        if not files:
            raise FileNotFoundError(f"URL list {path} is empty or does not exist")
        for uri, finfo in files:
            fmt = cfg.input.format if cfg.input.format != "auto" else detect_format(uri)
            out.append((uri, fmt, finfo))
    return out


def _check_inputs_of(cfg: CrawlConfig) -> None:
    _check_inputs(cfg, _input_files(cfg))


def _check_inputs(cfg: CrawlConfig, files: list[tuple[str, str, Any]]) -> None:
    """Usage errors (a missing column) fail here, naming the file, before any Ray task starts."""
    for uri, fmt, _ in files:
        st = Storage.from_uri(uri, cfg.input_s3)
        check_columns(cfg.input, st.fs, st.root, fmt)


def _prepare(cfg: CrawlConfig) -> tuple[list[tuple[str, str, Any]], str]:
    files = _input_files(cfg)
    # Path, size and modification time, as make decides: an edited list reruns the crawl even when its size
    # is unchanged (a URL swapped for one of equal length), without reading lists that may be gigabytes.
    fp = fingerprint(NAME, {**_fingerprint_config(cfg),
                             "input_files": [f"{uri}:{i.size}:{i.mtime_ns}" for uri, _, i in files]})
    return files, fp


def fingerprint_of(cfg: CrawlConfig) -> str:
    """What run(cfg) would commit under: the settings that shape the result and the URL lists (path, size,
    modification time)."""
    return _prepare(cfg)[1]


def ray_arguments(cfg: CrawlConfig, fp: str | None = None) -> dict[str, Any]:
    """Everything the driver ships to the plan tasks and crawler actors. Storage objects pickle as a URI
    plus options, never credentials: each worker resolves its own (tests pickle this and look for secrets)."""
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    return {"cfg": cfg, "store": PartStore(out, NAME, fp or fingerprint_of(cfg), cfg.output.row_group_size)}


def run(cfg: CrawlConfig) -> Manifest:
    started = time.time()
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    files, fp = _prepare(cfg)
    if cfg.retry_failed:
        return _retry_failed(cfg, out, fp, started)
    existing = already_committed(out, NAME, fp)
    if existing is not None:
        return existing
    _check_inputs(cfg, files)
    init_ray(cfg.ray)
    import ray
    import ray.data

    args = ray_arguments(cfg, fp)
    store = args["store"]
    plan = committed_plan(store)
    if plan is None:
        plan = start_plan(cfg, store, files).result()
        plan.commit(store)
    if not plan.parts:
        raise ValueError(f"URL lists {cfg.input.paths} hold no rows")
    workers = cfg.workers or actors_for(sum(rows for _, rows in plan.parts), ROWS_PER_WORKER, cpus_per_actor=2)
    items = plan.descriptors()
    # One block per part, so that the actor pool hands parts out one at a time.
    parts = collect_parts(ray.data.from_items(items, override_num_blocks=len(items))
                          .map_batches(CrawlWorker, batch_size=1, fn_constructor_kwargs=args,
                                       concurrency=min(workers, len(items)), num_cpus=1, **data_args()),
                          len(items))
    reused = sum(p.skipped for p in parts)
    if reused:
        console.progress(note=f"{reused} parts reused from an earlier run")
    return finish_stage(out, NAME, fp, parts, CRAWL_SCHEMA, to_dict(cfg), started, cfg.input.paths,
                        extra={"attempt": 1, "memory": _memory_summary(cfg, parts)})


# URL-list rows per crawler actor when `workers` is unset (the default part size). An actor's start (a process, its
# imports, the decoders' warm-up) took 2-3 CPU-s on a 2-core machine, what decoding ~1,000 ordinary photos costs
# (2.6-3.1 ms each): a list of a few hundred rows gained nothing from a second actor.
ROWS_PER_WORKER = 2000


def _memory_summary(cfg: CrawlConfig, parts: list[PartResult]) -> dict[str, Any]:
    fresh = [p.stats for p in parts if p.stats]
    return {
        "budget_bytes": cfg.memory_budget_bytes,
        "peak_rss_bytes": max((s.get("peak_rss_bytes", 0) for s in fresh), default=0),
        # Peak RSS of an actor over a part minus its RSS when the part began (imports excluded).
        "part_peak_growth_bytes": max((max(0, s.get("peak_rss_bytes", 0) - s.get("rss_start_bytes", 0))
                                       for s in fresh), default=0),
        "bodies_peak_bytes": max((s.get("bodies_peak_bytes", 0) for s in fresh), default=0),
        "pixels_peak_bytes": max((s.get("pixels_peak_bytes", 0) for s in fresh), default=0),
        "fetched_bytes": sum(s.get("fetched_bytes", 0) for s in fresh),
    }


def _retry_failed(cfg: CrawlConfig, out: Storage, fp: str, started: float) -> Manifest:
    previous = read_manifest(out, "")
    if previous is None or previous.fingerprint != fp:
        raise ValueError(f"crawl.retry_failed: nothing is committed at {out.uri()} for this config and these URL "
                         f"lists; run the crawl first (without retry_failed)")
    if not out.exists(PLAN_DIR):
        raise ValueError(f"crawl.retry_failed: {out.uri()} was committed without its {PLAN_DIR}/ todo files "
                         f"(an older crawl); rerun the crawl to make it recrawlable")
    attempt = int(previous.extra.get("attempt", 1)) + 1
    init_ray(cfg.ray)
    import ray

    store = PartStore(out, NAME, f"{fp}:attempt{attempt}", cfg.output.row_group_size)
    items = []
    for entry in previous.extra.get("rejected_files", []):
        base = os.path.basename(entry["path"]).split(".", 1)[0]
        items.append({"part": f"{base}.r{attempt}", "retry_of": entry["path"]})
    workers = cfg.workers or actors_for(sum(e["rows"] for e in previous.extra.get("rejected_files", [])),
                                        ROWS_PER_WORKER, cpus_per_actor=2)
    retried: list[PartResult] = []
    if items:
        retried = collect_parts(ray.data.from_items(items, override_num_blocks=len(items))
                                .map_batches(CrawlWorker, batch_size=1,
                                             fn_constructor_kwargs={"cfg": cfg, "store": store},
                                             concurrency=min(workers, len(items)), num_cpus=1, **data_args()),
                                len(items))
    manifest = _merge_retry(previous, retried, attempt, time.time() - started, to_dict(cfg))
    write_manifest(out, "", manifest)
    console.end()  # the status line stays above the funnel
    print(format_funnel(manifest), flush=True)
    return manifest


def _merge_retry(previous: Manifest, retried: list[PartResult], attempt: int, seconds: float,
                 config: dict[str, Any]) -> Manifest:
    """The committed crawl after a recrawl: its kept files plus the recovered rows; each retried part's
    rejected file replaced by the new one (permanent rejects carried over, new failures added)."""
    rejected = Counter(previous.rejected)
    replaced = set()
    for part in retried:
        old = part.stats["replaces"]
        rejected.subtract(old["rejected"])
        rejected.update(part.rejected)
        replaced.add(old["path"])
    rejected_files = [f for f in previous.extra.get("rejected_files", []) if f["path"] not in replaced]
    rejected_files += [f for p in retried for f in p.rejected_files]
    recovered = sum(p.rows_out for p in retried)
    history = list(previous.extra.get("retries", []))
    history.append({"attempt": attempt, "parts": len(retried), "rows_retried": sum(p.rows_in for p in retried),
                    "recovered": recovered, "seconds": round(seconds, 3)})
    return Manifest(
        stage=NAME, fingerprint=previous.fingerprint,
        files=[*previous.files, *(f for p in retried for f in p.files)],
        schema=previous.schema, rows_in=previous.rows_in, rows_out=previous.rows_out + recovered,
        rejected={k: v for k, v in sorted(rejected.items()) if v > 0},
        timings={**previous.timings, f"retry{attempt}_s": round(seconds, 3)},
        config=config,
        extra={**previous.extra, "attempt": attempt, "rejected_files": sorted(rejected_files, key=lambda f: f["path"]),
               "retries": history},
    )


def _fingerprint_config(cfg: CrawlConfig) -> dict:
    """The settings that change what the crawl commits (not where it runs, how fast, or a recrawl)."""
    d = to_dict(cfg)
    for k in ("ray", "output", "input_s3", "workers", "threads_per_worker", "memory_budget_bytes", "retry_failed"):
        d.pop(k, None)
    return d


def _wire(cfg: CrawlConfig, w: Wiring) -> CrawlConfig:
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, path=w.output or cfg.output.path, s3=w.s3),
                               ray=w.ray)


STAGE = Stage(
    name=NAME, section=CrawlConfig, doc="URL + caption lists -> downloaded, checked, resized and hashed sample rows",
    upstream=None, wired=("output.path", "output.s3", "ray"), wire=_wire, fingerprint=fingerprint_of, run=run,
    validate=_check_inputs_of, parts=True,
    rerun_when=lambda cfg: "recrawls its transient failures (crawl.retry_failed)" if cfg.retry_failed else None,
    fresh=lambda cfg: dataclasses.replace(cfg, retry_failed=False))


def main(argv: list[str] | None = None) -> int:
    return run_command("crawl", CrawlConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
