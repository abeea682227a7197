"""Dedup core on a local Ray cluster: components vs networkx, dedup of real generated images, decontamination."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import networkx as nx
import numpy as np
import pandas.testing
import pyarrow as pa
import pytest
import ray
from PIL import Image, ImageDraw

from pipelines.dedup.components import connected_components
from pipelines.dedup.plan import DedupConfig, EvalMatcher, _emit_shuffle_rows, build_eval_index, overlap_report, plan_dedup
from pipelines.core.images import colour_signature, colour_signature_of_encoded, image_phash, phash_of_encoded
from pipelines.dedup.near_dup import caption_shingles
from pipelines.core.schema import sample_key
from pipelines.dedup import plan as plan_module
from tests.conftest import actors_created

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(ray_session) -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    saved = ctx.shuffle_strategy, ctx.enable_progress_bars
    ctx.shuffle_strategy, ctx.enable_progress_bars = "sort_shuffle_pull_based", False
    yield
    ctx.shuffle_strategy, ctx.enable_progress_bars = saved


def test_config_validation_names_the_field() -> None:
    for bad, field in (({"hamming_threshold": -1}, "hamming_threshold"), ({"lsh_bits": 0}, "lsh_bits"),
                       ({"caption_jaccard": 1.5}, "caption_jaccard"), ({"lsh_bits": 60}, "lsh_bits"),
                       ({"shuffle_strategy": "magic"}, "shuffle_strategy"), ({"max_bucket": 1}, "max_bucket"),
                       ({"rows_per_partition": 0}, "rows_per_partition"), ({"max_shuffle_rows": 0}, "max_shuffle_rows")):
        with pytest.raises(ValueError, match=field):
            DedupConfig(**bad)
    # Groups per shuffle: one per rows_per_partition input rows, at least one, at most `partitions`.
    cfg = DedupConfig(partitions=64, rows_per_partition=50_000)
    assert [cfg.partitions_for(n) for n in (0, 148, 50_000, 50_001, 1_000_000, 10**9)] == [1, 1, 1, 2, 20, 64]
    # LSH passes: as many tables per pass as max_shuffle_rows allows, every table exactly once.
    cfg = DedupConfig(lsh_tables=40, max_shuffle_rows=50_000_000)
    assert [len(cfg.lsh_passes(n)) for n in (0, 148, 1_000_000, 1_250_000, 1_250_001, 10_000_000, 10**9)] \
        == [1, 1, 1, 1, 2, 8, 40]
    for n in (1_250_001, 7_000_000, 10**9):
        assert [t for r in cfg.lsh_passes(n) for t in r] == list(range(40))
    # A pass's groups: its share of the 43 shuffle rows per input row (40 tables + 3 stars), one group per
    # rows_per_partition input rows of that share: 10M rows, passes of 5 tables -> 38 groups, then 24.
    cfg = DedupConfig(partitions=8192, rows_per_partition=50_000, max_shuffle_rows=50_000_000)
    assert [cfg.pass_partitions(10_000_000, r, i == 0) for i, r in enumerate(cfg.lsh_passes(10_000_000))] == [38] + [24] * 7
    assert cfg.pass_partitions(148, range(40), True) == cfg.partitions_for(148) == 1
    with pytest.raises(ValueError, match="item 1"):
        build_eval_index({"x": [5, b"not an image"]})


def test_lsh_passes_emit_the_one_pass_rows_split_across_passes() -> None:
    # Each pass emits its own tables' buckets (table id packed above the band bits) and only the first
    # carries the url / sha256 / phash stars: together, exactly the rows of one pass.
    rng = np.random.default_rng(3)
    n = 50
    batch = pa.table({"id": rng.integers(-2**62, 2**62, n), "phash": rng.integers(-2**63, 2**63 - 1, n),
                      "colour_sig": rng.integers(0, 2**31, n),
                      "url": [f"http://u/{i}" for i in range(n)], "sha256": [f"{i:064x}" for i in range(n)]})
    cfg = DedupConfig(partitions=4, max_shuffle_rows=7 * n)
    passes = cfg.lsh_passes(n)
    assert [len(r) for r in passes] == [7] * 5 + [5]
    rows = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))  # noqa: E731
    one = _emit_shuffle_rows(batch, cfg, range(cfg.lsh_tables), stars=True)
    split = pa.concat_tables([_emit_shuffle_rows(batch, cfg, r, stars=i == 0) for i, r in enumerate(passes)])
    assert one.num_rows == n * (3 + cfg.lsh_tables) and rows(split) == rows(one)


# ---------------------------------------------------------------- connected components

def _reference_labels(edges: list[tuple[int, int]]) -> dict[int, int]:
    g = nx.Graph()
    g.add_edges_from((a, b) for a, b in edges if a != b)
    return {n: min(c) for c in nx.connected_components(g) for n in c if n != min(c)}


def test_connected_components_match_networkx(ray_cluster: None) -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(1_000_000)[:4000].astype(np.int64) * 7919 - 3_000_000  # scrambled, some negative
    edges: list[tuple[int, int]] = []
    nxt = 0

    def take(n: int) -> list[int]:
        nonlocal nxt
        nxt += n
        return ids[nxt - n:nxt].tolist()
    for length in (2, 3, 9, 33):  # chains, ids in random order along the chain
        c = take(length)
        edges += list(zip(c, c[1:]))
    for size in (2, 9, 40):  # stars, centre not the minimum
        c = take(size)
        edges += [(c[3 % size], x) for x in c if x != c[3 % size]]
    for size in (3, 12):  # cliques, with reversed duplicates
        c = take(size)
        edges += [(a, b) for a in c for b in c if a != b]
    g = nx.gnm_random_graph(600, 450, seed=3)  # many small random components
    c = take(600)
    edges += [(c[a], c[b]) for a, b in g.edges()]
    edges += [(x, x) for x in take(5)]  # self-loops only: singletons, no label
    order = rng.permutation(len(edges))
    table = pa.table({"src": [edges[i][0] for i in order], "dst": [edges[i][1] for i in order]})
    result = connected_components(ray.data.from_arrow(table).repartition(2), partitions=8)
    got = result.labels.to_pandas()
    assert got["node"].is_unique
    assert dict(zip(got["node"].tolist(), got["comp"].tolist())) == _reference_labels(edges)
    assert 2 <= result.rounds <= 12


# ---------------------------------------------------------------- real images

def _original(i: int) -> Image.Image:
    """Distinct images phash can tell apart: random shapes on a colour, or blocky noise texture."""
    r = np.random.default_rng(1000 + i)
    w, h = int(r.integers(160, 320)), int(r.integers(160, 320))
    if i % 2 == 0:
        im = Image.new("RGB", (w, h), tuple(int(x) for x in r.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(r.integers(3, 7))):
            x0, y0 = int(r.integers(-w // 4, w)), int(r.integers(-h // 4, h))
            box = (x0, y0, x0 + int(r.integers(w // 4, w)), y0 + int(r.integers(h // 4, h)))
            fill = tuple(int(x) for x in r.integers(0, 255, 3))
            (draw.ellipse if r.integers(0, 2) else draw.rectangle)(box, fill=fill)
        return im
    small = Image.fromarray(r.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(small).astype(int) + r.integers(-30, 30, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(im: Image.Image, frac: float = 0.05) -> Image.Image:
    dx, dy = int(im.width * frac), int(im.height * frac)
    return im.crop((dx // 2, dy // 2, im.width - (dx - dx // 2), im.height - (dy - dy // 2)))


@dataclass
class Planted:
    rows: list[dict]
    group: dict[str, int]  # key -> original it derives from (eval images: -1 - eval index)
    kind: dict[str, str]  # key -> original / exact_copy / same_url / reencode / resize / crop / eval / caption
    eval_sets: dict[str, list]
    eval_expect: dict[str, tuple[int, int]]  # set -> (train rows dropped, eval images hit)


def _planted_rows(n_originals: int = 150) -> Planted:
    rows, group, kind = [], {}, {}

    def add(g: int, k: str, data: bytes, url: str, caption: str, ow: int, oh: int) -> None:
        key = sample_key(url, caption)
        with Image.open(io.BytesIO(data)) as im:
            rows.append({"key": key, "url": url, "caption": caption, "sha256": hashlib.sha256(data).hexdigest(),
                         "phash": image_phash(im), "colour_sig": colour_signature(np.asarray(im.convert("RGB"))),
                         "width": im.width, "height": im.height,
                         "original_width": ow, "original_height": oh, "file_idx": len(rows) % 4})
        group[key], kind[key] = g, k
    words = np.array("alpha beta gamma delta river stone cloud tiger maple orbit lemon pixel quartz violet harbor".split())
    for i in range(n_originals):
        im = _original(i)
        data = _jpeg(im)
        cap = " ".join(np.random.default_rng(i).choice(words, 8))
        add(i, "original", data, f"https://a.example/{i}.jpg", cap, im.width, im.height)
        variant = i % 5
        if variant == 0:
            add(i, "exact_copy", data, f"https://mirror.example/{i}.jpg", cap + " copy", im.width, im.height)
        elif variant == 1:
            add(i, "same_url", _jpeg(im, 70), f"https://a.example/{i}.jpg", cap + " other text", im.width, im.height)
        elif variant == 2:
            add(i, "reencode", _jpeg(im, 50), f"https://b.example/{i}.jpg", cap, im.width, im.height)
        elif variant == 3:
            small = im.resize((im.width * 2 // 3, im.height * 2 // 3))
            add(i, "resize", _jpeg(small), f"https://c.example/{i}.jpg", cap, small.width, small.height)
        else:
            cropped = _crop(im)
            add(i, "crop", _jpeg(cropped), f"https://d.example/{i}.jpg", cap, cropped.width, cropped.height)
    # Eval images: never originals; re-encoded copies of some of them planted in the training rows.
    eval_images = [_original(10_000 + j) for j in range(24)]
    eval_sets = {"evalA": [_jpeg(im) for im in eval_images[:14]],
                 "evalB": [phash_of_encoded(_jpeg(im)) for im in eval_images[10:]]}
    for j in (0, 1, 2, 3, 11, 12, 20, 21):  # 11, 12 are in both sets; 20, 21 only in evalB
        add(-1 - j, "eval", _jpeg(eval_images[j], 60), f"https://e.example/{j}.jpg", f"eval copy {j}",
            eval_images[j].width, eval_images[j].height)
    add(-1 - 0, "eval", _jpeg(eval_images[0], 40), "https://e.example/0-again.jpg", "eval copy again", 10, 10)
    eval_expect = {"evalA": (7, 6), "evalB": (4, 4)}  # A: rows for 0,0,1,2,3,11,12; B: 11,12,20,21
    return Planted(rows, group, kind, eval_sets, eval_expect)


@pytest.fixture(scope="module")
def planted() -> Planted:
    return _planted_rows()


def _dataset(rows: list[dict], blocks: int, seed: int) -> ray.data.Dataset:
    order = np.random.default_rng(seed).permutation(len(rows))
    return ray.data.from_arrow(pa.Table.from_pylist([rows[i] for i in order])).repartition(blocks)


def test_dedup_real_images_recall_reasons_and_decontamination(ray_cluster: None, planted: Planted, monkeypatch) -> None:
    cfg = DedupConfig()
    index = build_eval_index(planted.eval_sets)
    before = actors_created("EvalMatcher")
    dropped_ds = plan_dedup(_dataset(planted.rows, blocks=3, seed=1), cfg, index).materialize()
    dropped = dropped_ds.to_pandas()
    assert actors_created("EvalMatcher") == before  # a small index: matched in tasks
    # An index over EVAL_TASK_HASHES goes to a pool of EvalMatcher actors: the same drops.
    monkeypatch.setattr(plan_module, "EVAL_TASK_HASHES", len(index.hashes) - 1)
    pooled = plan_dedup(_dataset(planted.rows, blocks=3, seed=1), cfg, index).to_pandas()
    assert actors_created("EvalMatcher") > before
    order = lambda df: df.sort_values("key").reset_index(drop=True)  # noqa: E731
    pandas.testing.assert_frame_equal(order(pooled), order(dropped))
    assert dropped["key"].is_unique
    by_key = dropped.set_index("key")
    keys = {r["key"] for r in planted.rows}
    assert set(dropped["key"]) <= keys
    file_idx = {r["key"]: r["file_idx"] for r in planted.rows}
    assert all(file_idx[k] == f for k, f in zip(dropped["key"], dropped["file_idx"]))

    # Decontamination: every planted eval copy goes, with its set name; nothing else does.
    eval_keys = {k for k, v in planted.kind.items() if v == "eval"}
    eval_dropped = dropped[dropped["reason"] == "eval_overlap"]
    assert set(eval_dropped["key"]) == eval_keys
    assert by_key.loc[[k for k in eval_keys if planted.group[k] in (-21, -22)], "detail"].tolist() == ["evalB"] * 2
    report = overlap_report(dropped_ds, index)
    for name, (rows_dropped, images_hit) in planted.eval_expect.items():
        assert report[name]["train_rows_dropped"] == rows_dropped, report
        assert report[name]["eval_images_hit"] == images_hit, report
    assert report["evalA"]["eval_images"] == 14 and report["evalB"]["eval_images"] == 14

    graph = dropped[dropped["reason"] != "eval_overlap"]
    # Zero false merges: a dropped row's kept representative derives from the same original.
    assert all(planted.group[k] == planted.group[d] for k, d in zip(graph["key"], graph["detail"]))
    assert not set(graph["detail"]) & set(graph["key"])  # representatives are kept
    # Recall: of each original's group, all but one row dropped.
    dropped_keys = set(graph["key"])
    pairs: dict[int, list[str]] = {}
    for k, g in planted.group.items():
        if g >= 0:
            pairs.setdefault(g, []).append(k)
    merged = [g for g, ks in pairs.items() if sum(k in dropped_keys for k in ks) == 1]
    recall = len(merged) / len(pairs)
    assert recall >= 0.95, recall
    assert all(sum(k in dropped_keys for k in ks) <= 1 for ks in pairs.values())
    reasons = {planted.kind[k]: set() for k in graph["key"]}
    for k, reason in zip(graph["key"], graph["reason"]):
        reasons[planted.kind[k]].add(reason)
    assert reasons["exact_copy"] == {"exact_dup_image"}
    assert reasons["same_url"] == {"exact_dup_url"}
    for variant in ("reencode", "resize", "crop"):
        assert reasons.get(variant, {"near_dup_image"}) == {"near_dup_image"}
    # Representative: largest original area, ties -> smallest key.
    rows = {r["key"]: r for r in planted.rows}
    area = {k: r["original_width"] * r["original_height"] for k, r in rows.items()}
    for k, d in zip(graph["key"], graph["detail"]):
        assert area[d] > area[k] or (area[d] == area[k] and d < k)


def test_dedup_is_deterministic_and_caption_minhash_adds_caption_drops(ray_cluster: None, planted: Planted) -> None:
    # Caption-only near duplicates: unrelated images, captions equal up to case and punctuation.
    extra = []
    for j in range(6):
        im = _original(20_000 + j)
        data = _jpeg(im)
        caption = ("A red lighthouse on a rocky island at dawn", "Bowl of ramen with a soft boiled egg",
                   "Vintage typewriter keys in warm studio light")[j // 2]
        caption = caption.upper() + "!!" if j % 2 else caption
        url = f"https://f.example/{j}.jpg"
        extra.append({"key": sample_key(url, caption), "url": url, "caption": caption,
                      "sha256": f"{j:064x}", "phash": phash_of_encoded(data),
                      "colour_sig": colour_signature_of_encoded(data),
                      "width": im.width, "height": im.height, "original_width": im.width,
                      "original_height": im.height, "file_idx": 9})
    rows = planted.rows + extra
    # One group per shuffle (the default for a small input), 64 and 7; all 40 LSH tables in one pass (the
    # default) and 3 passes of 17 / 17 / 6 tables, each with its own group count: the same drops whatever the layout.
    assert DedupConfig().partitions_for(len(rows)) == 1 and DedupConfig(rows_per_partition=1).partitions_for(len(rows)) == 64
    assert len(DedupConfig().lsh_passes(len(rows))) == 1
    assert [len(r) for r in DedupConfig(max_shuffle_rows=17 * len(rows)).lsh_passes(len(rows))] == [17, 17, 6]
    base = plan_dedup(_dataset(rows, blocks=2, seed=2), DedupConfig()).to_pandas()
    wide = plan_dedup(_dataset(rows, blocks=3, seed=5), DedupConfig(rows_per_partition=1)).to_pandas()
    split = DedupConfig(rows_per_partition=20, max_shuffle_rows=17 * len(rows))
    groups = [split.pass_partitions(len(rows), r, i == 0) for i, r in enumerate(split.lsh_passes(len(rows)))]
    assert len(set(groups)) == 3 and min(groups) > 1, groups  # three passes, each with a group count of its own
    again = plan_dedup(_dataset(rows, blocks=5, seed=3), split).to_pandas()
    sort = lambda df: df.sort_values("key").reset_index(drop=True)[["key", "file_idx", "reason", "detail"]]  # noqa: E731
    pandas.testing.assert_frame_equal(sort(base), sort(wide))
    pandas.testing.assert_frame_equal(sort(base), sort(again))
    assert not set(base["key"]) & {r["key"] for r in extra}  # images differ: kept without captions
    assert overlap_report(ray.data.from_pandas(base)) == {}  # no eval index, no overlap: empty, no crash

    with_captions = plan_dedup(_dataset(rows, blocks=4, seed=4), DedupConfig(caption_minhash=True)).to_pandas()
    caption_drops = with_captions[with_captions["reason"] == "near_dup_caption"]
    def loser(a: dict, b: dict) -> str:  # larger original area kept, ties -> smaller key kept
        rank = lambda r: (-r["original_width"] * r["original_height"], r["key"])  # noqa: E731
        return max(a, b, key=rank)["key"]
    expected = {loser(extra[j], extra[j + 1]): ({extra[j]["key"], extra[j + 1]["key"]}) for j in (0, 2, 4)}
    got = dict(zip(caption_drops["key"], caption_drops["detail"]))
    assert all(k in got and got[k] in pair and got[k] != k for k, pair in expected.items())
    # Any other caption drop (e.g. the "eval copy N" rows, or a crop the phash missed whose caption
    # equals its original's) must really be a caption near-duplicate of its representative.
    captions = {r["key"]: r["caption"] for r in rows}
    for k, d in got.items():
        a, b = caption_shingles(captions[k], 5), caption_shingles(captions[d], 5)
        assert len(a & b) / len(a | b) >= 0.6, (captions[k], captions[d])
    # The planted image duplicates keep their image reasons; caption edges only add.
    image_part = with_captions[with_captions["reason"] != "near_dup_caption"]
    assert set(image_part["key"]) >= set(base["key"])


def test_plan_rejects_bad_input(ray_cluster: None, planted: Planted) -> None:
    rows = [dict(r) for r in planted.rows[:6]]
    with pytest.raises(ValueError, match="lacks columns.*file_idx"):
        plan_dedup(ray.data.from_arrow(pa.Table.from_pylist(rows).drop_columns(["file_idx"])), DedupConfig())
    # No colour signatures: an error (the stage computes them), unless the check is off.
    without = pa.Table.from_pylist(rows).drop_columns(["colour_sig"])
    with pytest.raises(ValueError, match="lacks columns.*colour_sig"):
        plan_dedup(ray.data.from_arrow(without), DedupConfig())
    assert plan_dedup(ray.data.from_arrow(without), DedupConfig(colour_threshold=None)).count() >= 0
    rows[3] = dict(rows[2])  # a duplicated key (same url and caption)
    with pytest.raises(ValueError, match="keys must be unique"):
        plan_dedup(ray.data.from_arrow(pa.Table.from_pylist(rows)), DedupConfig()).materialize()


# ---------------------------------------------------------------- colour (issue 14)

def test_images_differing_only_in_colour_are_not_merged_nor_decontaminated(ray_cluster: None) -> None:
    """The demo's shapes in close palette colours, same geometry: phash puts them within the default radius,
    the colour signature keeps them apart. Re-encodes and 2/3 resizes of each still merge, and the same
    rule holds against an eval set (a red eval triangle does not take the orange training one with it)."""
    import random

    from pipelines.core.images import hashes_of_encoded
    from pipelines.demo.synthetic import encode, render_shape

    close = [("red", "orange"), ("orange", "yellow"), ("blue", "purple"), ("red", "purple")]
    rows, group, variant = [], {}, {}

    def add(data: bytes, name: str, g: str, kind: str, side: int) -> None:
        phash, colour = hashes_of_encoded(data)
        key = sample_key(f"https://c.example/{name}", name)
        rows.append({"key": key, "url": f"https://c.example/{name}", "caption": name,
                     "sha256": hashlib.sha256(data).hexdigest(), "phash": phash, "colour_sig": colour, "width": 64,
                     "height": 64, "original_width": side, "original_height": side, "file_idx": len(rows) % 3})
        group[key], variant[key] = g, kind
    eval_images = []
    for k, (shape, size, bg) in enumerate([("triangle", "small", "white"), ("square", "large", "grey"),
                                           ("star", "small", "black"), ("ring", "large", "white")]):
        for p, (a, b) in enumerate(close):
            for colour in (a, b):  # the same geometry in both colours of a pair, another for each pair
                im = render_shape(shape, colour, size, bg, 64, random.Random(10 * k + p))
                g = f"{shape}-{size}-{bg}-{a}{b}-{colour}"
                if k == 0 and (a, b) == ("red", "orange") and colour == "red":
                    eval_images.append(encode(im))  # only its re-encode is in training
                    add(encode(im, quality=70), g + "-leak", g, "eval", 64)
                    continue
                add(encode(im), g, g, "original", 100)  # the largest original: the one a plan keeps
                add(encode(im, quality=60), g + "-jpeg", g, "reencode", 64)
                add(encode(im.resize((42, 42), Image.Resampling.BICUBIC)), g + "-small", g, "resize", 42)
    by_key = {r["key"]: r for r in rows}
    originals = [r for r in rows if variant[r["key"]] == "original"]
    twins: dict[str, list[int]] = {}
    for r in originals:
        twins.setdefault(group[r["key"]].rsplit("-", 1)[0], []).append(r["phash"])
    phash_near = sum(bin((x ^ y) & (2 ** 64 - 1)).count("1") <= 8 for x, y in (t for t in twins.values() if len(t) == 2))
    assert phash_near >= len(twins) // 2  # most colour twins are phash near-duplicates

    index = build_eval_index({"shapes": eval_images})
    dropped = plan_dedup(_dataset(rows, blocks=3, seed=5), DedupConfig(), index).to_pandas()
    got = dict(zip(dropped["key"], dropped["reason"]))
    detail = dict(zip(dropped["key"], dropped["detail"]))
    colour = {k: g.rsplit("-", 1)[1] for k, g in group.items()}
    for k, reason in got.items():  # no component mixes colours: each dropped row has its representative's
        assert reason == "eval_overlap" or colour[detail[k]] == colour[k], (by_key[k]["caption"], detail[k])
    for k, kind in variant.items():
        if kind == "eval":
            assert got.get(k) == "eval_overlap"
        elif kind != "original":  # re-encodes and resizes merge (with their original, or its same-colour twin)
            assert got.get(k) == "near_dup_image", by_key[k]["caption"]
    assert sum(r == "eval_overlap" for r in got.values()) == 1

    # The eval rule without Ray: with the colour check only the leak matches; phash alone also takes the
    # leak's orange twin and that twin's copies.
    table = pa.Table.from_pylist(rows).select(["phash", "colour_sig"])
    hits = lambda threshold: sum(s != "" for s in EvalMatcher(index, 8, threshold)(table).column("eval_set").to_pylist())  # noqa: E731
    assert hits(DedupConfig().colour_threshold) == 1
    assert hits(None) >= 4


# ---------------------------------------------------------------- semantic dedup (no Ray)

# A random tiny ViT (width 64, 2 layers, 32 px, torch seed 0) on tests/stage_data.scene_images: measured over
# 3 x 30 scenes with two copies each (scene_copy: 2-3 px crop, colour x0.9-0.95, JPEG q60-70), copies sit at
# cosine >= 0.998 of their original and of each other, distinct scenes <= 0.997 (mean 0.96: a random tower's
# embeddings share one big direction). A trained CLIP spreads distinct images far more.
SEMANTIC_THRESHOLD = 0.9975


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import torch

    from clip_model import build_model, get_config
    from clip_model.export import save_export
    from clip_model.tokenizer import ClipTokenizer

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("semantic") / "tiny-vit")
    save_export(build_model(get_config("tiny-vit")), path, ClipTokenizer.from_openai_bpe())
    return path


def _embed_here(checkpoint: str, images: list[bytes]) -> np.ndarray:
    import torch

    from pipelines.core.embedding import ImageEmbedder

    threads = torch.get_num_threads()  # ImageEmbedder sets its actor's thread count; give it back after
    emb = ImageEmbedder(checkpoint, None, with_phash=False)({"image": np.array(images, dtype=object),
                                                             "id": np.arange(len(images))})["embedding"]
    torch.set_num_threads(threads)
    return emb


def _semantic_plan_here(keys: list[str], emb: np.ndarray, cfg) -> dict[str, str]:
    """The Ray plan's steps in-process: sample, fit, assign, then each cluster's duplicates. {dropped: detail}"""
    from pipelines.dedup.semantic import cluster_duplicates, fit_centroids, in_sample, n_clusters, nearest_centroid

    keys_arr = np.asarray(keys)
    picked = in_sample(keys_arr, min(1.0, cfg.sample_rows / len(keys)))
    order = np.argsort(keys_arr[picked], kind="stable")
    sample = emb[picked][order]
    centroids = fit_centroids(sample, n_clusters(len(keys), len(sample), cfg), cfg)
    cluster = nearest_centroid(emb, centroids)
    out = {}
    for c in np.unique(cluster):
        idx = np.flatnonzero(cluster == c)
        drop, rep, cos, _ = cluster_duplicates([keys[i] for i in idx], np.full(len(idx), 64 * 64), emb[idx],
                                               cfg.threshold)
        out.update({keys[idx[d]]: f"{keys[idx[r]]} cos={c:.4f}" for d, r, c in zip(drop, rep, cos)})
    return out


def test_semantic_plan_collapses_copies_and_keeps_distinct_scenes(tiny_clip) -> None:
    from pipelines.dedup.semantic import SemanticConfig, best_eval_match

    from .stage_data import scene_copy, scene_images

    scenes = scene_images(34, seed=7)
    originals, evals = scenes[:30], scenes[30:]
    images, group = [], []
    for g, im in enumerate(originals):
        copies = [scene_copy(im, 0), scene_copy(im, 1)] if g < 6 else []  # 6 groups of 3, 24 singletons
        images += [im, *copies]
        group += [g] * (1 + len(copies))
    keys = [hashlib.sha1(b).hexdigest() for b in images]
    emb = _embed_here(tiny_clip, images)
    # The measurement the threshold rests on, on this data.
    sims, gid = emb @ emb.T, np.asarray(group)
    iu = np.triu_indices(len(images), 1)
    same = gid[iu[0]] == gid[iu[1]]
    assert sims[iu][same].min() >= 0.998 > SEMANTIC_THRESHOLD > 0.997 >= sims[iu][~same].max()

    cfg = SemanticConfig(checkpoint=tiny_clip, threshold=SEMANTIC_THRESHOLD)
    dropped = _semantic_plan_here(keys, emb, cfg)
    for g in range(30):
        members = {k for k, h in zip(keys, group) if h == g}
        kept = members - set(dropped)
        assert len(kept) == 1, g  # every copy group collapses; every distinct scene stays
        (rep,) = kept
        assert rep == min(members)  # equal areas: the smallest key, as for pHash components
        assert all(dropped[k].split()[0] == rep for k in members - kept)
    assert len(dropped) == 12
    # Deterministic: rows in another order (and a smaller sample, clusters from it) give the same drops.
    perm = np.random.default_rng(3).permutation(len(keys))
    again = _semantic_plan_here([keys[i] for i in perm], emb[perm], cfg)
    assert again == dropped
    # Decontamination: a copy of eval image 1 is within the threshold of it; no other row is.
    leak = _embed_here(tiny_clip, [scene_copy(evals[1], 1)])
    best, cos = best_eval_match(np.r_[emb, leak], _embed_here(tiny_clip, evals))
    assert np.flatnonzero(cos >= SEMANTIC_THRESHOLD).tolist() == [len(keys)] and best[-1] == 1


def test_semantic_config_validation_and_defaults() -> None:
    from pipelines.dedup.semantic import SemanticConfig, n_clusters

    assert not DedupConfig().semantic.enabled
    for bad, field in (({"threshold": 1.5}, "semantic.threshold"), ({"activation": "relu"}, "semantic.activation"),
                       ({"clusters": 0}, "semantic.clusters"), ({"sample_rows": 0}, "semantic.sample_rows"),
                       ({"actors": 0}, "semantic.actors")):
        with pytest.raises(ValueError, match=field):
            SemanticConfig(**bad)
    cfg = SemanticConfig()
    assert n_clusters(10_000, 10_000, cfg) == 100  # ceil(sqrt(n))
    assert n_clusters(10_000_000, 100_000, cfg) == 3163 and n_clusters(40, 40, cfg) == 4  # <= sample / 10
    assert n_clusters(100, 100, SemanticConfig(clusters=500)) == 100  # never more than the sample


def test_semantic_embedding_rejects_an_undecodable_row_instead_of_raising(tiny_clip) -> None:
    """One training row whose bytes do not decode: the dedup embedder flags it (zero vector, its error) where
    evaluate's raises, and the stage turns it into a `semantic_undecodable` reject with the error as detail;
    the other rows' embeddings are those of a batch without it."""
    import pyarrow as pa
    import torch

    from pipelines.core.embedding import ImageEmbedder
    from pipelines.dedup.stage import _decoded, _undecodable_drops

    from .stage_data import scene_images

    checkpoint = tiny_clip
    good = scene_images(2, seed=3)
    threads = torch.get_num_threads()
    batch = {"image": np.array([good[0], b"\x89PNG not an image", good[1]], dtype=object),
             "id": np.array(["a", "b", "c"]), "key": np.array(["a", "b", "c"]),
             "file_idx": np.array([0, 0, 1]), "area": np.array([4, 4, 4])}
    with pytest.raises(ValueError, match="eval image b: not a decodable image"):
        ImageEmbedder(checkpoint, None, with_phash=False)(dict(batch))
    out = ImageEmbedder(checkpoint, None, with_phash=False, what="dedup input row", flag_undecodable=True)(dict(batch))
    torch.set_num_threads(threads)
    assert out["error"][0] == out["error"][2] == "" and out["error"][1].startswith("dedup input row b: not a decodable")
    assert not out["embedding"][1].any()
    np.testing.assert_allclose(out["embedding"][[0, 2]], _embed_here(checkpoint, good), atol=1e-6)
    kept = _decoded(out)
    assert kept["key"].tolist() == ["a", "c"] and set(kept) == {"key", "file_idx", "area", "embedding"}
    table = pa.table({"key": out["key"], "file_idx": out["file_idx"], "error": pa.array(out["error"].tolist())})
    drops = _undecodable_drops(table).to_pylist()
    assert drops == [{"key": "b", "file_idx": 0, "reason": "semantic_undecodable", "detail": out["error"][1]}]
