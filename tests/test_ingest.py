"""Ingest on real img2dataset output (img2dataset itself downloads from a loopback web server, in both its
Parquet and WebDataset formats), then filter -> dedup -> shard on the result, with the shard stage's
WebDataset tars read back by the `webdataset` library. Hostile shards are built by hand and ingested
without Ray."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.config import load_config
from pipelines.core.images import phash_of_encoded
from pipelines.core.manifest import read_manifest
from pipelines.core.parts import PartStore
from pipelines.core.schema import SAMPLE_SCHEMA, sample_key
from pipelines.core.storage import Storage
from pipelines.demo.local_web import LocalWebServer, WebContent
from pipelines.ingest.stage import IngestConfig, IngestShards, input_shards, run

from .readme import readme_block, readme_commands

GOOD = 12
# img2dataset in a child process: its downloader and logger start processes with "spawn", which must not
# re-import pytest's main module.
_I2D = """
import sys
from img2dataset import download
if __name__ == "__main__":
    for fmt, out in (("parquet", sys.argv[2]), ("webdataset", sys.argv[3])):
        download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
                 save_additional_columns=["query"], output_format=fmt, output_folder=out, image_size=32,
                 resize_mode="center_crop", processes_count=1, thread_count=4, timeout=10,
                 number_sample_per_shard=5, retries=0)
"""


def _picture(i: int) -> bytes:
    """A distinct picture per i (noise on a gradient: distinct phashes), JPEG or PNG, 40-64 px."""
    rng = np.random.default_rng(i)
    w, h = 40 + 2 * i, 64 - i
    base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG" if i % 3 == 0 else "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("img2dataset")
    content = WebContent(images=[_picture(i) for i in range(GOOD)],
                         captions=[f"a noisy gradient picture number {i}" for i in range(GOOD)],
                         queries=[f"query {i % 2}" for i in range(GOOD)])
    with LocalWebServer(content) as web:
        rows = web.url_list()
        rows.insert(3, dict(rows[2]))  # the same url and caption twice, in one img2dataset shard
        rows += [{"url": f"{web.base_url}/hostile/missing.jpg", "caption": "a picture that is gone", "query": "q"},
                 {"url": f"{web.base_url}/hostile/corrupt.jpg", "caption": "a picture that is broken", "query": "q"}]
        pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        subprocess.run([sys.executable, "-c", _I2D, str(root / "urls.parquet"), str(root / "parquet"),
                        str(root / "webdataset")], check=True, timeout=300, env=env, cwd=root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"root": root, "rows": rows}


def _stored_by_img2dataset(directory: str, fmt: str) -> dict[str, bytes]:
    """url -> the image bytes img2dataset stored."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if fmt == "parquet" and name.endswith(".parquet"):
            for r in pq.read_table(path, columns=["url", "jpg"]).to_pylist():
                if r["jpg"] is not None:
                    out[r["url"]] = r["jpg"]
        elif fmt == "webdataset" and name.endswith(".tar"):
            with tarfile.open(path) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
            for member, data in members.items():
                if member.endswith(".json"):
                    out[json.loads(data)["url"]] = members[member[:-5] + ".jpg"]
    return out


def _ingest(inp: str, out: str, *extra: str):
    return run(load_config(IngestConfig, None, [f"input={inp}", f"output.path={out}", "query_column=query",
                                                 "ray.num_cpus=4", *extra]))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_ingest_img2dataset_output(ray_session, downloads, tmp_path, fmt: str) -> None:
    src = str(downloads["root"] / fmt)
    m = _ingest(src, str(tmp_path / "ingest"))
    assert (m.stage, m.rows_in, m.rows_out) == ("ingest", GOOD + 3, GOOD)
    assert m.rejected == {"duplicate_input_row": 1, "img2dataset_failed_to_download": 1,
                          "img2dataset_failed_to_resize": 1}
    assert m.extra["format"] == fmt and len(m.files) == 3  # 15 rows in shards of 5
    out = Storage.from_uri(str(tmp_path / "ingest"))
    table = out.read_parquet(m.file_paths())
    assert table.schema.equals(SAMPLE_SCHEMA)
    stored = _stored_by_img2dataset(src, fmt)
    wanted = {r["url"]: r for r in downloads["rows"][:GOOD + 1]}
    for row in table.to_pylist():
        assert row["key"] == sample_key(row["url"], row["caption"])
        assert row["caption"] == wanted[row["url"]]["caption"] and row["query"] == wanted[row["url"]]["query"]
        assert row["image"] == stored[row["url"]]  # byte for byte what img2dataset stored
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["phash"] == phash_of_encoded(row["image"])
        assert (row["width"], row["height"]) == (32, 32) and row["original_width"] >= 40
    assert len(set(table.column("key").to_pylist())) == GOOD
    rejected = out.read_parquet([f["path"] for f in m.extra["rejected_files"]]).to_pylist()
    gone = next(r for r in rejected if r["reason"] == "img2dataset_failed_to_download")
    assert gone["url"].endswith("/hostile/missing.jpg") and "404" in gone["detail"]
    again = _ingest(src, str(tmp_path / "ingest"))  # committed: nothing to do
    assert again.fingerprint == m.fingerprint and again.created_at == m.created_at


