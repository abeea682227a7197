"""The metadata file: JSON lines, a header line then one entry per line, sorted by entry.

    {"format": "clip-on-ray/metadata", "version": 1, "entries": N, "sha256": "<of the entry lines>", ...}
    {"entry": "new york", "sources": ["pmi_bigrams"], "pmi": 9.1, "count": 412}
    {"entry": "triangle", "sources": ["user:demo_vocabulary.txt", "wordfreq"], "zipf": 3.93}

An entry's id is its line number among the entries (0-based): curate's match files store ids, and
its fingerprint holds the sha256 of the entry lines, so ids never outlive the file they index. The
header's sha256 is checked on every read: a hand-edited or truncated file is refused, not half used.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.storage import S3Options, Storage

FORMAT = "clip-on-ray/metadata"
VERSION = 1


@dataclass
class Metadata:
    entries: list[str]
    # Per entry: {"sources": [...], and whatever the source recorded (zipf, pmi, count)}.
    info: list[dict[str, Any]]
    # sha256 of the entry lines: what a curate fingerprint records.
    sha256: str
    header: dict[str, Any] = field(default_factory=dict)


def _split(uri: str, s3: S3Options | None) -> tuple[Storage, str]:
    """A file uri as (storage of its directory, file name): Storage refuses paths that leave its root."""
    head, name = posixpath.split(uri.rstrip("/"))
    return Storage.from_uri(head or ".", s3), name


def entry_lines(entries: Sequence[str], info: Sequence[dict[str, Any]]) -> list[str]:
    return [json.dumps({"entry": e, **i}, ensure_ascii=False, sort_keys=True) for e, i in zip(entries, info)]


def write_metadata(uri: str, entries: Sequence[str], info: Sequence[dict[str, Any]], header: dict[str, Any],
                   s3: S3Options | None = None) -> str:
    """Write the file in one put (atomic locally, one object on S3); returns the entries' sha256."""
    if list(entries) != sorted(set(entries)):
        raise ValueError("metadata entries must be unique and sorted")
    lines = entry_lines(entries, info)
    body = "".join(line + "\n" for line in lines).encode()
    digest = hashlib.sha256(body).hexdigest()
    head = {"format": FORMAT, "version": VERSION, "entries": len(lines), "sha256": digest, **header}
    storage, name = _split(uri, s3)
    storage.write_bytes(name, json.dumps(head, sort_keys=True).encode() + b"\n" + body)
    return digest


def read_metadata(uri: str, s3: S3Options | None = None, what: str = "metadata", parse: bool = True) -> Metadata:
    """The file at `uri`, checked (format, version, sha256, entry count); errors name `what` and the path.
    parse=False checks the hash and the header only (entries and info come back empty): for fingerprints."""
    storage, name = _split(uri, s3)
    try:
        raw = storage.read_bytes(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {uri} does not exist (build one with python -m pipelines.metadata)") from None
    head_line, _, body = raw.partition(b"\n")
    try:
        head = json.loads(head_line)
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError(f"{what} {uri} is not a metadata file (its first line must be a {FORMAT} header; "
                         "build one with python -m pipelines.metadata)")
    if head.get("version") != VERSION:
        raise ValueError(f"{what} {uri} has format version {head.get('version')!r}; this code reads {VERSION}")
    digest = hashlib.sha256(body).hexdigest()
    if digest != head.get("sha256"):
        raise ValueError(f"{what} {uri}: its entries do not hash to the header's sha256 (edited or truncated); "
                         "rebuild it with python -m pipelines.metadata")
    entries, info = [], []
    if not parse:
        if not head.get("entries"):
            raise ValueError(f"{what} {uri} holds no entries")
        return Metadata(entries, info, digest, head)
    for line in body.decode().splitlines():
        row = json.loads(line)
        entries.append(row.pop("entry"))
        info.append(row)
    if len(entries) != head.get("entries") or not entries:
        raise ValueError(f"{what} {uri}: header says {head.get('entries')} entries, file holds {len(entries)}")
    return Metadata(entries, info, digest, head)
