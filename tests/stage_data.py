"""Committed stage outputs made directly (no crawl), for testing the stages that read them."""

from __future__ import annotations

import time

import pyarrow as pa

from pipelines.core.images import process_image, ImageConfig
from pipelines.core.manifest import fingerprint
from pipelines.core.schema import REJECTED_SCHEMA, SAMPLE_SCHEMA, sample_key
from pipelines.core.parts import PartStore, finish_stage
from pipelines.core.storage import Storage


def sample_row(image: bytes, caption: str, url: str, query: str = "", cfg: ImageConfig | None = None) -> dict:
    res = process_image(image, cfg or ImageConfig(image_size=64, resize_mode="keep_ratio"))
    assert res.ok, res.reason
    return {"key": sample_key(url, caption), "url": url, "caption": caption, "query": query, "image": res.image,
            "width": res.width, "height": res.height, "original_width": res.original_width,
            "original_height": res.original_height, "sha256": res.sha256, "phash": res.phash}


def commit_rows(uri: str, rows: list[dict], rows_per_part: int = 50, stage: str = "crawl", s3=None) -> None:
    """Write rows as a committed stage output (parts + manifest), as the crawl would."""
    st = Storage.from_uri(uri, s3)
    fp = fingerprint(stage, {"test": uri, "n": len(rows)})
    store = PartStore(st, stage, fp)
    parts = []
    for i in range(0, max(len(rows), 1), rows_per_part):
        chunk = sorted(rows[i:i + rows_per_part], key=lambda r: r["key"])  # stages commit parts in key order
        parts.append(store.commit(f"part-{i // rows_per_part:05d}", pa.Table.from_pylist(chunk, schema=SAMPLE_SCHEMA),
                                  REJECTED_SCHEMA.empty_table(), len(chunk)))
    finish_stage(st, stage, fp, parts, SAMPLE_SCHEMA, {}, time.time(), [])


def scene_images(n: int, seed: int) -> list[bytes]:
    """n distinct synthetic "scenes": 4x4 random colour fields upscaled to 64 px (smooth, so a random tiny ViT,
    which sees mostly mean patch colours, tells them apart; see test_dedup_core's semantic tests)."""
    import numpy as np
    from PIL import Image

    from pipelines.demo.synthetic import encode

    cells = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [encode(Image.fromarray(c).resize((64, 64), Image.BICUBIC), "PNG") for c in cells]


def scene_copy(image: bytes, k: int) -> bytes:
    """A semantic (not byte-level) copy: cropped by 2+k px a side and resized back, recoloured slightly,
    re-encoded as JPEG at quality 60+10k."""
    import io

    from PIL import Image, ImageEnhance

    from pipelines.demo.synthetic import encode

    img = Image.open(io.BytesIO(image)).convert("RGB")
    w, h = img.size
    c = 2 + k
    img = ImageEnhance.Color(img.crop((c, c, w - c, h - c)).resize((w, h), Image.BICUBIC)).enhance(0.9 + 0.05 * k)
    return encode(img, "JPEG", quality=60 + 10 * k)
