"""pipelines.evaluate end to end on a local Ray: a tiny random CLIP, synthetic ImageFolder / Parquet sets.

Checks against in-process computations with the same weights and images, and against "rigged"
checkpoints whose answers are known by construction (the vision projection is solved so that each
image embeds exactly onto a chosen text embedding).
"""

from __future__ import annotations

import copy
import random
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from clip_model.config import get_config
from clip_model.export import save_export
from clip_model.model import build_model
from clip_model.tokenizer import ClipTokenizer
from clip_model.transforms import EvalTransform
from clip_model.zeroshot import build_classifier, classification_metrics
from pipelines.evaluate.stage import EvalConfig, evaluate, main
from pipelines.evaluate.linear_probe import ProbeConfig, linear_probe, split_indices
from pipelines.core.manifest import FileEntry, Manifest, schema_fields, write_manifest
from pipelines.core.images import phash_of_encoded
from pipelines.dedup.near_dup import hamming
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import encode, render_shape, shape_samples
from tests.conftest import actors_created

REPO = Path(__file__).resolve().parents[1]
# Distinct colours, large shapes, plain backgrounds: a random network's features separate these
# classes linearly (measured: probe test accuracy 1.0; with noisy backgrounds only ~0.8).
CLASSES = ["red circle", "green square", "blue triangle", "yellow cross"]
PER_CLASS = 12
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "an image of the {} shape"]


