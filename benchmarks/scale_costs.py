"""Per-stage costs per 1,000 rows at three sizes, with the growth fitted: the measured input of docs/SCALING.md.

    .venv/bin/python -m benchmarks.scale_costs [--sizes 1000 3000 10000] [--quick] [--out benchmarks/out]

Each size is one run of the real DAG (`pipelines.run.dag`: every stage's own `run()`, in order, as
`python -m pipelines.run` does it) on the demo's generated data: N coloured-shape JPEGs (64 px) and their
captions, 2% planted duplicates, served by the demo's loopback web server; stage outputs on a local
SeaweedFS S3 server (pipelines/demo/local_s3.py), as on a cluster. Train runs one epoch of `tiny-vit` on CPU
(its cost is not the one a GPU run has: SCALING.md takes GPU throughput from published figures); evaluate
runs zero-shot on N/5 held-out shapes. What is measured, per stage:

- cpu_s: CPU seconds (user + system) of this process and every process it started (Ray's GCS, raylet,
  workers, actors), per process as last seen (sampled every 0.25 s, so a worker that exits keeps its time),
  before and after the stage. The S3 server's and the web server's own CPU are excluded (they are other processes).
- peak_pss_mib: peak of the summed proportional set size (PSS: shared pages, e.g. Ray's object store,
  counted once) over the same processes, sampled every 0.25 s; peak_proc_rss_mib: the largest single process.
- S3: requests by HTTP method and bytes in/out, from the SeaweedFS server's own Prometheus counters
  (`SeaweedFS_s3_request_total`, `SeaweedFS_s3_bucket_traffic_{received,sent}_bytes_total`) read before and
  after the stage. Every stage output lives on that server, so these are all the object-store requests.
- web_bytes (crawl): image bytes the web server holds for the list (all of them are fetched once).

Growth: `exponent` is the least-squares slope of log(cost) on log(rows) over the sizes (1 = linear; below 1
means a fixed cost still shows at these sizes); `marginal_per_1k` is the slope between the two largest sizes,
the number an extrapolation to 400M rows should use. Ray starts once per size before the first stage.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.ports import free_port

STAGE_NAMES = ("crawl", "filter", "dedup", "curate", "shard", "train", "evaluate")


# ------------------------------------------------------------------------------------ the process tree

class Tree:
    """CPU seconds and memory of this process and its descendants, minus the servers we started."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.me = psutil.Process()
        self.peak_pss = 0
        self.peak_rss = 0
        self.sampler_cpu_s = 0.0  # the sampler's own CPU (reading /proc), subtracted from the stage's
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def procs(self) -> list[psutil.Process]:
        out = [self.me]
        for p in self.me.children(recursive=True):
            if p.pid in self.exclude or any(a.pid in self.exclude for a in _ancestors(p)):
                continue
            out.append(p)
        return out

    def cpu_s(self) -> float:
        """CPU of every process seen so far, by pid: a process that has exited keeps the time it had when last
        seen (the sampler looks every 0.25 s). Parents' reaped-children times are not used: Ray's workers are
        not all waited for, and a worker that exited mid-stage took its whole lifetime's CPU out of the sum."""
        self._seen_now()
        return sum(self._last.values())

    def _seen_now(self) -> None:
        for p in self.procs():
            try:
                t = p.cpu_times()
                self._last[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass

    def _sample(self) -> None:
        start = time.thread_time()
        while not self._stop.is_set():
            sample_start = time.thread_time()
            pss = rss = 0
            self._seen_now()
            for p in self.procs():
                try:
                    proc_pss, proc_rss = _pss_rss(p)
                    pss += proc_pss
                    rss = max(rss, proc_rss)
                except (psutil.Error, OSError):
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            # Every 0.25 s, or less often when a sample is slow: even smaps_rollup costs the kernel a page-table
            # walk, ~0.1 s a sample over Ray workers mapping a 2 GiB store; keep the sampler under ~20% of a core.
            self._stop.wait(max(0.25, 4 * (time.thread_time() - sample_start)))
        self.sampler_cpu_s = time.thread_time() - start

    def start(self) -> None:
        self.peak_pss = self.peak_rss = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self.peak_pss, self.peak_rss


def _pss_rss(p: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) in bytes from /proc/PID/smaps_rollup, which the kernel sums for us. psutil's memory_full_info
    reads the whole /proc/PID/smaps: for Ray workers mapping a 2 GiB object store, four times a second over
    twenty processes, that took 60% of a core and a third of the machine's time in the kernel (dedup at 10M
    rows), and slowed the step it was measuring."""
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and not line[0].isdigit())
        return int(fields["Pss"].split()[0]) * 1024, int(fields["Rss"].split()[0]) * 1024
    except (FileNotFoundError, KeyError):  # a kernel before 4.14 has no smaps_rollup
        m = p.memory_full_info()
        return m.pss, m.rss


def _ancestors(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.parents()
    except psutil.Error:
        return []


def idle_burn(seconds: float = 60.0) -> float:
    """CPU seconds per wall second of an idle local Ray (GCS, raylet, agents, 12 idle workers): the background
    that every stage's cpu_s also contains. Measured on its own Ray, which it shuts down."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False,
             _system_config={"enable_metrics_collection": False})
    try:
        @ray.remote
        def noop() -> int:
            return 1

        ray.get([noop.remote() for _ in range(12)])
        time.sleep(5)
        tree = Tree(set())
        c0, w0 = tree.cpu_s(), time.perf_counter()
        time.sleep(seconds)
        return (tree.cpu_s() - c0) / (time.perf_counter() - w0)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------ S3 counters

