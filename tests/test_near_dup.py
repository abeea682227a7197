"""near_dup: phash as int64, Hamming, LSH bands and recall, bucket edges, exact radius search, MinHash."""

from __future__ import annotations

import itertools
import math

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipelines.dedup import near_dup as nd
from pipelines.dedup.plan import DedupConfig


def _py_hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")


def _random_int64(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 64, size=n, dtype=np.uint64).view(np.int64)


def _flip(h: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Each hash with `bits` distinct random bits flipped."""
    out = h.view(np.uint64).copy()
    for i in range(len(out)):
        for p in rng.choice(64, size=bits, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(p)
    return out.view(np.int64)


def test_stored_phash_round_trips_to_imagehash() -> None:
    from pipelines.core.images import image_phash

    rng = np.random.default_rng(1)
    seen_negative = seen_positive = False
    # Bit 63 is the DC-vs-median bit, set for nearly every image; an all-black image clears it.
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC)
              for _ in range(30)] + [Image.new("RGB", (40, 30))]
    for im in images:
        ref = imagehash.phash(im)
        value = image_phash(im)
        assert -(1 << 63) <= value < (1 << 63)
        # bit 63 is imagehash's first bit; the sign is that bit
        assert (value < 0) == bool(ref.hash.flatten()[0])
        assert nd.int64_to_imagehash(value) == ref
        assert np.int64(value).view(np.uint64) == np.uint64(int(str(ref), 16))
        seen_negative |= value < 0
        seen_positive |= value >= 0
    assert seen_negative and seen_positive  # both signs exercised


def test_hamming_matches_python_reference_with_broadcasting() -> None:
    rng = np.random.default_rng(2)
    a, b = _random_int64(rng, 300), _random_int64(rng, 300)
    got = nd.hamming(a, b)
    assert got.tolist() == [_py_hamming(int(x), int(y)) for x, y in zip(a, b)]
    matrix = nd.hamming(a[:20, None], b[None, :30])
    assert matrix.shape == (20, 30)
    assert matrix[7, 11] == _py_hamming(int(a[7]), int(b[11]))
    assert nd.hamming(np.array([-1]), np.array([0]))[0] == 64
    assert nd.hamming(np.array([np.iinfo(np.int64).min]), np.array([0]))[0] == 1


def test_band_keys_extract_the_chosen_bits() -> None:
    rng = np.random.default_rng(3)
    h = _random_int64(rng, 50)
    pos = nd.lsh_positions(tables=5, bits=12, seed=7)
    keys = nd.band_keys(h, pos)
    assert keys.shape == (50, 5)
    for i in (0, 17, 49):
        u = int(h[i]) & 0xFFFFFFFFFFFFFFFF
        for t in range(5):
            assert keys[i, t] == sum(((u >> int(p)) & 1) << j for j, p in enumerate(pos[t]))
    assert all(len(set(row)) == 12 for row in pos.tolist())  # distinct positions per table
    assert np.array_equal(pos, nd.lsh_positions(5, 12, 7))
    assert not np.array_equal(pos, nd.lsh_positions(5, 12, 8))
    with pytest.raises(ValueError, match="bits"):
        nd.lsh_positions(3, 64, 0)


def test_pairs_within_runs_enumerates_each_pair_once() -> None:
    keys = np.array([1, 1, 1, 2, 3, 3, 4, 4, 4, 4, 5])
    starts, ends = nd.run_bounds(keys)
    got = sorted((int(i), int(j)) for a, b in nd.pairs_within_runs(starts, ends) for i, j in zip(a, b))
    want = sorted(p for s, e in zip(starts, ends) for p in itertools.combinations(range(s, e), 2))
    assert got == want and len(got) == 3 + 1 + 6


def _brute_pairs(h: np.ndarray, ids: np.ndarray, t: int) -> set[tuple[int, int]]:
    d = nd.hamming(h[:, None], h[None, :])
    i, j = np.nonzero(np.triu(d <= t, 1))
    return {(min(ids[a], ids[b]), max(ids[a], ids[b])) for a, b in zip(i, j)}


def _lsh_pairs(h: np.ndarray, ids: np.ndarray, cfg: DedupConfig, max_bucket: int) -> set[tuple[int, int]]:
    pos = nd.lsh_positions(cfg.lsh_tables, cfg.lsh_bits, cfg.seed)
    buckets = (nd.band_keys(h, pos) | (np.arange(cfg.lsh_tables) << cfg.lsh_bits)).ravel()
    rid = np.repeat(ids, cfg.lsh_tables)
    val = np.repeat(h, cfg.lsh_tables)
    u = nd.as_uint64(val)
    eq_s, eq_d, s, d = nd.bucket_edges(buckets, rid, val, lambda a, b: nd.hamming(u[a], u[b]) <= cfg.hamming_threshold,
                                       max_bucket)
    return {(min(a, b), max(a, b)) for a, b in zip(np.r_[eq_s, s].tolist(), np.r_[eq_d, d].tolist()) if a != b}


def test_lsh_candidate_recall_on_flipped_bits_matches_theory() -> None:
    cfg = DedupConfig()
    rng = np.random.default_rng(4)
    for distance, floor in ((2, 1.0), (4, 0.995), (6, 0.985), (8, nd.lsh_recall(8, cfg.lsh_bits, cfg.lsh_tables) - 0.03)):
        base = _random_int64(rng, 1500)
        near = _flip(base, distance, rng)
        h = np.r_[base, near]
        ids = np.arange(len(h), dtype=np.int64)
        found = _lsh_pairs(h, ids, cfg, max_bucket=cfg.max_bucket)
        planted = {(i, i + 1500) for i in range(1500)}
        recall = len(found & planted) / len(planted)
        assert recall >= floor, (distance, recall)
        assert found <= _brute_pairs(h, ids, cfg.hamming_threshold)  # every edge verified exactly
    p_table = math.comb(63 - 8, 16) / math.comb(63, 16)
    assert nd.lsh_recall(8, 16, 40) == pytest.approx(1 - (1 - p_table) ** 40)


def test_bucket_edges_equals_brute_force_and_bounds_giant_buckets() -> None:
    rng = np.random.default_rng(5)
    cfg = DedupConfig(lsh_tables=8, lsh_bits=6, hamming_threshold=6)  # tiny bands: big buckets
    base = _random_int64(rng, 200)
    h = np.r_[base, _flip(base[:100], 3, rng), np.repeat(base[:5], 4)]  # near copies and exact copies
    ids = rng.permutation(len(h)).astype(np.int64) * 3 + 11
    brute = _brute_pairs(h, ids, cfg.hamming_threshold)
    found = _lsh_pairs(h, ids, cfg, max_bucket=10_000)
    # connectivity, not pair lists, is the contract: identical values come back as stars
    assert _components(found, ids) == _components(brute, ids)
    # A giant bucket of one blank hash: a star of n - 1 edges, not n^2 / 2 pairs.
    blank = np.zeros(5000, np.int64)
    eq_s, eq_d, s, d = nd.bucket_edges(np.zeros(5000, np.int64), np.arange(5000), blank,
                                       lambda a, b: np.ones(len(a), bool), max_bucket=64)
    assert len(eq_s) == 4999 and set(eq_s.tolist()) == {0} and len(s) == 0
    # Many distinct values in one bucket: each compared against the first max_bucket only.
    calls: list[int] = []
    distinct = np.arange(3000, dtype=np.int64)
    nd.bucket_edges(np.zeros(3000, np.int64), distinct, distinct,
                    lambda a, b: calls.append(len(a)) or np.zeros(len(a), bool), max_bucket=50)
    assert sum(calls) == 3000 * 50


def _components(pairs: set[tuple[int, int]], ids: np.ndarray) -> set[frozenset[int]]:
    parent = {int(i): int(i) for i in ids}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, set[int]] = {}
    for i in parent:
        groups.setdefault(find(i), set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_hamming_index_is_exact_within_radius() -> None:
    rng = np.random.default_rng(6)
    index_hashes = _random_int64(rng, 3000)
    queries = np.r_[_flip(index_hashes[:300], 5, rng), _flip(index_hashes[300:400], 6, rng), _random_int64(rng, 200)]
    idx = nd.HammingIndex(index_hashes, radius=5)
    q, i, dist = idx.query(queries, max_candidates=1000)  # small budget: exercises the chunking
    d = nd.hamming(queries[:, None], index_hashes[None, :])
    want = set(zip(*np.nonzero(d <= 5)))
    assert set(zip(q.tolist(), i.tolist())) == {(int(a), int(b)) for a, b in want}
    assert np.array_equal(dist, d[q, i])
    assert len(q) >= 300  # all planted distance-5 copies, none of the distance-6 ones unless by chance
    q3, _, _ = idx.query(queries, radius=3)
    assert set(q3.tolist()).isdisjoint(range(300))
    with pytest.raises(ValueError, match="exceeds the index radius"):
        idx.query(queries, radius=6)


def test_caption_minhash_signatures_and_bands() -> None:
    caps = ["A red car parked by the sea, at sunset", "a red car parked by the sea at sunset!",
            "Quarterly revenue table for 2019", "", "!!!"]
    sigs, has_text = nd.caption_signatures(caps, num_perm=128, seed=1, shingle=5)
    assert sigs.shape == (5, 128) and sigs.dtype == np.uint32
    assert has_text.tolist() == [True, True, True, False, False]
    assert np.array_equal(sigs[0], sigs[1])  # same after lowercasing and folding punctuation
    assert (sigs[0] == sigs[2]).mean() < 0.2
    b, r = nd.minhash_bands(0.8, 128)
    assert b * r <= 128 and b > 1
    keys = nd.signature_band_keys(sigs, b, r)
    assert np.array_equal(keys[0], keys[1]) and not np.any(keys[0] == keys[2])
    vk = nd.signature_value_keys(sigs)
    assert vk[0] == vk[1] and len(set(vk[[0, 2, 3]].tolist())) == 3


def test_colour_close_and_image_value_keys() -> None:
    from pipelines.core.images import COLOUR_VERSION, colour_levels

    def sig(levels: list[int], version: int = COLOUR_VERSION) -> int:
        v = sum(lv << (5 * i) for i, lv in enumerate(levels)) | (version << 60)
        return int(np.uint64(v).view(np.int64))
    base = [3, 0, 0, 0, 0, 0, 0, 9, 0, 0, 10, 28]
    a = sig(base)
    assert colour_levels(np.array([a]))[0].tolist() == base
    near = sig([5] + base[1:])  # one bin 2 levels away
    far = sig([3, 0, 0, 0, 0, 0, 0, 5] + base[8:])  # one bin 4 levels away
    other_layout = sig(base, version=2)
    got = nd.colour_close(np.array([a, a, a, a, 0]), np.array([a, near, far, other_layout, far]), threshold=3)
    assert got.tolist() == [True, True, False, True, True]  # unknown / another layout: the phash decides
    assert nd.colour_close(np.array([a]), np.array([near]), threshold=1).tolist() == [False]

    phash = np.array([5, 5, 5, 7], np.int64)
    keys = nd.image_value_keys(phash, np.array([a, near, 0, 0], np.int64))
    assert keys[0] != keys[1]  # same phash, different colour: not identical
    assert keys[2] == 5 and keys[3] == 7  # unknown colour: the phash itself
    assert np.array_equal(nd.image_value_keys(phash, np.array([a, near, 0, 0])), keys)  # stable
