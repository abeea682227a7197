"""The data contracts between stages: sample rows and rejected rows (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa

# One row per image-text pair. Stages may append columns (e.g. clip_score) but never drop these.
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()),  # stable id: sample_key(url, caption)
    ("url", pa.string()),
    ("caption", pa.string()),
    ("query", pa.string()),  # the metadata query / source the pair came from ("" if unknown)
    ("image", pa.binary()),  # encoded bytes (JPEG by default)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),  # hex digest of the stored image bytes
    ("phash", pa.int64()),  # 64-bit perceptual hash of the stored image, as a signed int64
])

# Optional sample columns: the crawl writes them, older outputs and other tools' data may lack them, and a
# stage that needs one computes it from `image` for the rows without it (and counts those rows).
COLOUR_SIG = pa.field("colour_sig", pa.int64())  # core.images.colour_signature of the stored image
# What the crawl writes: the contract plus its optional columns.
CRAWL_SCHEMA = SAMPLE_SCHEMA.append(COLOUR_SIG)

# Every input row a stage does not pass on lands here, so that rows_in = rows_out + rejected.
REJECTED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),  # free text: the kept duplicate's key, the HTTP status, the eval set...
])


def sample_key(url: str, caption: str) -> str:
    """Stable across runs and machines; distinct (url, caption) pairs get distinct keys."""
    return hashlib.sha256(f"{url}\x00{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:24]


def rejected_table(keys: Sequence[str] | pa.Array | pa.ChunkedArray, urls: Sequence[str] | pa.Array | pa.ChunkedArray,
                   stage: str, reasons: Sequence[str], details: Sequence[str] | None = None) -> pa.Table:
    """The rejected rows of one stage, in the one schema every stage writes to `_rejected/`."""
    n = len(reasons)
    return pa.table({
        "key": keys, "url": urls, "stage": pa.array([stage] * n, pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
        "detail": pa.array(list(details) if details is not None else [""] * n, pa.string()),
    }, schema=REJECTED_SCHEMA)
