"""Photo-like JPEGs for crawl benchmarks: 300-700 px, a photo's mix of smooth regions, texture and grain.

Flat synthetic shapes decode and compress unlike photos (a 256 px shape is ~5 KB; a 500 px photo is
50-100 KB), which would flatter the decode-bound part of a crawl. These images land near real web JPEGs
in size (mean ~75 KB at quality 90) and decode time (~1 ms for 500x500 on this machine).
Generated once per (count, seed) and cached under ~/.cache/clip-on-ray/ (about 18 ms per image).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CACHE = os.path.expanduser("~/.cache/clip-on-ray")


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Low-frequency colour field (objects, sky) + mid-frequency texture + sensor grain.
    base = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    low = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.float32)
    mid_small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    mid = np.asarray(Image.fromarray(mid_small).resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels = low * 0.7 + mid * 0.3 + rng.normal(0, 6, low.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(args: tuple[int, int]) -> bytes:
    index, seed = args
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(300, 701, size=2))
    buf = io.BytesIO()
    photo(rng, width, height).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n photo-like JPEGs, the same bytes for the same (n, seed) on every machine and run."""
    path = os.path.join(CACHE, f"photos-{n}-{seed}.parquet")
    if os.path.exists(path):
        return pq.read_table(path).column("jpeg").to_pylist()
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        images = pool.map(_encode, [(i, seed) for i in range(n)], chunksize=64)
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(pa.table({"jpeg": pa.array(images, pa.binary())}), tmp)
    os.replace(tmp, path)
    return images
