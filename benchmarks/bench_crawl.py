"""Crawl throughput (images/s): our Ray Data crawl against img2dataset 1.47, side by side in one run,
on the same URL list, the same loopback server and the same resize settings.

    .venv/bin/python -m benchmarks.bench_crawl [--images 3000] [--out benchmarks/out]

Both run on this machine with the same parallelism budget (processes x threads). Our crawl pays for
its safety checks (DNS pinning, robots.txt, byte/pixel caps) and Ray start-up; the number below is
end to end, start-up included, and also without it (the second, warm run of our crawl reuses Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import load_config
from pipelines.crawl import CrawlConfig, run
from pipelines.local_web import LocalWebServer, WebContent
from pipelines.synthetic import shape_samples


def run_ours(src: str, out: str, size: int, workers: int, threads: int) -> float:
    cfg = load_config(CrawlConfig, None, [
        f"input.paths=[{src}]", f"output.path={out}", "fetch.allow_networks=[127.0.0.1/32]",
        f"image.image_size={size}", "image.resize_mode=center_crop", f"workers={workers}",
        f"threads_per_worker={threads}", "rows_per_part=500", "fetch.max_per_host=64",
    ])
    t = time.time()
    m = run(cfg)
    assert m.rows_out > 0
    return time.time() - t


def run_img2dataset(src: str, out: str, size: int, processes: int, threads: int) -> float:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    t = time.time()
    download(url_list=src, input_format="parquet", url_col="url", caption_col="caption", output_folder=out,
             output_format="parquet", processes_count=processes, thread_count=threads, image_size=size,
             resize_mode="center_crop", number_sample_per_shard=1000, distributor="multiprocessing",
             enable_wandb=False, timeout=10, retries=0, disallowed_header_directives=[])
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    samples = shape_samples(args.images, px=256, seed=0)
    work = tempfile.mkdtemp(prefix="bench-crawl-")
    content = WebContent([s.image for s in samples], [s.caption for s in samples])
    procs, threads = 2, 16
    with LocalWebServer(content) as web:
        src = os.path.join(work, "list.parquet")
        pq.write_table(pa.Table.from_pylist(web.url_list()), src)
        t_i2d = run_img2dataset(src, os.path.join(work, "i2d"), args.size, procs, threads)
        t_cold = run_ours(src, os.path.join(work, "ours1"), args.size, procs, threads)
        t_warm = run_ours(src, os.path.join(work, "ours2"), args.size, procs, threads)
    n = args.images
    result = {"images": n, "size": args.size, "processes_or_actors": procs, "threads": threads,
              "img2dataset_s": round(t_i2d, 2), "ours_cold_s": round(t_cold, 2), "ours_warm_s": round(t_warm, 2),
              "img2dataset_img_per_s": round(n / t_i2d, 1), "ours_cold_img_per_s": round(n / t_cold, 1),
              "ours_warm_img_per_s": round(n / t_warm, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crawl.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = ("| crawler | seconds | images/s |\n|---|---|---|\n"
             f"| img2dataset 1.47 | {result['img2dataset_s']} | {result['img2dataset_img_per_s']} |\n"
             f"| ours, Ray start-up included | {result['ours_cold_s']} | {result['ours_cold_img_per_s']} |\n"
             f"| ours, warm Ray | {result['ours_warm_s']} | {result['ours_warm_img_per_s']} |\n")
    with open(os.path.join(args.out, "crawl.md"), "w") as f:
        f.write(f"{n} images of 256 px resized to {args.size} (center_crop), loopback server\n\n" + table)
    print(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
