"""Crawl throughput (images/s): our crawl against img2dataset 1.47, side by side, as a user runs each.

    .venv/bin/python -m benchmarks.bench_crawl [--images 10000] [--size 224] [--pairs 2] [--out benchmarks/out]

Both commands run as subprocesses of this script, end to end (interpreter and Ray start-up included),
on the same URL list served by the same loopback server: photo-like JPEGs of 300-700 px
(benchmarks/photos.py), resized to `--size` px with a centre crop, written as Parquet, with the same
parallelism budget (2 processes/actors x 16 threads). Runs alternate (img2dataset, ours, img2dataset,
ours, ...) so that a machine getting busier hurts both alike; the ratio is taken pair by pair.
Our crawl runs with every check on (robots.txt, address checks, byte/pixel caps, deadlines, opt-outs);
img2dataset with its defaults. Writes benchmarks/out/crawl.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.photos import photo_jpegs
from pipelines.demo.local_web import LocalWebServer, WebContent

PROCESSES, THREADS = 2, 16


def img2dataset_cmd(src: str, out: str, size: int) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "img2dataset")
    return [exe, "--url_list", src, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
            "--output_format", "parquet", "--output_folder", out, "--processes_count", str(PROCESSES),
            "--thread_count", str(THREADS), "--image_size", str(size), "--resize_mode", "center_crop",
            "--number_sample_per_shard", "1000",  # = our rows_per_part "--distributor", "multiprocessing", "--enable_wandb", "False",
            "--timeout", "10", "--retries", "0"]


def ours_cmd(src: str, out: str, size: int) -> list[str]:
    return [sys.executable, "-m", "pipelines.crawl", f"input.paths=[{src}]", f"output.path={out}",
            "fetch.allow_networks=[127.0.0.1/32]", f"image.image_size={size}", "image.resize_mode=center_crop",
            f"workers={PROCESSES}", f"threads_per_worker={THREADS}", "rows_per_part=1000"]


def timed(cmd: list[str], log: str) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return elapsed


def rows_written(out: str) -> int:
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
             if f.endswith(".parquet") and "_rejected" not in d and "_plan" not in d]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pairs", type=int, default=2, help="alternating (img2dataset, ours) runs")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    images = photo_jpegs(args.images)
    work = tempfile.mkdtemp(prefix="bench-crawl-")
    runs: list[dict] = []
    with LocalWebServer(WebContent(images, [f"photo number {i}" for i in range(len(images))])) as web:
        src = os.path.join(work, "list.parquet")
        pq.write_table(pa.Table.from_pylist(web.url_list()), src)
        for pair in range(args.pairs):
            row = {}
            for name, make in (("img2dataset", img2dataset_cmd), ("ours", ours_cmd)):
                out = os.path.join(work, f"{name}-{pair}")
                seconds = timed(make(src, out, args.size), os.path.join(work, f"{name}-{pair}.log"))
                kept = rows_written(out)
                row[name] = {"seconds": round(seconds, 2), "images": kept, "img_per_s": round(kept / seconds, 1)}
                shutil.rmtree(out, ignore_errors=True)
            row["ratio"] = round(row["ours"]["img_per_s"] / row["img2dataset"]["img_per_s"], 3)
            print(f"pair {pair + 1}: img2dataset {row['img2dataset']['img_per_s']} img/s, "
                  f"ours {row['ours']['img_per_s']} img/s, ratio {row['ratio']}", flush=True)
            runs.append(row)
    ratios = [r["ratio"] for r in runs]
    summary = {
        "images": args.images, "size": args.size, "processes_x_threads": f"{PROCESSES}x{THREADS}", "runs": runs,
        "ratio_mean": round(statistics.mean(ratios), 3), "ratio_worst": min(ratios),
        "img2dataset_img_per_s_mean": round(statistics.mean(r["img2dataset"]["img_per_s"] for r in runs), 1),
        "ours_img_per_s_mean": round(statistics.mean(r["ours"]["img_per_s"] for r in runs), 1),
        "ours_img_per_s_worst": min(r["ours"]["img_per_s"] for r in runs),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crawl.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [f"{args.images} photo-like JPEGs (300-700 px) -> {args.size} px centre crop, Parquet, loopback server, "
             f"{PROCESSES} processes x {THREADS} threads each, end to end (start-up included)", "",
             "| pair | img2dataset 1.47 img/s | ours img/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['img2dataset']['img_per_s']} | {r['ours']['img_per_s']} | {r['ratio']} |"
              for i, r in enumerate(runs)]
    lines += [f"| mean | {summary['img2dataset_img_per_s_mean']} | {summary['ours_img_per_s_mean']} | "
              f"{summary['ratio_mean']} |", f"| worst | | {summary['ours_img_per_s_worst']} | {summary['ratio_worst']} |"]
    with open(os.path.join(args.out, "crawl.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