@pytest.fixture(scope="module")
def ray_local(ray_session) -> None:
    """The session's shared Ray (tests/conftest.py)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def tiny(work: Path) -> tuple[str, torch.nn.Module, ClipTokenizer]:
    torch.manual_seed(0)
    model = build_model(get_config("tiny-vit")).eval()
    tok = ClipTokenizer.from_openai_bpe()
    save_export(model, str(work / "tiny"), tok)
    return str(work / "tiny"), model, tok


@pytest.fixture(scope="module")
def folder(work: Path) -> tuple[str, list[str], np.ndarray]:
    """ImageFolder with PER_CLASS images per class; returns (dir, absolute paths sorted, labels)."""
    root, rng = work / "folder", random.Random(1)
    for name in CLASSES:
        colour, shape = name.split()
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = render_shape(shape, colour, "large", rng.choice(["white", "grey"]), 32, rng)
            (root / name.replace(" ", "_") / f"{i:03d}.jpg").write_bytes(encode(img))
    paths = sorted(str(p) for p in root.glob("*/*.jpg"))
    folders = sorted(c.replace(" ", "_") for c in CLASSES)
    labels = np.array([folders.index(Path(p).parent.name) for p in paths])
    return str(root), paths, labels


@pytest.fixture(scope="module")
def templates_file(work: Path) -> str:
    path = work / "templates.txt"
    path.write_text("\n".join(TEMPLATES))
    return str(path)


def _embed(model: torch.nn.Module, images: list[bytes]) -> torch.Tensor:
    tf = EvalTransform(model.image_size)
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack([tf(b) for b in images])), dim=-1)


def _tokenize(model: torch.nn.Module, tok: ClipTokenizer):
    return lambda texts: tok(texts, context_length=model.context_length)


def _rig(model: torch.nn.Module, images: list[bytes], targets: torch.Tensor) -> torch.nn.Module:
    """A copy whose vision projection maps image i exactly onto targets[i] (least squares on ln_post)."""
    feats = []
    hook = model.visual.ln_post.register_forward_hook(lambda m, i, o: feats.append(o.detach()))
    _embed(model, images)
    hook.remove()
    h = torch.cat(feats).double()  # N, width
    proj = torch.linalg.lstsq(h, targets.double()).solution  # width, D
    assert torch.allclose(h @ proj, targets.double(), atol=1e-6), "test premise: image features of full rank"
    rigged = copy.deepcopy(model)
    rigged.visual.proj.data = proj.float()
    return rigged


def _planted_manifest(root: Path, train_phashes: list[int | None]) -> str:
    st = Storage.from_uri(str(root))
    table = pa.table({"key": [f"k{i}" for i in range(len(train_phashes))],
                      "phash": pa.array(train_phashes, pa.int64())})
    size = st.write_parquet(table, "part-00000.parquet")
    n = table.num_rows
    write_manifest(st, "", Manifest(stage="shard", fingerprint="0" * 64, files=[FileEntry("part-00000.parquet", n, size)],
                                    schema=schema_fields(table.schema), rows_in=n, rows_out=n))
    return str(root)


def test_zeroshot_matches_in_process_and_overlap_split(ray_local, work, tiny, folder, templates_file) -> None:
    ckpt, model, tok = tiny
    root, paths, labels = folder
    images = [Path(p).read_bytes() for p in paths]
    # Training rows: copies of eval images 0, 5, 30; near copies of 17 and 40 (their hashes with 3
    # and 7 bits flipped: within 8 bits); image 44's hash 12 bits off (a miss, unless another image
    # is near it); a null; random hashes (P(within 8 bits of an image) ~ 1e-11).
    eval_ph = np.array([phash_of_encoded(b) for b in images])
    flip = lambda i, bits: int(eval_ph[i] ^ np.int64(sum(1 << (3 * b + 1) for b in range(bits))))  # noqa: E731
    rand = np.random.default_rng(0).integers(-(1 << 63), (1 << 63) - 1, 300, dtype=np.int64)
    train = [int(eval_ph[0]), int(eval_ph[5]), int(eval_ph[30]), flip(17, 3), flip(40, 7), flip(44, 12), None,
             *map(int, rand)]
    manifest = _planted_manifest(work / "train_stage", train)

    out = work / "zs"
    # local_images=0: a pool of embedding actors, whatever the set's size.
    before = actors_created("ImageEmbedder")
    res = evaluate(EvalConfig(checkpoint=ckpt, dataset=f"imagefolder:{root}", output=str(out), local_images=0,
                              templates=templates_file, train_manifest=manifest, workers=2, batch_size=16))
    pooled = actors_created("ImageEmbedder")
    assert pooled > before
    # The default embeds a set this small on the driver, with the model it loaded: no actor, the same results.
    local = evaluate(EvalConfig(checkpoint=ckpt, dataset=f"imagefolder:{root}", output=str(work / "zs_local"),
                                templates=templates_file, train_manifest=manifest, batch_size=16, plots=False))
    assert actors_created("ImageEmbedder") == pooled
    for key in ("modes", "overlap", "n", "classnames"):
        assert local[key] == res[key], key

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["top1"] == res["top1"] and on_disk["modes"]["ensemble"]["templates"] == 3
    for png in ("confusion.png", "per_class_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same weights, same images, computed here without Ray.
    img = _embed(model, images)
    y = torch.as_tensor(labels)
    for mode, temps in (("single", ["a photo of a {}."]), ("ensemble", TEMPLATES)):
        w = build_classifier(model.encode_text, _tokenize(model, tok), CLASSES_SORTED, temps)
        want = classification_metrics(img @ w, y, len(CLASSES))
        got = res["modes"][mode]
        assert got["confusion"] == want["confusion"]
        assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
        assert list(got["per_class"].values()) == pytest.approx(want["per_class"])
        if mode == "ensemble":
            correct = ((img @ w).argmax(1) == y).numpy()
    assert res["top1"] == res["modes"]["ensemble"]["top1"] and res["top5"] == 1.0  # 4 classes: top5 trivially 1
    assert res["classnames"] == CLASSES_SORTED

    # Overlap: exactly the eval images within 8 bits of some training hash (brute force here).
    known = np.array([h for h in train if h is not None], dtype=np.int64)
    expect = (hamming(eval_ph[:, None], known[None, :]) <= 8).any(axis=1)
    assert expect[[0, 5, 17, 30, 40]].all() and not expect.all()
    ov = res["overlap"]
    assert sorted(ov["overlap_ids"]) == [paths[i] for i in np.flatnonzero(expect)]
    assert ov["n"] == {"all": len(paths), "clean": int((~expect).sum()), "overlap": int(expect.sum())}
    assert ov["top1"]["clean"] == pytest.approx(correct[~expect].mean())
    assert ov["top1"]["overlap"] == pytest.approx(correct[expect].mean())
    assert ov["top1"]["all_minus_clean"] == pytest.approx(correct.mean() - correct[~expect].mean())


CLASSES_SORTED = sorted(CLASSES, key=lambda c: c.replace(" ", "_"))  # folder order = label order


def test_rigged_checkpoint_scores_perfect_zeroshot_with_the_ensemble(ray_local, work, tiny, folder,
                                                                     templates_file) -> None:
    _, model, tok = tiny
    root, paths, labels = folder
    images = [Path(p).read_bytes() for p in paths]
    w = build_classifier(model.encode_text, _tokenize(model, tok), CLASSES_SORTED, TEMPLATES)  # D, C
    rigged = _rig(model, images, w[:, labels].T)  # every image lands on its class's ensemble column
    save_export(rigged, str(work / "rigged"), tok)

    res = evaluate(EvalConfig(checkpoint=str(work / "rigged"), dataset=f"imagefolder:{root}",
                              output=str(work / "rigged_out"), templates=templates_file, workers=1, plots=False))
    assert res["top1"] == 1.0 and res["modes"]["ensemble"]["top1"] == 1.0
    assert set(res["per_class"].values()) == {1.0}
    assert not (work / "rigged_out" / "confusion.png").exists()


def test_linear_probe_separates_colours(ray_local, work, tiny, folder) -> None:
    ckpt, model, _ = tiny
    root, paths, labels = folder
    res = evaluate(EvalConfig(checkpoint=ckpt, dataset=f"imagefolder:{root}", output=str(work / "probe"),
                              task="linear-probe", workers=1))
    p = res["probe"]
    assert p["n_train"] + p["n_test"] == len(paths) and p["n_test"] == len(paths) // 2
    assert p["n_fit"] + p["n_val"] == p["n_train"]
    assert res["top1"] >= 0.9, res
    # The same split and C refitted here give the same test accuracy.
    feats = _embed(model, [Path(x).read_bytes() for x in paths]).numpy()
    tr, te = split_indices(labels, 0.5, 0, "train/test")
    direct = linear_probe(feats[tr], labels[tr], feats[te], labels[te], ProbeConfig())
    assert direct["best_C"] == pytest.approx(p["best_C"])
    assert res["top1"] == pytest.approx(float((direct["scores"].argmax(1) == labels[te]).mean()))


def test_linear_probe_on_blobs_and_split_rules() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 3
    y = np.repeat(np.arange(5), 40)
    x = centres[y] + rng.normal(size=(200, 16))
    tr, te = split_indices(y, 0.5, 0, "t")
    assert np.array_equal(tr, split_indices(y, 0.5, 0, "t")[0])  # deterministic
    assert np.bincount(y[te]).tolist() == [20] * 5  # stratified
    out = linear_probe(x[tr], y[tr], x[te], y[te], ProbeConfig())
    assert float((out["scores"].argmax(1) == y[te]).mean()) >= 0.95
    scores = out["val_accuracy_by_C"]
    assert len(scores) >= 8  # the 7-point grid plus at least one refinement midpoint
    assert scores[f"{out['best_C']:.6g}"] == max(scores.values())
    with pytest.raises(ValueError, match="classes \\[2\\] have fewer than 2"):
        split_indices(np.array([0, 0, 1, 1, 2]), 0.5, 0, "test")
    with pytest.raises(ValueError, match="test_fraction"):
        ProbeConfig(test_fraction=1.5)


def test_retrieval_known_answer(ray_local, work, tiny) -> None:
    _, model, tok = tiny
    samples = shape_samples(16, px=32, seed=3)
    captions = [f"{s.caption} number {i}" for i, s in enumerate(samples)]
    txt = F.normalize(model.encode_text(tok(captions, context_length=model.context_length)).detach(), dim=-1)
    # Images 0-7 embed onto their neighbour's caption (0<->1, 2<->3, ...), images 8-15 onto their own:
    # R@1 must be exactly 1/2 both ways, which also fails if the job misaligns images and captions.
    target = [i ^ 1 if i < 8 else i for i in range(16)]
    rigged = _rig(model, [s.image for s in samples], txt[target])
    save_export(rigged, str(work / "rigged_ret"), tok)
    path = work / "pairs.parquet"
    pq.write_table(pa.table({"image": [s.image for s in samples], "caption": captions}), path)

    res = evaluate(EvalConfig(checkpoint=str(work / "rigged_ret"), dataset=f"parquet:{path}",
                              output=str(work / "ret"), task="retrieval", workers=1))
    assert res["n_images"] == 16 and res["n_texts"] == 16
    assert res["image_to_text_R@1"] == 0.5 and res["text_to_image_R@1"] == 0.5
    assert res["image_to_text_R@10"] >= 0.5 and json.loads((work / "ret" / "results.json").read_text())["n_texts"] == 16


def test_bad_inputs_name_the_input(ray_local, work, tiny, folder, capsys) -> None:
    ckpt, _, _ = tiny
    root, _, _ = folder
    base = dict(dataset=f"imagefolder:{root}", output=str(work / "bad"))
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope"):
        evaluate(EvalConfig(checkpoint=str(work / "nope"), **base))
    with pytest.raises(FileNotFoundError, match="templates 'fancy'"):
        evaluate(EvalConfig(checkpoint=ckpt, templates="fancy", **base))
    names = work / "three.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="4 class folders but 3 class names"):
        evaluate(EvalConfig(checkpoint=ckpt, classnames=str(names), **base))
    with pytest.raises(ValueError, match="retrieval needs parquet"):
        evaluate(EvalConfig(checkpoint=ckpt, task="retrieval", **base))
    with pytest.raises(ValueError, match="task must be one of"):
        EvalConfig(checkpoint=ckpt, task="knn", **base)
    with pytest.raises(FileNotFoundError, match="train_manifest .*no _manifest.json"):
        evaluate(EvalConfig(checkpoint=ckpt, train_manifest=str(work), workers=1, plots=False, **base))
    assert main([f"checkpoint={work / 'gone'}", f"dataset=imagefolder:{root}", f"output={work}"]) == 2
    err = capsys.readouterr().err
    assert "pipelines.evaluate: error: checkpoint" in err and "gone" in err


def test_cli_runs_and_agrees_with_in_process(ray_local, work, tiny, folder) -> None:
    import ray

    ckpt, model, tok = tiny
    root, paths, labels = folder
    out = work / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.evaluate", f"checkpoint={ckpt}", f"dataset=imagefolder:{root}",
         "templates=simple", "task=zeroshot", f"output={out}", "workers=1",
         f"ray.address={ray.get_runtime_context().gcs_address}", "plots=false"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert "top1" in proc.stdout and "ensemble" in proc.stdout
    w = build_classifier(model.encode_text, _tokenize(model, tok), CLASSES_SORTED, ["a photo of a {}."])
    want = classification_metrics(_embed(model, [Path(p).read_bytes() for p in paths]) @ w,
                                  torch.as_tensor(labels), len(CLASSES))
    # "simple" is the single template: both modes equal the direct computation.
    assert res["top1"] == pytest.approx(want["top1"])
    assert res["modes"]["ensemble"]["confusion"] == res["modes"]["single"]["confusion"] == want["confusion"]


def test_parquet_set_in_a_wider_label_space(ray_local, work, tiny, folder, templates_file) -> None:
    """The demo's compositional test: images of 4 classes scored against 6 names (2 decoys with no images).
    The rigged images land on the decoy 'purple star' for one class: those count as wrong, and the table and
    per-class plot list only the classes that have images."""
    _, model, tok = tiny
    _, paths, labels = folder
    images = [Path(p).read_bytes() for p in paths]
    names = CLASSES_SORTED + ["purple star", "orange ring"]
    (work / "wide_names.json").write_text(json.dumps(names))
    w = build_classifier(model.encode_text, _tokenize(model, tok), names, TEMPLATES)  # D, 6
    target = np.where(labels == 0, 4, labels)  # class 0's images embed onto the decoy 'purple star'
    save_export(_rig(model, images, w[:, target].T), str(work / "rigged_wide"), tok)
    path = work / "wide.parquet"
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64())}), path)

    out = work / "wide_out"
    res = evaluate(EvalConfig(checkpoint=str(work / "rigged_wide"), dataset=f"parquet:{path}", output=str(out),
                              classnames=str(work / "wide_names.json"), templates=templates_file, workers=1))
    assert res["classnames"] == names and res["n"] == len(images)
    assert res["support"] == [PER_CLASS] * 4 + [0, 0]
    assert res["top1"] == pytest.approx(0.75)  # class 0 (a quarter of the images) answered with a decoy
    assert res["per_class"][names[0]] == 0.0 and res["per_class"][names[1]] == 1.0
    assert res["confusion"][0][4] == PER_CLASS
    from pipelines.evaluate.stage import format_table

    table = format_table(res)
    assert "(2 more classes in the label space, no images)" in table
    assert "purple star" not in table and names[0] in table
    assert (out / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_views_of_one_set_share_one_embedding_pass(ray_local, work, tiny, folder, templates_file) -> None:
    """Several jobs on one Parquet set, each with its own label column, class names and single template (the
    demo's pair / colour / shape views): the stage embeds the images once, and every view's results equal
    those of the same job evaluated on its own."""
    from pipelines.evaluate.jobs import EvalJob, EvaluateStageConfig, run as run_jobs

    _, model, tok = tiny
    _, paths, labels = folder
    images = [Path(p).read_bytes() for p in paths]
    colours = ["blue", "green", "red", "yellow"]
    shapes = ["circle", "cross", "square", "triangle"]
    colour_of = [colours.index(CLASSES_SORTED[i].split()[0]) for i in labels]
    shape_of = [shapes.index(CLASSES_SORTED[i].split()[1]) for i in labels]
    path = work / "views.parquet"
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64()),
                             "colour": pa.array(colour_of, pa.int64()), "shape": pa.array(shape_of, pa.int64())}),
                   path)
    for name, value in (("pairs", CLASSES_SORTED), ("colours", colours), ("shapes", shapes)):
        (work / f"views_{name}.json").write_text(json.dumps(value))
    train = work / "views_train"
    save_export(model, str(train / "export"), tok)
    write_manifest(Storage.from_uri(str(train)), "", Manifest(stage="train", fingerprint="1" * 64, files=[],
                                                             extra={"model_sha256": "x"}))
    jobs = [EvalJob(name="pairs", dataset=f"parquet:{path}", classnames=str(work / "views_pairs.json"),
                    templates=templates_file, workers=1),
            EvalJob(name="colour", dataset=f"parquet:{path}", classnames=str(work / "views_colours.json"),
                    templates=templates_file, label_col="colour", single_template="something {}", workers=1),
            EvalJob(name="shape", dataset=f"parquet:{path}", classnames=str(work / "views_shapes.json"),
                    templates=templates_file, label_col="shape", workers=1),
            EvalJob(name="digits_like", dataset=f"imagefolder:{folder[0]}", templates=templates_file, workers=1)]
    out = work / "views_out"
    manifest = run_jobs(EvaluateStageConfig(jobs=jobs, train=str(train), output=str(out)))
    assert manifest.extra["embedding_passes"] == 2  # one for the Parquet set's three views, one for the folder
    emb = _embed(model, images)
    for job, want in (("pairs", list(labels)), ("colour", colour_of), ("shape", shape_of)):
        res = json.loads((out / job / "results.json").read_text())
        names = json.loads((work / f"views_{'pairs' if job == 'pairs' else job + 's'}.json").read_text())
        single = "something {}" if job == "colour" else "a photo of a {}."
        for mode, temps in (("single", [single]), ("ensemble", TEMPLATES)):
            w = build_classifier(model.encode_text, _tokenize(model, tok), names, temps)
            top1 = float(((emb @ w).argmax(1) == torch.tensor(want)).float().mean())
            assert res["modes"][mode]["top1"] == pytest.approx(top1, abs=1e-6), (job, mode)
        assert res["n"] == len(images) and res["classnames"] == names
