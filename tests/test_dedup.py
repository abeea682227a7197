"""The dedup stage end to end: planted duplicates and eval images, kill and rerun."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from pipelines.core.config import load_config
from pipelines.dedup.stage import DedupStageConfig, run
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import digit_samples, encode, shape_samples

from .stage_data import commit_rows, sample_row

# One shared local Ray for the session (tests/conftest.py), started after the S3 server.
pytestmark = pytest.mark.usefixtures("ray_session")


def _bits(a: int, b: int) -> int:
    return bin((a ^ b) & (2 ** 64 - 1)).count("1")


def _near(image: bytes) -> bytes:
    img = Image.open(io.BytesIO(image)).convert("RGB")
    # Smaller than the original: dedup keeps the largest original, so the original must survive.
    return encode(img.resize((56, 56), Image.BICUBIC), "JPEG", quality=75)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """120 distinct images + 10 exact copies + 10 near copies + 8 copies of eval images."""
    root = tmp_path_factory.mktemp("dedup")
    # Distinct means distinct: simple synthetic shapes of one colour on one background can be within
    # a few phash bits of each other (they are near-duplicates), so keep only originals > 12 bits apart.
    candidates = shape_samples(200, seed=21) + digit_samples("train", limit=60)
    originals, rows, kept_hashes = [], [], []
    for s in candidates:
        row = sample_row(s.image, s.caption, f"http://x.test/{len(originals)}.jpg")
        if all(_bits(row["phash"], h) > 12 for h in kept_hashes):
            originals.append(s)
            rows.append(row)
            kept_hashes.append(row["phash"])
        if len(originals) == 120:
            break
    assert len(originals) == 120
    for i in range(10):
        rows.append(sample_row(originals[i].image, f"copy {i} of an image", f"http://mirror.test/{i}.jpg"))
    for i in range(10, 20):
        rows.append(sample_row(_near(originals[i].image), f"resized copy {i}", f"http://other.test/{i}.jpg"))
    eval_images = [s for s in digit_samples("test")[:60] if all(
        _bits(ph, h) > 12 for ph in [sample_row(s.image, s.caption, "u")["phash"]] for h in kept_hashes)][:12]
    assert len(eval_images) == 12
    for j, s in enumerate(eval_images):
        d = root / "eval" / s.label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{j}.png").write_bytes(s.image)
    for j in range(8):
        rows.append(sample_row(eval_images[j].image, f"leaked eval image {j}", f"http://leak.test/{j}.jpg"))
    src = str(root / "filter")
    commit_rows(src, rows, rows_per_part=12, stage="filter")
    return root, src, rows


def dedup_args(src: str, out: str, eval_dir: str) -> list[str]:
    return [f"input={src}", f"output.path={out}", "ray.num_cpus=4",
            f"eval_sets=[{{name: digits, dataset: 'imagefolder:{eval_dir}'}}]"]


@pytest.fixture(scope="module")
def clean(planted):
    """One uninterrupted dedup of the planted set, shared by the tests below."""
    root, src, _ = planted
    out = str(root / "out")
    return out, run(load_config(DedupStageConfig, None, dedup_args(src, out, str(root / "eval"))))


def test_dedup_finds_planted_duplicates_and_eval_images(planted, clean) -> None:
    root, src, rows = planted
    out, m = clean
    assert m.rows_in == len(rows) == 148
    assert m.rejected.get("exact_dup_image", 0) == 10
    assert 9 <= m.rejected.get("near_dup_image", 0) <= 10  # recall on resized copies, no extra merges
    assert m.rejected.get("eval_overlap", 0) == 8
    assert m.rows_out == m.rows_in - sum(m.rejected.values())
    # The input has no colour_sig column (written in SAMPLE_SCHEMA): every signature came from the image
    # bytes, and the manifest says so.
    colour = m.extra["colour_sig"]
    assert colour["input_column"] is False and colour["computed_from_image"] == colour["rows"] == 148
    assert colour["undecodable_phash_only"] == 0 and colour["eval_images_phash_only"] == 0
    kept = Storage.from_uri(out).read_parquet(m.file_paths())
    kept_urls = set(kept.column("url").to_pylist())
    # Each planted group keeps exactly one member (no false merges between groups, nothing lost).
    for i in range(120):
        group = {f"http://x.test/{i}.jpg"}
        if i < 10:
            group.add(f"http://mirror.test/{i}.jpg")
        elif i < 20:
            group.add(f"http://other.test/{i}.jpg")
        assert len(group & kept_urls) == 1, (i, group & kept_urls)
    # Near copies are smaller than their originals; dedup keeps the largest, so the original.
    assert all(f"http://x.test/{i}.jpg" in kept_urls for i in range(10, 20))
    assert not any(u.startswith("http://leak.test/") for u in kept_urls)
    assert m.extra["eval_overlap"]["digits"]["train_rows_dropped"] == 8
    assert m.extra["eval_overlap"]["digits"]["eval_images_hit"] == 8
    rejected = Storage.from_uri(out).read_parquet([f["path"] for f in m.extra["rejected_files"]]).to_pylist()
    exact = [r for r in rejected if r["reason"] == "exact_dup_image"]
    by_key = {r["key"]: r for r in rows}
    assert len(exact) == 10
    for r in exact:  # detail names the kept row of the same group
        kept_row = by_key[r["detail"]]
        assert kept_row["url"] in kept_urls and kept_row["sha256"] == by_key[r["key"]]["sha256"]


def test_dedup_killed_midway_reruns_to_the_same_keys(planted, clean) -> None:
    import ray

    root, src, rows = planted
    clean, m_clean = clean
    killed = str(root / "killed")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.dedup", *dedup_args(src, killed, str(root / "eval")),
                             "workers=1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = os.path.join(killed, "_parts")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(parts) and len(os.listdir(parts)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(parts) and len(os.listdir(parts)) < len(m_clean.files) + 1, "not killed midway"
    assert not os.path.exists(os.path.join(killed, "_manifest.json"))
    m = run(load_config(DedupStageConfig, None, dedup_args(src, killed, str(root / "eval"))))
    keys = Storage.from_uri(killed).read_parquet(m.file_paths()).column("key").to_pylist()
    clean_keys = Storage.from_uri(clean).read_parquet(m_clean.file_paths()).column("key").to_pylist()
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(clean_keys)
    assert m.rejected == m_clean.rejected


def test_dedup_reads_stored_colour_and_computes_only_the_missing(tmp_path) -> None:
    """A crawl-like input with the colour_sig column: stored values are used; null rows get theirs from
    their image bytes (read back from their file) and are counted. A red and an orange triangle that phash
    cannot tell apart both stay; a re-encoded copy of the red one goes."""
    import random

    import numpy as np
    import pyarrow as pa

    from pipelines.core.images import colour_signature_of_encoded
    from pipelines.core.manifest import fingerprint
    from pipelines.core.parts import PartStore, finish_stage
    from pipelines.core.schema import CRAWL_SCHEMA, REJECTED_SCHEMA
    from pipelines.demo.synthetic import render_shape

    red = render_shape("triangle", "red", "small", "white", 64, random.Random(0))
    orange = render_shape("triangle", "orange", "small", "white", 64, random.Random(0))
    rows = [sample_row(encode(red), "a red triangle", "http://c.test/red.jpg"),
            sample_row(encode(orange), "an orange triangle", "http://c.test/orange.jpg"),
            sample_row(encode(red.resize((48, 48), Image.BICUBIC), quality=70), "red again", "http://c.test/red2.jpg")]
    assert _bits(rows[0]["phash"], rows[1]["phash"]) <= 8  # phash alone would merge red and orange
    noise = np.random.default_rng(9).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)  # unrelated to anything
    rows += [sample_row(encode(Image.fromarray(x).resize((64, 64), Image.BICUBIC)), f"noise {i}", f"http://c.test/{i}.jpg")
             for i, x in enumerate(noise)]
    for i, r in enumerate(rows):
        r["colour_sig"] = None if i in (1, 4) else colour_signature_of_encoded(r["image"])
    src = str(tmp_path / "filter")
    st = Storage.from_uri(src)
    store = PartStore(st, "filter", fingerprint("filter", {"colour": 1}))
    parts = [store.commit(f"part-{i:05d}", pa.Table.from_pylist(sorted(rows[i::2], key=lambda r: r["key"]),
                                                                schema=CRAWL_SCHEMA), REJECTED_SCHEMA.empty_table(),
                          len(rows[i::2])) for i in range(2)]
    finish_stage(st, "filter", store.fingerprint, parts, CRAWL_SCHEMA, {}, time.time(), [])
    m = run(load_config(DedupStageConfig, None, [f"input={src}", f"output.path={tmp_path / 'out'}", "ray.num_cpus=4"]))
    assert m.extra["colour_sig"] == {"input_column": True, "rows": 8, "stored": 6, "computed_from_image": 2,
                                     "undecodable_phash_only": 0, "eval_images_phash_only": 0}
    kept = set(Storage.from_uri(str(tmp_path / "out")).read_parquet(m.file_paths()).column("url").to_pylist())
    assert {"http://c.test/red.jpg", "http://c.test/orange.jpg"} <= kept
    assert "http://c.test/red2.jpg" not in kept and m.rejected.get("near_dup_image") == 1


def test_semantic_dedup_stage(tmp_path) -> None:
    """Semantic dedup on (a random tiny ViT, the threshold measured in test_dedup_core): 3 groups of a scene and
    two copies collapse to one row each with semantic_dup naming it, 12 distinct scenes stay, and a copy of an
    eval image goes as eval_semantic_dup. The pHash rules are pinned to exact matches so the copies (6-12 bits
    from their originals) reach the semantic step. With semantic off the fingerprint is the one from before
    the semantic keys existed (committed outputs stay valid)."""
    import torch

    from clip_model import build_model, get_config
    from clip_model.export import save_export
    from clip_model.tokenizer import ClipTokenizer
    from pipelines.core.config import to_dict
    from pipelines.core.manifest import fingerprint, read_committed
    from pipelines.dedup.stage import fingerprint_of

    from .stage_data import scene_copy, scene_images
    from .test_dedup_core import SEMANTIC_THRESHOLD

    torch.manual_seed(0)  # the model test_dedup_core measured
    ckpt = str(tmp_path / "tiny-vit")
    save_export(build_model(get_config("tiny-vit")), ckpt, ClipTokenizer.from_openai_bpe())
    scenes = scene_images(34, seed=7)
    rows, group = [], {}
    for g, im in enumerate(scenes[:15]):
        for k, b in enumerate([im] + ([scene_copy(im, 0), scene_copy(im, 1)] if g < 3 else [])):
            rows.append(sample_row(b, f"scene {g} copy {k}", f"http://s.test/{g}-{k}.jpg"))
            group[rows[-1]["key"]] = g
    for j, im in enumerate(scenes[30:]):
        (tmp_path / "eval" / "scene").mkdir(parents=True, exist_ok=True)
        (tmp_path / "eval" / "scene" / f"{j}.png").write_bytes(im)
    rows.append(sample_row(scene_copy(scenes[31], 1), "a leaked eval scene", "http://leak.test/1.jpg"))
    src = str(tmp_path / "filter")
    commit_rows(src, rows, rows_per_part=8, stage="filter")
    base = [f"input={src}", "ray.num_cpus=4", "dedup.hamming_threshold=0", "dedup.eval_hamming=0",
            f"eval_sets=[{{name: scenes, dataset: 'imagefolder:{tmp_path / 'eval'}'}}]"]
    on = [f"dedup.semantic.checkpoint={ckpt}", f"dedup.semantic.threshold={SEMANTIC_THRESHOLD}"]

    off = load_config(DedupStageConfig, None, base + [f"output.path={tmp_path / 'off'}"])
    conf = to_dict(off.dedup)
    del conf["semantic"], conf["rows_per_partition"], conf["max_shuffle_rows"]  # tasks, not results: not fingerprinted
    sizes = [{"name": "scenes", "files": 4, "bytes": sum(len(b) for b in scenes[30:])}]
    assert fingerprint_of(off) == fingerprint("dedup", {"dedup": conf, "eval_sets": sizes},
                                              [read_committed(src, None, "input")[1]])
    assert fingerprint_of(load_config(DedupStageConfig, None, base + on + [f"output.path={tmp_path}/x"])) \
        != fingerprint_of(off)
    assert fingerprint_of(load_config(DedupStageConfig, None, base + ["dedup.rows_per_partition=3",
                                                                      "dedup.max_shuffle_rows=5",
                                                                      f"output.path={tmp_path}/y"])) == fingerprint_of(off)

    out = str(tmp_path / "on")
    m = run(load_config(DedupStageConfig, None, base + on + [f"output.path={out}"]))
    assert m.rejected == {"semantic_dup": 6, "eval_semantic_dup": 1}
    sem = m.extra["semantic"]
    assert sem["embedded_rows"] == len(rows) == 22 and sem["eval_images"] == 4
    assert sem["semantic_dup"] == 6 and sem["eval_semantic_dup"] == 1 and sem["edges"] >= 6
    assert sem["clusters"] == 2 and "semantic_s" in m.timings
    kept = Storage.from_uri(out).read_parquet(m.file_paths()).column("key").to_pylist()
    assert sorted(group[k] for k in kept) == list(range(15))  # one row per scene, the leak gone
    rejected = Storage.from_uri(out).read_parquet([f["path"] for f in m.extra["rejected_files"]]).to_pylist()
    for r in rejected:
        if r["reason"] == "semantic_dup":
            rep, cos = r["detail"].split(" cos=")
            assert rep in kept and group[rep] == group[r["key"]] and float(cos) >= SEMANTIC_THRESHOLD
        else:
            assert r["reason"] == "eval_semantic_dup" and r["detail"].startswith("scenes#")
