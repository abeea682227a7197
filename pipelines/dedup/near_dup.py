"""Near-duplicate primitives: 64-bit perceptual hashes, banded LSH, caption MinHash. NumPy only, no Ray.

A phash travels through the pipeline as a signed int64 (Parquet has no uint64 that every reader
agrees on); all bit arithmetic here views it as uint64, so the sign never matters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from math import comb

import imagehash
import numpy as np

PHASH_BITS = 64
# imagehash.phash's first bit (our bit 63) compares the DCT's DC term with the median of the 8x8
# low frequencies; the DC term is almost always the largest, so the bit is ~always 1 and stored
# phashes are ~always negative. LSH samples only the other 63 bits: a constant bit spreads nothing.
LSH_BIT_POOL = 63


# ---------------------------------------------------------------- phash as int64 (core.images.image_phash computes it)

def int64_to_imagehash(value: int) -> imagehash.ImageHash:
    return imagehash.hex_to_hash(f"{value & 0xFFFFFFFFFFFFFFFF:016x}")


def as_uint64(hashes: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype != np.int64:
        arr = arr.astype(np.int64)  # python ints in int64 range; out-of-range raises OverflowError
    return arr.view(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of two broadcastable hash arrays (int64 or uint64), as uint8."""
    return np.bitwise_count(np.bitwise_xor(as_uint64(a), as_uint64(b)))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A stable 64-bit mixer (same result in every process: never Python's salted hash())."""
    with np.errstate(over="ignore"):
        z = as_uint64(x) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    return (splitmix64(values) % np.uint64(partitions)).astype(np.int64)


# ---------------------------------------------------------------- colour signatures (core.images.colour_signature)

def colour_close(a: np.ndarray, b: np.ndarray, threshold: int) -> np.ndarray:
    """True where two colour signatures are within `threshold` levels in every bin, or either is unknown (0,
    or another layout's version): the near-duplicate edge then rests on the phash alone. Callers count the
    rows without a signature; this function does not decide that silently for a whole input."""
    from pipelines.core.images import colour_distance

    return colour_distance(a, b) <= threshold  # unknown is -1


def image_value_keys(phash: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """int64 per image, equal when phash and colour signature are both equal: a 64-bit mix, so two distinct
    pairs collide with odds ~ n^2 / 2^65, like the node ids. An unknown colour (0) keeps the phash itself."""
    colour = np.asarray(colour, np.int64)
    mixed = (as_uint64(phash) ^ splitmix64(colour)).view(np.int64)
    return np.where(colour == 0, np.asarray(phash, np.int64), mixed)


# ---------------------------------------------------------------- banded LSH (bit sampling)

def lsh_positions(tables: int, bits: int, seed: int) -> np.ndarray:
    """(tables, bits) distinct bit positions (of bits 0..62) per table, fixed by the seed."""
    if not 1 <= bits <= LSH_BIT_POOL or tables < 1:
        raise ValueError(f"LSH needs tables >= 1 and 1 <= bits <= {LSH_BIT_POOL}, got tables={tables} bits={bits}")
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(LSH_BIT_POOL, size=bits, replace=False)) for _ in range(tables)])


def band_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, tables) int64: the sampled bits of each hash packed into an integer (< 2**bits)."""
    h = as_uint64(hashes)
    out = np.zeros((h.shape[0], positions.shape[0]), dtype=np.uint64)
    for t, pos in enumerate(positions):
        for j, p in enumerate(pos):
            out[:, t] |= ((h >> np.uint64(p)) & np.uint64(1)) << np.uint64(j)
    return out.astype(np.int64)


def lsh_recall(distance: int, bits: int, tables: int) -> float:
    """P(a pair at distance d shares at least one bucket), flips on the 63 sampled bits (not the DC bit)."""
    p_table = comb(LSH_BIT_POOL - distance, bits) / comb(LSH_BIT_POOL, bits)
    return 1.0 - (1.0 - p_table) ** tables


# ---------------------------------------------------------------- pairs inside sorted runs

def run_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each run of equal values in an already sorted 1-D array."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return starts, np.r_[starts[1:], n]


def pairs_within_runs(starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All index pairs (i, j), i < j, inside each run, as chunks; total work = number of pairs."""
    sizes = ends - starts
    multi = sizes > 1
    first, size = starts[multi], sizes[multi]
    idx = np.repeat(first - (np.cumsum(size) - size), size) + np.arange(size.sum())
    remaining = np.repeat(first + size, size) - idx - 1  # run members after i
    offset = 1
    while idx.size:
        keep = remaining >= offset
        idx, remaining = idx[keep], remaining[keep]
        if idx.size:
            yield idx, idx + offset
        offset += 1