def s3_counters(metrics_url: str) -> dict[str, float]:
    """The server's request and byte counters (all buckets, all status codes)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'SeaweedFS_s3_request_total\{.*type="(\w+)".*\} (\S+)', line)
        if m:
            out[f"req_{m.group(1)}"] = out.get(f"req_{m.group(1)}", 0) + float(m.group(2))
        m = re.match(r'SeaweedFS_s3_bucket_traffic_(received|sent)_bytes_total\{.*\} (\S+)', line)
        if m:
            key = "bytes_written" if m.group(1) == "received" else "bytes_read"
            out[key] = out.get(key, 0) + float(m.group(2))
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(set(after) | set(before))
            if after.get(k, 0) != before.get(k, 0)}


# ------------------------------------------------------------------------------------ the data

def _serve(content: Any, conn: Any) -> None:
    """Child process: the demo's web server (its CPU must not count as the crawl's)."""
    from pipelines.demo.local_web import LocalWebServer

    with LocalWebServer(content) as web:
        conn.send(web.url_list())
        conn.recv()  # until the parent says stop


def make_content(n: int, seed: int = 0) -> Any:
    from pipelines.demo.local_web import WebContent
    from pipelines.demo.synthetic import shape_samples

    rng = random.Random(seed)
    samples = shape_samples(n, px=64, seed=seed)
    images, captions, queries = [s.image for s in samples], [s.caption for s in samples], [s.label for s in samples]
    for i in rng.sample(range(n), n // 50):  # 2% exact re-posts with a new caption: dedup has work to do
        images.append(samples[i].image), captions.append(samples[i].caption + " (repost)"), queries.append(samples[i].label)
    return WebContent(images[:n], captions[:n], queries[:n])


def eval_job(work: str, n: int) -> str:
    from pipelines.demo.synthetic import shape_classnames, shape_samples
    from pipelines.demo.views import SHAPE_TEMPLATES

    names = shape_classnames()
    held = shape_samples(n, px=64, seed=7)
    pq.write_table(pa.table({"image": pa.array([s.image for s in held], pa.binary()),
                             "label": pa.array([names.index(s.label) for s in held], pa.int64())}),
                   f"{work}/eval.parquet")
    with open(f"{work}/classnames.json", "w") as f:
        json.dump(names, f)
    with open(f"{work}/templates.json", "w") as f:
        json.dump(SHAPE_TEMPLATES[:1], f)
    return (f"[{{name: shapes, dataset: 'parquet:{work}/eval.parquet', templates: '{work}/templates.json', "
            f"classnames: '{work}/classnames.json'}}]")


# ------------------------------------------------------------------------------------ one size

# The stage settings (our own, not configs/run_tiny.yaml: the sizes here are larger). The demo's radii for
# dedup (its shapes are near each other in phash); one epoch of the tiny ViT at 64 px for train.
BASE_CONFIG = """
ray: {num_cpus: 6}
crawl:
  input: {query_col: query}
  fetch: {allow_networks: [127.0.0.1/32], deadline_s: 5.0, max_retries: 1}
  image: {image_size: 64, resize_mode: center_crop}
  rows_per_part: 1000
