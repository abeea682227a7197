from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.demo.local_s3 import LocalS3
from pipelines.core.manifest import (MANIFEST_NAME, FileEntry, Manifest, ManifestError, committed, fingerprint, format_funnel, read_manifest, schema_fields, strip_secrets, write_manifest)
from pipelines.core.storage import Storage, StorageError

CONFIG = {"min_side": 64, "langs": ["en", "de"], "clip": {"model": "ViT-B/32", "threshold": 0.28}}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "root"))
    return request.getfixturevalue("s3_storage")


def make_manifest(files: list[FileEntry], **kwargs: object) -> Manifest:
    rows = sum(f.rows for f in files)
    defaults = dict(stage="filter", fingerprint=fingerprint("filter", CONFIG), rows_in=rows, rows_out=rows)
    return Manifest(files=files, **{**defaults, **kwargs})


def part_table(i: int, rows: int) -> pa.Table:
    return pa.table({"key": [f"p{i}-{r}" for r in range(rows)], "value": [i * 1000 + r for r in range(rows)]})


def test_fingerprint_ignores_key_order() -> None:
    reordered = {"clip": {"threshold": 0.28, "model": "ViT-B/32"}, "langs": ["en", "de"], "min_side": 64}
    fp = fingerprint("filter", CONFIG)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint("filter", reordered) == fp


def test_fingerprint_sees_every_input() -> None:
    fp = fingerprint("filter", CONFIG)
    changed_config = {**CONFIG, "clip": {**CONFIG["clip"], "threshold": 0.3}}
    assert fingerprint("filter", changed_config) != fp
    assert fingerprint("dedup", CONFIG) != fp
    assert fingerprint("filter", {**CONFIG, "langs": ["de", "en"]}) != fp  # list order is meaningful
    upstream = make_manifest([FileEntry("part-0.parquet", 5, 100)], stage="crawl")
    with_input = fingerprint("filter", CONFIG, [upstream])
    assert with_input != fp
    regrown = make_manifest([FileEntry("part-0.parquet", 6, 120)], stage="crawl")
    assert fingerprint("filter", CONFIG, [regrown]) != with_input
    # Secrets are redacted before hashing: rotating a key keeps committed outputs valid.
    assert fingerprint("filter", {**CONFIG, "api_key": "a"}) == fingerprint("filter", {**CONFIG, "api_key": "b"})


def test_strip_secrets_is_recursive() -> None:
    cfg = {"s3": {"endpoint_url": "http://x", "secret_access_key": "S", "session_token": "T"}, "auth": [{"password": "p"}]}
    assert strip_secrets(cfg) == {
        "s3": {"endpoint_url": "http://x", "secret_access_key": "<redacted>", "session_token": "<redacted>"},
        "auth": [{"password": "<redacted>"}],
    }
    manifest = make_manifest([], config={"fetch": {"user_agent": "clip-bot", "proxy_password": "hunter2"}})
    assert "hunter2" not in manifest.to_json() and "clip-bot" in manifest.to_json()


def test_manifest_validation() -> None:
    with pytest.raises(ManifestError, match="does not account for every row: rows_in=10 != rows_out=7 \\+ rejected=2"):
        make_manifest([], rows_in=10, rows_out=7, rejected={"too_small": 2})
    with pytest.raises(ManifestError, match="must be relative"):
        FileEntry("/abs/part.parquet", 1, 1)
    with pytest.raises(ManifestError, match="sha256"):
        make_manifest([], fingerprint="abc")


def test_write_then_read_back(storage: Storage) -> None:
    files = []
    for i in range(3):
        table = part_table(i, 5 + i)
        files.append(FileEntry(f"part-{i:05d}.parquet", table.num_rows, storage.write_parquet(table, f"out/part-{i:05d}.parquet")))
    manifest = make_manifest(
        files, schema=schema_fields(table.schema), rows_in=20, rows_out=18, rejected={"bad": 2}, timings={"run": 1.5}
    )
    assert read_manifest(storage, "out") is None
    write_manifest(storage, "out", manifest)
    back = read_manifest(storage, "out")
    assert back == manifest
    assert back.schema == [
        {"name": "key", "type": "string", "nullable": True},
        {"name": "value", "type": "int64", "nullable": True},
    ]
    assert committed(storage, manifest.fingerprint, "out")
    assert not committed(storage, fingerprint("filter", {"other": 1}), "out")
    assert storage.read_parquet(back.file_paths("out")).num_rows == 18