def test_filter_dedup_shard_run_on_ingest_and_webdataset_reads_back(ray_session, downloads, tmp_path, monkeypatch) -> None:
    """The README's commands (ingest, filter, shard with tars) run as written, paths aside; then the README's
    readers (pandas, pyarrow, Ray Data, HF datasets, webdataset) read what they wrote."""
    import webdataset as wds

    from pipelines.dedup.stage import DedupStageConfig, run as dedup
    from pipelines.filter.stage import main as filter_main
    from pipelines.ingest.stage import main as ingest_main
    from pipelines.shard.stage import _write_tars, main as shard_main

    paths = {"out/": f"{tmp_path}/out/", "i2d": str(downloads["root"] / "webdataset")}
    img2dataset, ingest_cmd, filter_cmd = readme_commands("ingest", paths)
    (shard_cmd,) = readme_commands("shard", paths)
    assert ingest_main(ingest_cmd[3:] + ["ray.num_cpus=4"]) == 0
    assert filter_main(filter_cmd[3:] + ["ray.num_cpus=4"]) == 0
    unique = dedup(load_config(DedupStageConfig, None, [f"input={tmp_path}/out/filter",
                                                         f"output.path={tmp_path}/out/dedup", "ray.num_cpus=4"]))
    # The README's 1000 samples per tar, made 4 here so that a few rows make several tars.
    assert shard_main([a.replace("=1000", "=4") for a in shard_cmd[3:]] + ["rows_per_shard=6", "row_group_size=4"]) == 0
    out = Storage.from_uri(f"{tmp_path}/out/shards")
    shards = read_manifest(out, "")
    kept = read_manifest(Storage.from_uri(f"{tmp_path}/out/filter"), "")
    assert kept.rows_in == GOOD and kept.rows_out == unique.rows_in == unique.rows_out == shards.rows_out == GOOD
    parquet_rows = out.read_parquet(shards.file_paths()).to_pylist()  # in shard file order
    tars = shards.extra["webdataset"]["files"]
    assert [t["path"] for t in tars] == sorted(t["path"] for t in tars)
    assert all(0 < t["rows"] <= 4 for t in tars) and sum(t["rows"] for t in tars) == len(parquet_rows)
    assert all(out.size(t["path"]) == t["bytes"] for t in tars)
    tar_paths = [f"{tmp_path}/out/shards/{t['path']}" for t in tars]
    samples = list(wds.WebDataset(tar_paths, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in parquet_rows]
    for s, r in zip(samples, parquet_rows):
        image = s.get("jpg", s.get("png"))
        assert image == r["image"] and s["txt"].decode() == r["caption"]
        meta = json.loads(s["json"])
        assert meta["url"] == r["url"] and meta["sha256"] == r["sha256"] and meta["phash"] == r["phash"]
    # The same rows give the same tar bytes (fixed mtimes and owners): written again, the tars are equal.
    again = _write_tars(out, shards.files[0].path, "wds-again/shard", 4)
    first_tars = [t for t in tars if t["path"].startswith(f"wds/shard-{shards.fingerprint[:8]}-00000-")]
    assert [(e["rows"], out.read_bytes(e["path"])) for e in again] == \
        [(t["rows"], out.read_bytes(t["path"])) for t in first_tars]
    # The README's readers, run as written (the shard directory aside).
    ns: dict = {"tar_paths": tar_paths}
    exec(readme_block("webdataset"), ns)
    decoded = list(ns["samples"])
    assert len(decoded) == GOOD and decoded[0]["jpg"].size == (32, 32) and decoded[0]["txt"] == parquet_rows[0]["caption"]
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ns = {}
    exec(readme_block("readers").replace('"out/shards"', repr(f"{tmp_path}/out/shards")), ns)
    assert list(ns["df"]["key"]) == ns["table"].column("key").to_pylist() == [r["key"] for r in parquet_rows]
    assert ns["ds"].count() == GOOD and sorted(ns["ds"].to_pandas()["key"]) == sorted(ns["df"]["key"])
    assert len(ns["hf"]) == GOOD and ns["hf"][0]["image"].size == (32, 32)
    assert ns["hf"][0]["key"] == parquet_rows[0]["key"] and ns["df"]["image"][0] == parquet_rows[0]["image"]


def test_run_starts_from_an_img2dataset_download(ray_session, downloads, tmp_path, capsys) -> None:
    """The README's `python -m pipelines.run` from an img2dataset download (in-process, on the session's Ray),
    through shard: ingest is the source and the plan's first stage, each stage commits under
    root/<stage>/<fingerprint[:16]> and reads the one before; the same config then plans every stage as reuse."""
    from pipelines.run.dag import Selection, load_run_config, main, plan, stages

    selected = ("ingest", "filter", "dedup", "curate", "shard")
    (argv,) = readme_commands("run-ingest", {"i2d": str(downloads["root"] / "webdataset"), "out/": f"{tmp_path}/out/"})
    assert argv[:3] == ["python", "-m", "pipelines.run"] and argv[3] == "--config"
    root = tmp_path / "out" / "run"
    assert main([*argv[3:], "--only", ",".join(selected)]) == 0
    printed = capsys.readouterr().out.split("plan:\n", 1)[1].splitlines()[:7]  # the plan before any work
    assert [line.split()[:2] for line in printed] == [["ingest", "run"]] + [[s, "pending"] for s in selected[1:]] + [
        ["train", "skip"], ["evaluate", "skip"]]
    last = json.loads((root / "_last_run.json").read_text())
    assert last["failed"] is None
    assert [(s["stage"], s["action"]) for s in last["plan"]] == [(s, "run") for s in selected] + [
        ("train", "skip"), ("evaluate", "skip")]
    manifests = {}
    for step in last["plan"][:len(selected)]:
        path = root / step["stage"] / step["fingerprint"][:16]
        assert last["dirs"][step["stage"]] == str(path)
        m = manifests[step["stage"]] = read_manifest(Storage.from_uri(str(path)), "")
        assert (m.stage, m.fingerprint) == (step["stage"], step["fingerprint"])
    assert {d for d in os.listdir(root) if not d.startswith("_") and "." not in d} == set(selected)  # no crawl/
    # The same rows as ingest -> filter -> dedup -> shard by hand (the test above): the download's 12 pictures.
    assert (manifests["ingest"].rows_in, manifests["ingest"].rows_out) == (GOOD + 3, GOOD)
    for before, after in zip(selected, selected[1:]):
        assert manifests[after].rows_in == manifests[before].rows_out, after
    assert manifests["shard"].rows_out == GOOD
    assert 'id="stage-ingest"' in (root / "report.html").read_text()
    # Run again with the same config: every selected stage is reused; --from filter recomputes from filter on.
    cfg = load_run_config(argv[4], argv[5:])
    assert stages(cfg)[0] == "ingest" and cfg.crawl is None
    assert [s.action for s in plan(cfg, Selection(only=selected))] == ["reuse"] * 5 + ["skip"] * 2
    assert [s.action for s in plan(cfg, Selection(from_="filter"))] == ["reuse", "run"] + ["pending"] * 4 + ["skip"]


def test_readme_img2dataset_flags() -> None:
    """The README's img2dataset line uses flags img2dataset's `download` takes, with values it accepts."""
    import inspect

    from img2dataset import download

    (argv, *_) = readme_commands("ingest", {})
    assert argv[0] == "img2dataset"
    flags = dict(zip(argv[1::2], argv[2::2]))
    params = inspect.signature(download).parameters
    assert all(f.startswith("--") and f[2:] in params for f in flags), flags
    assert flags["--output_format"] in ("parquet", "webdataset") and flags["--input_format"] == "parquet"


def _tar(path, members: list[tuple[str, bytes]], cut_in: str | None = None) -> None:
    """A tar of `members`; with `cut_in`, the file ends halfway through that member's data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut_in:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            info = tar.getmember(cut_in)
        data = data[:info.offset_data + info.size // 2]
    path.write_bytes(data)


def test_hostile_shards_become_rejected_rows(tmp_path) -> None:
    """Every kind of bad sample is a counted reject; a truncated tar loses only what it cannot hold."""
    good = [_picture(i) for i in range(4)]
    src = tmp_path / "in"
    src.mkdir()
    meta = lambda url: json.dumps({"url": url}).encode()  # noqa: E731
    _tar(src / "00000.tar", [
        ("a.jpg", good[0]), ("a.txt", b"a fine caption"), ("a.json", meta("http://x/a")),
        ("b.jpg", good[1]), ("b.json", meta("http://x/b")),                       # no caption
        ("c.txt", b"no image here"), ("c.json", meta("http://x/c")),              # no image
        ("d.jpg", b"\xff\xd8 not really a jpeg"), ("d.txt", b"broken bytes"),     # undecodable
        ("e.jpg", good[2]), ("e.txt", b"bad metadata"), ("e.json", b"{not json"),  # bad json
        ("f.jpg", good[3]), ("f.txt", b"\xff\xfe latin-1 \xe9"),                   # not UTF-8
        ("g.jpg", good[0]), ("g.txt", b"a fine caption"), ("g.json", meta("http://x/a")),  # a's twin
        ("h.jpg", good[1]), ("h.txt", b"an image and caption"), ("h.json", b"[1, 2]"),  # json, not an object
    ])
    # A truncated tar with img2dataset's metadata beside it: what the tar lost is named by the metadata.
    _tar(src / "00001.tar", [("k1.jpg", good[1]), ("k1.txt", b"kept before the cut"),
                             ("k2.jpg", good[2]), ("k2.txt", b"lost in the cut")], cut_in="k2.jpg")
    pq.write_table(pa.Table.from_pylist([
        {"key": "k1", "url": "http://x/k1", "status": "success", "error_message": None},
        {"key": "k2", "url": "http://x/k2", "status": "success", "error_message": None},
        {"key": "k3", "url": "http://x/k3", "status": "failed_to_download", "error_message": "timed out"}]),
        src / "00001.parquet")
    _tar(src / "00002.tar", [("z.jpg", good[3])], cut_in="z.jpg")  # truncated, and no metadata to count by
    cfg = IngestConfig(input=str(src), output={"path": str(tmp_path / "out")})
    inp, shards = input_shards(cfg)
    assert [s["kind"] for s in shards] == ["webdataset"] * 3
    worker = IngestShards(inp, PartStore(Storage.from_uri(str(tmp_path / "out")), "ingest", "f" * 64), cfg)
    results = [worker.ingest(s["name"], s["path"], s["kind"]) for s in shards]
    assert (results[0].rows_in, results[0].rows_out) == (8, 1)
    assert results[0].rejected == {"bad_json": 2, "caption_missing": 1, "duplicate_input_row": 1,
                                   "image_missing": 1, "image_undecodable": 1, "invalid_utf8_caption": 1}
    assert (results[1].rows_in, results[1].rows_out) == (3, 1)
    assert results[1].rejected == {"img2dataset_failed_to_download": 1, "missing_from_tar": 1}
    assert (results[2].rows_in, results[2].rows_out, results[2].rejected) == (1, 0, {"unreadable_tar": 1})
    # A Parquet shard that is not Parquet at all, and one without image bytes for a row.
    (src / "garbage").mkdir()
    (src / "garbage" / "00000.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.Table.from_pylist([{"key": "p", "url": "http://x/p", "txt": "caption", "jpg": None,
                                          "status": "success"}]), src / "garbage" / "00001.parquet")
    cfg = IngestConfig(input=str(src / "garbage"), output={"path": str(tmp_path / "out2")})
    inp, shards = input_shards(cfg)
    worker = IngestShards(inp, PartStore(Storage.from_uri(str(tmp_path / "out2")), "ingest", "f" * 64), cfg)
    results = [worker.ingest(s["name"], s["path"], s["kind"]) for s in shards]
    assert [r.rejected for r in results] == [{"unreadable_file": 1}, {"image_missing": 1}]
    with pytest.raises(FileNotFoundError, match="no .parquet shards"):
        input_shards(IngestConfig(input=str(tmp_path / "out2" / "_parts")))


def test_shipped_config_loads() -> None:
    cfg = load_config(IngestConfig, "configs/ingest.yaml", [])
    assert (cfg.format, cfg.output.path, cfg.query_column) == ("auto", "out/ingest", None)
    with pytest.raises(ValueError, match="ingest.format must be one of"):
        load_config(IngestConfig, "configs/ingest.yaml", ["format=tfrecord"])