def bucket_edges(buckets: np.ndarray, ids: np.ndarray, value_keys: np.ndarray,
                 similar: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 max_bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Verified near-duplicate edges among rows sharing a bucket.

    buckets: (n,) bucket id per row (table folded in); ids: (n,) node ids; value_keys: (n,) int
    where equal means an identical hash/signature; similar(i, j) verifies index pairs exactly.
    Returns (eq_src, eq_dst, sim_src, sim_dst): stars over identical values (every member to the
    smallest id holding that value in that bucket) and verified pairs between distinct values.

    Identical values are linked by a star first, so a bucket of a million blank-image hashes costs
    O(n), not O(n^2). If a bucket still has more than `max_bucket` distinct values, each of them is
    compared only with the bucket's first `max_bucket` distinct values (a bounded, deterministic
    sample): O(n * max_bucket). Pairs missed that way can still meet in another table's bucket.
    """
    order = np.lexsort((ids, value_keys, buckets))
    b, v, i = buckets[order], value_keys[order], ids[order]
    first = np.r_[True, (b[1:] != b[:-1]) | (v[1:] != v[:-1])] if len(b) else np.zeros(0, bool)
    head = np.maximum.accumulate(np.where(first, np.arange(len(b)), 0)) if len(b) else np.zeros(0, np.int64)
    eq_src, eq_dst = i[head[~first]], i[~first]
    rows = order[first]  # one row (smallest id) per distinct value per bucket, sorted by bucket
    starts, ends = run_bounds(buckets[rows])
    small = (ends - starts) <= max_bucket
    src, dst = [], []
    for a, c in pairs_within_runs(starts[small], ends[small]):
        ok = similar(rows[a], rows[c])
        src.append(ids[rows[a[ok]]]), dst.append(ids[rows[c[ok]]])
    for s, e in zip(starts[~small], ends[~small]):
        members, sample = rows[s:e], rows[s:s + max_bucket]
        for chunk in np.array_split(members, max(1, len(members) * len(sample) // 4_000_000)):
            a, c = np.repeat(sample, len(chunk)), np.tile(chunk, len(sample))
            ok = (a != c) & similar(a, c)
            src.append(ids[a[ok]]), dst.append(ids[c[ok]])
    empty = np.zeros(0, np.int64)
    return (eq_src, eq_dst, np.concatenate(src) if src else empty, np.concatenate(dst) if dst else empty)


# ---------------------------------------------------------------- exact radius search (pigeonhole)

class HammingIndex:
    """Exact "all hashes within distance r" search over a small, fixed set of 64-bit hashes.

    Pigeonhole: the 64 bit positions (shuffled by the seed) are split into r + 1 disjoint bands, so
    two hashes within distance r agree exactly on at least one band. Each band is a sorted table;
    a query probes r + 1 tables and verifies every candidate. No false negatives, unlike sampled LSH:
    decontamination must not miss an eval image. Cost per query ~ (r + 1) * n / 2**(64 / (r + 1)).
    """

    def __init__(self, hashes: np.ndarray, radius: int, seed: int = 0) -> None:
        if not 0 <= radius < PHASH_BITS:
            raise ValueError(f"HammingIndex radius must be in [0, 63], got {radius}")
        self.hashes = as_uint64(np.asarray(hashes, dtype=np.int64)).copy()
        self.radius = radius
        perm = np.random.default_rng(seed).permutation(PHASH_BITS)
        self.bands = [np.sort(p) for p in np.array_split(perm, radius + 1)]
        self._keys, self._order = [], []
        for pos in self.bands:
            keys = band_keys(self.hashes, pos[None, :])[:, 0]
            order = np.argsort(keys, kind="stable")
            self._keys.append(keys[order]), self._order.append(order)

    def query(self, hashes: np.ndarray, radius: int | None = None,
              max_candidates: int = 4_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query_idx, index_idx, distance) for every pair within `radius` (<= the index radius), unique."""
        r = self.radius if radius is None else radius
        if r > self.radius:
            raise ValueError(f"query radius {r} exceeds the index radius {self.radius}")
        q = as_uint64(np.asarray(hashes, dtype=np.int64))
        found_q, found_i = [], []
        for t, pos in enumerate(self.bands):
            qk = band_keys(q, pos[None, :])[:, 0]
            lo = np.searchsorted(self._keys[t], qk, "left")
            counts = np.searchsorted(self._keys[t], qk, "right") - lo
            for sel in _chunks_by_weight(counts, max_candidates):
                qi = np.repeat(sel, counts[sel])
                within = np.arange(len(qi)) - np.repeat(np.cumsum(counts[sel]) - counts[sel], counts[sel])
                ii = self._order[t][np.repeat(lo[sel], counts[sel]) + within]
                ok = hamming(q[qi], self.hashes[ii]) <= r
                found_q.append(qi[ok]), found_i.append(ii[ok])
        if not found_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        pairs = np.unique(np.stack([np.concatenate(found_q), np.concatenate(found_i)], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1], hamming(q[pairs[:, 0]], self.hashes[pairs[:, 1]])


def _chunks_by_weight(weights: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """Index chunks of `weights` whose sums stay near `budget` (bounds candidate-array memory)."""
    nz = np.flatnonzero(weights)
    if nz.size == 0:
        return
    cum = np.cumsum(weights[nz])
    cuts = np.searchsorted(cum, np.arange(budget, cum[-1], budget), "right")
    yield from (c for c in np.split(nz, cuts) if c.size)


# ---------------------------------------------------------------- caption MinHash

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def caption_shingles(caption: str, size: int) -> set[bytes]:
    """Character `size`-grams of the caption lowercased with punctuation folded to single spaces."""
    text = _NON_WORD.sub(" ", caption.lower()).strip()
    if len(text) < size:
        return {text.encode()} if text else set()
    return {text[i:i + size].encode() for i in range(len(text) - size + 1)}


def caption_signatures(captions: Sequence[str], num_perm: int, seed: int, shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, num_perm) uint32 MinHash signatures and a mask of captions that have any shingle.

    Empty captions all share one signature (the 'no element' value) and would look identical;
    callers must leave them out of caption matching.
    """
    from datasketch import MinHash  # see minhash_bands

    sets = [caption_shingles(c or "", shingle) for c in captions]
    sigs = MinHash.bulk(sets, num_perm=num_perm, seed=seed)
    return np.stack([m.hashvalues for m in sigs]).astype(np.uint32).reshape(len(sets), num_perm), \
        np.array([bool(s) for s in sets])


def minhash_bands(jaccard: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold."""
    # Imported here: datasketch's package import pulls in scipy.integrate (for these very bands), ~0.45 s of CPU
    # in every dedup worker that imports this module, and only caption MinHash uses it.
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
    return lsh.b, lsh.r


def signature_band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) int64 bucket ids: a stable 64-bit hash of each band's signature slice."""
    out = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    for b in range(bands):
        h = splitmix64(np.full(sigs.shape[0], b, dtype=np.uint64))  # band index seeds the hash
        for col in sigs[:, b * rows:(b + 1) * rows].T.astype(np.uint64):
            h = splitmix64(h ^ col)
        out[:, b] = h
    return out.view(np.int64)


def signature_value_keys(sigs: np.ndarray) -> np.ndarray:
    """int64 per signature, equal exactly when the signatures are identical (rank among distinct rows)."""
    rows = np.ascontiguousarray(sigs).view(np.dtype((np.void, sigs.dtype.itemsize * sigs.shape[1])))
    return np.unique(rows.ravel(), return_inverse=True)[1].astype(np.int64).ravel()