def test_commit_refuses_missing_or_changed_files(storage: Storage) -> None:
    size = storage.write_parquet(part_table(0, 4), "out/part-0.parquet")
    with pytest.raises(ManifestError, match="listed file part-1.parquet is missing"):
        write_manifest(storage, "out", make_manifest([FileEntry("part-0.parquet", 4, size), FileEntry("part-1.parquet", 1, 9)]))
    with pytest.raises(ManifestError, match=f"part-0.parquet has {size} bytes, manifest says {size + 1}"):
        write_manifest(storage, "out", make_manifest([FileEntry("part-0.parquet", 4, size + 1)]))
    assert not storage.exists(f"out/{MANIFEST_NAME}")


def test_corrupt_manifest_names_its_path(storage: Storage) -> None:
    storage.write_bytes(f"out/{MANIFEST_NAME}", b'{"stage": "filter", "files": [')
    with pytest.raises(ManifestError, match=f"corrupt manifest {storage.uri('out/' + MANIFEST_NAME)}"):
        read_manifest(storage, "out")
    storage.write_bytes(f"out/{MANIFEST_NAME}", b'{"stage": "filter", "version": 1}')
    with pytest.raises(ManifestError, match="corrupt manifest"):
        read_manifest(storage, "out")


def test_format_funnel() -> None:
    manifest = make_manifest(
        [FileEntry("a.parquet", 870, 3 * 1024 * 1024)],
        rows_in=1000,
        rows_out=870,
        rejected={"bad_caption": 30, "too_small": 100},
        timings={"fetch": 12.0},
    )
    text = format_funnel(manifest)
    lines = text.splitlines()
    assert lines[0].startswith("stage filter")
    assert "rows in" in lines[1] and "1,000" in lines[1] and "100.0%" in lines[1]
    assert "rows out" in lines[2] and "870" in lines[2] and "87.0%" in lines[2]
    assert "dropped" in lines[3] and "130" in lines[3] and "13.0%" in lines[3]
    assert "too_small" in lines[4] and "10.0%" in lines[4]  # biggest drop first
    assert "bad_caption" in lines[5] and "3.0%" in lines[5]
    assert "files 1, 3.0 MiB" in text and "fetch 12.00 s" in text


# -- crash safety against a real object store ---------------------------------------------------

N_PARTS, ROWS = 6, 50
FP = fingerprint("kill-test", {"parts": N_PARTS})


def write_stage(storage: Storage, directory: str, after_part: Callable[[int], None] = lambda i: None) -> None:
    files = []
    for i in range(N_PARTS):
        name = f"part-{i:05d}.parquet"  # deterministic: a rerun overwrites, never duplicates
        table = part_table(i, ROWS)
        files.append(FileEntry(name, table.num_rows, storage.write_parquet(table, storage.join(directory, name))))
        after_part(i)
    total = N_PARTS * ROWS
    manifest = Manifest("kill-test", FP, files, schema_fields(table.schema), rows_in=total, rows_out=total)
    write_manifest(storage, directory, manifest)


@pytest.mark.slow
def test_killed_store_leaves_no_commit_and_rerun_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalS3(tmp_path / "s3", bucket="kill-test") as server:  # its own dir and ports
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        storage = Storage.from_uri(server.uri("stage"), server.s3_options(max_attempts=2))
        reached, resume, errors = threading.Event(), threading.Event(), []

        def pause_midway(i: int) -> None:
            if i == 2:
                reached.set()
                resume.wait(timeout=30)

        def run() -> None:
            try:
                write_stage(storage, "out", pause_midway)
            except Exception as err:
                errors.append(err)

        writer = threading.Thread(target=run)
        writer.start()
        assert reached.wait(timeout=30), "writer never reached the midpoint"
        server.kill()  # SIGKILL between parts 2 and 3: the store vanishes mid-stage
        resume.set()
        writer.join(timeout=60)
        assert not writer.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], StorageError), errors
        assert "cannot reach S3 endpoint" in str(errors[0])

        server.restart()
        assert storage.list("out") == [f"out/part-{i:05d}.parquet" for i in range(3)]  # data survived...
        assert read_manifest(storage, "out") is None  # ...but nothing is committed
        assert not committed(storage, FP, "out")

        write_stage(storage, "out")
        manifest = read_manifest(storage, "out")
        assert manifest is not None and committed(storage, FP, "out")
        assert [f.path for f in manifest.files] == [f"part-{i:05d}.parquet" for i in range(N_PARTS)]
        for i, path in enumerate(manifest.file_paths("out")):
            assert storage.read_parquet(path).equals(part_table(i, ROWS))
        assert storage.list("out") == sorted([*manifest.file_paths("out"), f"out/{MANIFEST_NAME}"])
