"""Stage manifests: the commit record of a stage's output directory.

A stage writes its data files under deterministic names, then `_manifest.json` LAST. A directory
without a manifest is uncommitted (crashed or still running) whatever files it holds; readers
read only the files a manifest lists. A rerun whose fingerprint (config + inputs) matches the
committed one is skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines.core.storage import S3Options, Storage

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
REDACTED = "<redacted>"

# Config keys whose values must never reach a manifest or a log, whatever section they sit in.
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|private_key|access_key|api_key)", re.IGNORECASE)


class ManifestError(ValueError):
    pass


@dataclass
class FileEntry:
    # Relative to the stage's output directory, so a committed directory can be moved or copied.
    path: str
    rows: int
    bytes: int

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise ManifestError(f"file path {self.path!r} must be relative to the output directory")
        if self.rows < 0 or self.bytes < 0:
            raise ManifestError(f"file {self.path}: rows and bytes must be >= 0, got {self.rows}, {self.bytes}")


@dataclass
class Manifest:
    stage: str
    fingerprint: str
    files: list[FileEntry]
    # [{"name", "type", "nullable"}] per column: readable in the JSON, enough to check a reader's schema.
    schema: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int = 0
    rows_out: int = 0
    # Reject reason -> rows dropped; rows_in == rows_out + sum(rejected) must hold.
    rejected: dict[str, int] = field(default_factory=dict)
    # Phase name -> seconds.
    timings: dict[str, float] = field(default_factory=dict)
    # The resolved config with secrets redacted (see strip_secrets).
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    version: int = MANIFEST_VERSION
    # Stage-specific facts: the _rejected/ files, parts reused from an earlier run, eval overlap...
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = [f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files]
        # Redact here, not in the writer: no code path may put a secret into a manifest.
        self.config = strip_secrets(self.config)
        if not self.stage:
            raise ManifestError("manifest stage must not be empty")
        if not re.fullmatch(r"[0-9a-f]{64}", self.fingerprint or ""):
            raise ManifestError(f"manifest fingerprint must be a sha256 hex digest, got {self.fingerprint!r}")
        if min(self.rows_in, self.rows_out, *self.rejected.values(), 0) < 0:
            raise ManifestError(f"stage {self.stage}: row counts must be >= 0")
        dropped = sum(self.rejected.values())
        if self.rows_in != self.rows_out + dropped:
            raise ManifestError(
                f"stage {self.stage} does not account for every row: rows_in={self.rows_in} != "
                f"rows_out={self.rows_out} + rejected={dropped} {self.rejected}"
            )
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ManifestError(f"stage {self.stage}: a file is listed twice in {paths}")
        if MANIFEST_NAME in paths:
            raise ManifestError(f"stage {self.stage}: {MANIFEST_NAME} cannot list itself")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_json(text: str | bytes) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ManifestError(f"a manifest is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(Manifest)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown manifest fields {unknown} (version {data.get('version')!r})")
        if data.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {data.get('version')!r} is not the supported {MANIFEST_VERSION}")
        return Manifest(**data)

    def file_paths(self, directory: str = "") -> list[str]:
        """The committed files, joined onto `directory` (the manifest's own dir) for Storage calls."""
        prefix = directory.strip("/")
        return [f"{prefix}/{f.path}" if prefix else f.path for f in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def strip_secrets(config: Any) -> Any:
    if isinstance(config, Mapping):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else strip_secrets(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [strip_secrets(v) for v in config]
    return config


def canonical_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ManifestError(f"value is not plain JSON (convert configs with pipelines.config.to_dict): {err}") from err


def fingerprint(stage: str, config: Mapping[str, Any], input_manifests: Sequence[Manifest] = ()) -> str:
    """sha256 over the stage, its config (key order ignored) and what its inputs committed.

    Inputs count by their fingerprint and file list, in the given order (inputs play roles, e.g.
    train vs eval). Secrets are stripped first: rotating a key must not invalidate outputs.
    """
    payload = {
        "stage": stage,
        "config": strip_secrets(dict(config)),
        "inputs": [
            {"fingerprint": m.fingerprint, "files": [dataclasses.asdict(f) for f in m.files]} for m in input_manifests
        ],
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def write_manifest(storage: Storage, directory: str, manifest: Manifest) -> None:
    """Commit: check that every listed file is there with its size, then write the manifest last."""
    for entry, path in zip(manifest.files, manifest.file_paths(directory)):
        try:
            size = storage.size(path)
        except FileNotFoundError as err:
            raise ManifestError(f"cannot commit {storage.uri(directory)}: listed file {entry.path} is missing") from err
        if size != entry.bytes:
            raise ManifestError(
                f"cannot commit {storage.uri(directory)}: {entry.path} has {size} bytes, manifest says {entry.bytes}"
            )
    storage.write_bytes(storage.join(directory, MANIFEST_NAME), manifest.to_json().encode())


def read_manifest(storage: Storage, directory: str) -> Manifest | None:
    path = storage.join(directory, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(raw)
    except (ValueError, TypeError) as err:  # JSONDecodeError and ManifestError are ValueErrors
        raise ManifestError(f"corrupt manifest {storage.uri(path)}: {err}") from err


def committed(storage: Storage, fp: str, directory: str = "") -> Manifest | None:
    """The manifest committed in `directory` if it carries fingerprint `fp` (the same stage, config and
    inputs already finished there), else None. The one answer to "is this stage done?"."""
    manifest = read_manifest(storage, directory)
    return manifest if manifest is not None and manifest.fingerprint == fp else None


def read_committed(uri: str, s3: S3Options | None, what: str, column: str | None = None,
                   producer: str = "that") -> tuple[Storage, Manifest]:
    """(storage, manifest) of the committed stage output at `uri`; `what` names the setting or stage it came
    from in the error (an uncommitted directory is an error, never read as empty). With `column`, the output
    must carry that column (e.g. phash for an overlap check). `producer` names the stage that writes it."""
    storage = Storage.from_uri(uri, s3)
    manifest = read_manifest(storage, "")
    if manifest is None:
        raise FileNotFoundError(f"{what} {uri}: no _manifest.json there (not a committed stage output: run the "
                                f"{producer} stage first, or let it finish)")
    if column and manifest.schema and column not in [f["name"] for f in manifest.schema]:
        raise ValueError(f"{what} {uri}: stage {manifest.stage} has no {column} column")
    return storage, manifest


def format_funnel(manifest: Manifest) -> str:
    """The end-of-job summary: rows in, rows out and every drop reason, with shares of rows_in."""
    width = max([len("rows out"), *(len(r) + 2 for r in manifest.rejected)])

    def line(label: str, n: int) -> str:
        share = f"{100 * n / manifest.rows_in:6.1f}%" if manifest.rows_in else "      -"
        return f"  {label:<{width}}  {n:>12,}  {share}"

    dropped = sum(manifest.rejected.values())
    lines = [
        f"stage {manifest.stage}  (fingerprint {manifest.fingerprint[:12]})",
        line("rows in", manifest.rows_in),
        line("rows out", manifest.rows_out),
        line("dropped", dropped),
    ]
    for reason, n in sorted(manifest.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(line(f"  {reason}", n))
    lines.append(f"  files {len(manifest.files)}, {human_bytes(manifest.total_bytes)}")
    if manifest.timings:
        lines.append("  timings " + ", ".join(f"{k} {v:.2f} s" for k, v in manifest.timings.items()))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