filter:
  rules: {min_image_side: 16, max_per_query: 1000000}
dedup:
  dedup: {hamming_threshold: 3, eval_hamming: 2}
curate:
  metadata: configs/metadata_demo.jsonl
  t: 1000
shard:
  rows_per_shard: 2000
  row_group_size: 256
train:
  model: tiny-vit
  global_batch_size: 64
  epochs: 1
  checkpoint_every: 100000
  num_workers: 2
  zero_stage: 2
  optim: {lr: 0.002, warmup_steps: 1}
report:
  samples: 0
"""

def run_size(n: int, s3: Any, metrics_url: str, work: str, exclude: set[int]) -> dict[str, Any]:
    import ray

    from pipelines.core.manifest import MANIFEST_NAME
    from pipelines.core.runtime import RayConfig, init_ray, local_system_config
    from pipelines.core.storage import Storage
    from pipelines.run.dag import (
        STAGES,
        Selection,
        _execute,
        decide,
        load_run_config,
        validate,
    )

    load_at_start = round(os.getloadavg()[0], 2)
    content = make_content(n)
    web_bytes = sum(len(b) for b in content.images)
    parent, child = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve, args=(content, child), daemon=True)
    server.start()
    exclude = exclude | {server.pid}
    rows = parent.recv()
    os.makedirs(work, exist_ok=True)
    url_list = f"{work}/urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), url_list)
    overrides = [f"root={s3.uri(f'scale/{n}')}", f"s3.endpoint_url={s3.endpoint_url}",
                 f"crawl.input.paths=[{url_list}]", f"evaluate={eval_job(work, max(200, n // 5))}"]
    with open(f"{work}/run.yaml", "w") as f:
        f.write(BASE_CONFIG)
    cfg = load_run_config(f"{work}/run.yaml", overrides)
    validate(cfg)
    tree = Tree(exclude)
    t0 = time.perf_counter()

    # Started here with address="local" (then init_ray only attaches): a bare ray.init() joins any Ray that
    # `ray start` left on the machine (other jobs' test heads), which refuses num_cpus.
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}},
             _system_config=local_system_config(cfg.ray.num_cpus))
    init_ray(RayConfig(num_cpus=cfg.ray.num_cpus))
    ray_start_s = time.perf_counter() - t0
    stages: dict[str, Any] = {}
    dirs: dict[str, str] = {}
    try:
        for stage in STAGES:
            step = decide(cfg, stage, dirs, Selection(), None)
            dirs[stage] = step.path
            if step.action != "run":
                raise RuntimeError(f"{stage}: expected a fresh run, plan says {step.action} ({step.reason})")
            before_s3, before_cpu = s3_counters(metrics_url), tree.cpu_s()
            tree.start()
            t0 = time.perf_counter()
            try:
                _execute(cfg, stage, dirs, step)
            except Exception as err:  # another team's stage broken mid-edit: record it, measure the rest
                tree.stop()
                stages[stage] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"  N={n} {stage}: FAILED {stages[stage]['error']}", flush=True)
                break
            wall = time.perf_counter() - t0
            pss, rss = tree.stop()
            # Actors that end with the stage (train workers) count only once their parent has reaped them:
            # a process that has exited but is not reaped yet shows in no one's times.
            time.sleep(3)
            cpu = tree.cpu_s() - before_cpu - tree.sampler_cpu_s
            io = _delta(s3_counters(metrics_url), before_s3)
            man = json.loads(Storage.from_uri(step.path, cfg.s3).read_bytes(MANIFEST_NAME))
            rows_in = man.get("rows_in") or 0
            if stage == "train":
                shard = json.loads(Storage.from_uri(dirs["shard"], cfg.s3).read_bytes(MANIFEST_NAME))
                rows_in = shard["rows_out"]  # one epoch over the shards
            if stage == "evaluate":
                rows_in = max(200, n // 5)
            rec = {"rows_in": rows_in, "rows_out": man.get("rows_out"), "wall_s": round(wall, 2),
                   "cpu_s": round(cpu, 2), "peak_pss_mib": round(pss / 2**20, 1),
                   "peak_proc_rss_mib": round(rss / 2**20, 1),
                   "s3_requests": sum(v for k, v in io.items() if k.startswith("req_")),
                   "s3_bytes_read": io.get("bytes_read", 0), "s3_bytes_written": io.get("bytes_written", 0),
                   "s3_by_method": {k[4:]: v for k, v in io.items() if k.startswith("req_")}}
            if stage == "crawl":
                rec["web_bytes"] = web_bytes
            stages[stage] = rec
            print(f"  N={n} {stage:<9} rows_in {rows_in:>6}  wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                  f"pss {pss / 2**20:6.0f} MiB  S3 {rec['s3_requests']:>5} req  "
                  f"{rec['s3_bytes_read'] / 2**20:6.1f} MiB read  {rec['s3_bytes_written'] / 2**20:6.1f} MiB written",
                  flush=True)
    finally:
        ray.shutdown()
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()
    return {"rows": n, "ray_start_s": round(ray_start_s, 2), "load_at_start": load_at_start,
            "load_at_end": round(os.getloadavg()[0], 2), "stages": stages}


# ------------------------------------------------------------------------------------ fitting, tables

METRICS = ("cpu_s", "wall_s", "peak_pss_mib", "s3_requests", "s3_bytes_read", "s3_bytes_written")


def fit(points: list[tuple[float, float]]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3) if sxx else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in STAGE_NAMES:
        recs = [r["stages"][stage] for r in runs if "cpu_s" in r["stages"].get(stage, {})]
        if not recs:
            continue
        s: dict[str, Any] = {}
        for m in METRICS:
            per_1k = [round(1000 * r[m] / r["rows_in"], 4) if r["rows_in"] else None for r in recs]
            entry = {"per_1k": per_1k, "exponent": fit([(r["rows_in"], r[m]) for r in recs])}
            if len(recs) >= 2 and recs[-1]["rows_in"] != recs[-2]["rows_in"]:
                entry["marginal_per_1k"] = round(1000 * (recs[-1][m] - recs[-2][m]) /
                                                 (recs[-1]["rows_in"] - recs[-2]["rows_in"]), 4)
            s[m] = entry
        s["rows_in"] = [r["rows_in"] for r in recs]
        out[stage] = s
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) >= 100:
        return f"{x:,.0f}"
    if isinstance(x, float):
        return f"{x:.3g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    sizes = meta["sizes"]
    lines = [f"Per-stage costs per 1,000 input rows of the stage (`python -m benchmarks.scale_costs`), URL lists of "
             f"{', '.join(f'{s:,}' for s in sizes)} rows; 1-minute load average {meta['load_before']} before and "
             f"{meta['load_after']} after (per size: {meta.get('loads', '-')}), on {meta['cpus']} cores. Columns: per 1k rows at each size, the fitted "
             "growth exponent, and the marginal cost per 1k rows between the two largest sizes.", ""]
    for m, title in (("cpu_s", "CPU seconds"), ("wall_s", "wall seconds"), ("peak_pss_mib", "peak PSS MiB (whole tree)"),
                     ("s3_requests", "S3 requests"), ("s3_bytes_read", "S3 bytes read"),
                     ("s3_bytes_written", "S3 bytes written")):
        lines += [f"**{title}** per 1,000 rows", "",
                  "| stage | rows in | " + " | ".join(f"N={s:,}" for s in sizes) + " | exponent | marginal per 1k |",
                  "|---|---|" + "---|" * len(sizes) + "---|---|"]
        for stage, s in summary.items():
            e = s[m]
            lines.append(f"| {stage} | {' / '.join(f'{r:,}' for r in s['rows_in'])} | "
                         + " | ".join(_fmt(v) for v in e["per_1k"]) + f" | {_fmt(e['exponent'])} | "
                         f"{_fmt(e.get('marginal_per_1k'))} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--quick", action="store_true", help="sizes 200 and 400: a smoke run of every stage (fixed costs only; minutes, not the 10+ of the full run)")
    ap.add_argument("--resume", action="store_true", help="keep the sizes the output JSON already has")
    ap.add_argument("--from-log", default="", help="start from the per-stage lines of an earlier run's output")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    sizes = [200, 400] if args.quick else sorted(args.sizes)
    from pipelines.demo import local_s3

    work = tempfile.mkdtemp(prefix="scale-costs-")
    metrics_port = free_port()
    local_s3._FIXED_FLAGS = [*local_s3._FIXED_FLAGS, f"-metricsPort={metrics_port}", "-metricsIp=127.0.0.1"]
    s3 = local_s3.LocalS3(os.path.join(work, "s3"), bucket="scale")
    load_before = round(os.getloadavg()[0], 2)
    args.idle_cpu_per_s = round(idle_burn(10.0 if args.quick else 60.0), 4)
    print(f"idle Ray: {args.idle_cpu_per_s} CPU s per wall s", flush=True)
    runs: list[dict[str, Any]] = []
    name = "scale_costs_quick" if args.quick else "scale_costs"
    if args.from_log:
        runs = runs_from_log(args.from_log)
    elif args.resume and os.path.exists(os.path.join(args.out, f"{name}.json")):
        with open(os.path.join(args.out, f"{name}.json")) as f:
            runs = json.load(f)["runs"]
    sizes = [n for n in sizes if n not in {r["rows"] for r in runs}]
    text = save(runs, sizes, load_before, args) if runs else ""
    try:
        s3.start()
        os.environ.update(s3.env())
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        for n in sizes:
            runs.append(run_size(n, s3, f"http://127.0.0.1:{metrics_port}/metrics", os.path.join(work, str(n)),
                                 {s3.proc.pid}))
            runs.sort(key=lambda r: r["rows"])
            text = save(runs, sizes, load_before, args)  # after every size: a long run cut short keeps the rest
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(text)


def runs_from_log(path: str) -> list[dict[str, Any]]:
    """The per-stage lines a run printed (rounded as printed), for a run that died before writing its JSON."""
    pat = re.compile(r"N=(\d+) (\w+)\s+rows_in\s+(\d+)\s+wall\s+([\d.]+) s\s+cpu\s+([\d.]+) s\s+pss\s+(\d+) MiB\s+"
                     r"S3\s+(\d+) req\s+([\d.]+) MiB read\s+([\d.]+) MiB written")
    runs: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            m = pat.search(line)
            if not m:
                continue
            n = int(m.group(1))
            run = runs.setdefault(n, {"rows": n, "from_log": True, "stages": {}})
            run["stages"][m.group(2)] = {
                "rows_in": int(m.group(3)), "wall_s": float(m.group(4)), "cpu_s": float(m.group(5)),
                "peak_pss_mib": float(m.group(6)), "s3_requests": int(m.group(7)),
                "s3_bytes_read": int(float(m.group(8)) * 2**20), "s3_bytes_written": int(float(m.group(9)) * 2**20)}
    return [runs[n] for n in sorted(runs)]


def save(runs: list[dict[str, Any]], sizes: list[int], load_before: float, args: argparse.Namespace) -> str:
    meta = {"sizes": [r["rows"] for r in sorted(runs, key=lambda r: r["rows"])], "planned_sizes": sizes, "cpus": os.cpu_count(),
            "idle_cpu_s_per_wall_s": args.idle_cpu_per_s,
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2), "quick": args.quick,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loads": ", ".join(f"N={r['rows']:,}: {r.get('load_at_start')}-{r.get('load_at_end')}" for r in runs)}
    summary = summarise(runs)
    os.makedirs(args.out, exist_ok=True)
    name = "scale_costs_quick" if args.quick else "scale_costs"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs, "summary": summary}, f, indent=2)
    text = markdown(summary, meta)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
