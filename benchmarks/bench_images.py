"""The image step alone: process_image against the path it replaced, side by side, per image.

    .venv/bin/python -m benchmarks.bench_images [--images 400] [--size 224] [--repeats 3] [--threads 2]

Input: photo-like JPEGs of 300-700 px (benchmarks/photos.py), resized to `--size` px with a centre crop and
re-encoded as JPEG at quality 95 (ImageConfig's defaults otherwise).
- old: the former pipelines/images.py path: PIL full decode to verify, img2dataset 1.47's Resizer (decodes again
  with OpenCV, resizes, encodes; under the process-wide lock it needed), imagehash.phash of the encoded bytes
  (a third decode).
- new: process_image (header checks, one decode with JPEG DCT scaling, OpenCV resize, phash of the final
  pixels, one encode).
Single-thread latency: old and new alternate image by image (so a machine getting busier hurts both alike),
`--repeats` passes; mean, p50 and p99 wall ms per image, plus CPU ms (thread time, which other processes on a
shared machine disturb less). Then throughput in images/s with `--threads` threads calling each path at once.
Both paths' outputs are checked to agree (same sizes; pixels within a few levels). Writes
benchmarks/out/images.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from benchmarks.photos import photo_jpegs
from pipelines.core.images import ImageConfig, ImageResult, process_image


TARGET_MS = 2.5  # mean per 300-700 px photo at 224 px centre crop, one core


class OldPath:
    """The replaced implementation, kept here only to measure against."""

    def __init__(self, cfg: ImageConfig) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.resizer import Resizer  # ~3 s import

        self.resizer = Resizer(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation, downscale_interpolation=cfg.downscale_interpolation,
            encode_quality=cfg.encode_quality, encode_format=cfg.encode_format, min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_pixels,
            max_aspect_ratio=math.inf if cfg.max_aspect_ratio is None else cfg.max_aspect_ratio)
        self.cfg = cfg
        self.lock = threading.Lock()  # the Resizer dup2()s fds 1 and 2 on every call

    def __call__(self, body: bytes) -> ImageResult:
        import hashlib

        import imagehash

        with Image.open(io.BytesIO(body), formats=self.cfg.allowed_formats) as img:
            if img.width * img.height > self.cfg.max_pixels:
                return ImageResult(False, "decompression_bomb")
            img.load()
        with self.lock:
            image, width, height, ow, oh, err = self.resizer(io.BytesIO(body))
        if err is not None:
            return ImageResult(False, err)
        with Image.open(io.BytesIO(image)) as stored:
            unsigned = int(str(imagehash.phash(stored)), 16)
        phash = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
        return ImageResult(True, "ok", image, width, height, ow, oh, hashlib.sha256(image).hexdigest(), phash)


def stats(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def latency(paths: dict, bodies: list[bytes], repeats: int) -> dict[str, dict[str, float]]:
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for body in bodies:
            for name, fn in paths.items():  # alternate: both see the same machine state
                w0, c0 = time.perf_counter(), time.thread_time()
                result = fn(body)
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
                assert result.ok, (name, result.reason)
    return {name: {**stats(wall[name]), "cpu_mean_ms": float(np.mean(cpu[name]) * 1e3)} for name in paths}


def throughput(fn, bodies: list[bytes], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, bodies[:threads * 4]))  # warm the threads
        start = time.perf_counter()
        results = list(pool.map(fn, bodies))
        elapsed = time.perf_counter() - start
    assert all(r.ok for r in results)
    return len(bodies) / elapsed


def agreement(old: OldPath, bodies: list[bytes], cfg: ImageConfig) -> dict[str, float]:
    """Both paths' stored images: same size, and the mean absolute pixel difference (JPEG re-encode included)."""
    diffs = []
    for body in bodies:
        a, b = old(body), process_image(body, cfg)
        assert (a.width, a.height, a.original_width, a.original_height) == \
            (b.width, b.height, b.original_width, b.original_height)
        pa = np.asarray(Image.open(io.BytesIO(a.image)).convert("RGB"), np.int16)
        pb = np.asarray(Image.open(io.BytesIO(b.image)).convert("RGB"), np.int16)
        diffs.append(float(np.abs(pa - pb).mean()))
    return {"mean_abs_diff": float(np.mean(diffs)), "max_image_mean_abs_diff": float(np.max(diffs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()

    bodies = photo_jpegs(args.images)
    cfg = ImageConfig(image_size=args.size, resize_mode="center_crop")
    old = OldPath(cfg)
    new = lambda body: process_image(body, cfg)  # noqa: E731
    for body in bodies[:20]:  # warm-up: lazy imports, caches
        old(body), new(body)

    load_before = os.getloadavg()[0]
    lat = latency({"old": old, "new": new}, bodies, args.repeats)
    tput = {"old": throughput(old, bodies, args.threads), "new": throughput(new, bodies, args.threads)}
    report = {
        "images": len(bodies), "size": args.size, "repeats": args.repeats, "threads": args.threads,
        "mean_kb": float(np.mean([len(b) for b in bodies]) / 1024), "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_avg_1min": [load_before, os.getloadavg()[0]],
        "latency": lat, "speedup_mean": lat["old"]["mean_ms"] / lat["new"]["mean_ms"],
        "speedup_cpu": lat["old"]["cpu_mean_ms"] / lat["new"]["cpu_mean_ms"],
        "throughput_images_per_s": tput, "speedup_throughput": tput["new"] / tput["old"],
        "agreement": agreement(old, bodies[:100], cfg),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "images.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = [
        f"# Image step: {len(bodies)} photo-like JPEGs ({report['mean_kb']:.0f} KB mean, 300-700 px) -> "
        f"{args.size} px centre crop, JPEG q95",
        "",
        f"Load average (1 min) before/after: {load_before:.1f} / {report['load_avg_1min'][1]:.1f} on "
        f"{os.cpu_count()} cores.",
        "",
        "| path | mean ms | p50 ms | p99 ms | CPU mean ms | images/s with "
        f"{args.threads} threads |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("old", "new"):
        s = lat[name]
        md.append(f"| {name} | {s['mean_ms']:.2f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['cpu_mean_ms']:.2f} "
                  f"| {tput[name]:.0f} |")
    target = "met" if lat["new"]["mean_ms"] <= TARGET_MS else "NOT met"
    md += ["", f"Speed-up: {report['speedup_mean']:.2f}x mean latency, {report['speedup_cpu']:.2f}x CPU, "
               f"{report['speedup_throughput']:.2f}x throughput. Target <= {TARGET_MS} ms mean: {target}.",
           f"Outputs agree: same sizes; mean absolute pixel difference {report['agreement']['mean_abs_diff']:.2f} "
           f"(worst image {report['agreement']['max_image_mean_abs_diff']:.2f}) of 255.", ""]
    with open(os.path.join(args.out, "images.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
