"""Matching captions against metadata entries, and the balancing draw (MetaCLIP, Xu et al. 2023).

No Ray and no storage here: the stage (stage.py) runs these on its actors and tests run them alone.

Matching: an Aho-Corasick automaton (pyahocorasick) over " entry " (tokens joined by single spaces,
padded), scanned over the caption in the same form, so an entry matches only on word boundaries
and overlapping entries ("new york", "york") all match. `naive_match` is MetaCLIP's first version,
a Python loop of substring tests over every entry: the reference the automaton must agree with.

Balancing: an entry matched by c pairs keeps each with p = min(1, t / c); a pair survives when any
of its entries keeps it. Each (pair, entry) draw is a hash of (seed, key, entry), not a random
stream, so the kept set does not depend on block layout, worker count or reruns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pipelines.metadata.text import spaced

_MASK64 = (1 << 64) - 1


class Matcher:
    """Build once per worker (seconds and ~100s of MB at 500k entries), then `match` many captions."""

    def __init__(self, entries: Sequence[str]) -> None:
        import ahocorasick

        # STORE_INTS: values are C ints, not Python objects (a third less memory at 500k entries).
        self.automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        # Entries that tokenise alike ("u.s." and "u. s.") share one key; pipelines.metadata merges them, a
        # hand-made list may not: the key's value is then -1 - (index into `shared`), never a lost entry.
        first: dict[str, int] = {}
        self.shared: list[list[int]] = []
        for i, entry in enumerate(entries):
            key = spaced(entry)
            if not key.strip():
                continue
            if key not in first:
                first[key] = i
                self.automaton.add_word(key, i)
                continue
            value = self.automaton.get(key)
            if value >= 0:
                self.shared.append([value])
                value = -len(self.shared)
                self.automaton.add_word(key, value)
            self.shared[-1 - value].append(i)
        if len(self.automaton) == 0:
            raise ValueError("metadata has no entry to match")
        self.automaton.make_automaton()

    def match(self, caption: str | None) -> list[int]:
        """Ids of the entries found in the caption, sorted, each once."""
        if not caption:
            return []
        found = {i for _, i in self.automaton.iter(spaced(caption))}
        if self.shared and min(found, default=0) < 0:
            found = {j for i in found for j in (self.shared[-1 - i] if i < 0 else (i,))}
        return sorted(found)

    def match_many(self, captions: Sequence[str | None]) -> list[list[int]]:
        return [self.match(c) for c in captions]


def naive_match(caption: str | None, spaced_entries: Sequence[str]) -> list[int]:
    """MetaCLIP's substr_matching: `" entry " in " caption "` for every entry. O(entries) per caption."""
    if not caption:
        return []
    text = spaced(caption)
    return [i for i, e in enumerate(spaced_entries) if e in text]


# ---------------------------------------------------------------------------------------------
# The balancing draw.


def entry_hashes(entries: Sequence[str], seed: int) -> np.ndarray:
    """One 64-bit hash per entry (of the seed and the entry's text, so ids may change between files)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x00{e}".encode(), digest_size=8).digest(), "big")
                     for e in entries], dtype=np.uint64)


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys],
                    dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps, as it must)."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def mix64_int(x: int) -> int:
    """The same finaliser on one Python int (for references and tests)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(key_hash: np.ndarray, entry_hash: np.ndarray) -> np.ndarray:
    """The draw of each (pair, entry): uniform in [0, 1) from 53 bits of mix64(key ^ entry)."""
    return (mix64(key_hash ^ entry_hash) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_probabilities(counts: np.ndarray, t: float | None) -> np.ndarray:
    """p = min(1, t / c) per entry; entries never matched (c = 0) and t = None (infinity) give 1."""
    p = np.ones(len(counts), dtype=np.float64)
    if t is not None:
        over = counts > t
        p[over] = t / counts[over]
    return p


def balance(key_hash: np.ndarray, matches: Sequence[Sequence[int]], p: np.ndarray,
            ent_hash: np.ndarray) -> np.ndarray:
    """Keep mask per pair: some matched entry keeps it. Pairs with no match are never kept."""
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    keep = np.zeros(len(matches), dtype=bool)
    if not lengths.sum():
        return keep
    flat = np.fromiter((i for m in matches for i in m), dtype=np.int64, count=int(lengths.sum()))
    row = np.repeat(np.arange(len(matches)), lengths)
    pe = p[flat]
    kept = pe >= 1.0
    todo = ~kept
    kept[todo] = uniform(key_hash[row[todo]], ent_hash[flat[todo]]) < pe[todo]
    np.logical_or.at(keep, row[kept], True)
    return keep
