"""The entry-count distribution before and after balancing, as the manifest records it.

Counts are per entry: how many pairs match it (before) and how many of the kept pairs do (after).
MetaCLIP's point is the shape: before, a head of entries ("a", "photo", "the") matched by a large
share of the pool and a long tail; after, the head flattened at about t and the tail untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _tail(counts: np.ndarray) -> dict[str, int]:
    nz = counts[counts > 0]
    return {"count_1": int((nz == 1).sum()), "count_2_10": int(((nz >= 2) & (nz <= 10)).sum()),
            "count_11_100": int(((nz >= 11) & (nz <= 100)).sum()), "count_over_100": int((nz > 100).sum())}


def _side(counts: np.ndarray, entries: Sequence[str], t: float | None, head: int) -> dict[str, Any]:
    nz = counts[counts > 0]
    top = np.argsort(-counts, kind="stable")[:head]
    return {
        "entries_matched": int(nz.size),
        "matches": int(counts.sum()),
        "max": int(nz.max()) if nz.size else 0,
        "median": float(np.median(nz)) if nz.size else 0.0,
        "over_cap": int((counts > t).sum()) if t is not None else 0,
        "head": [[entries[i], int(counts[i])] for i in top if counts[i] > 0],
        "tail": _tail(counts),
    }


def distribution(before: np.ndarray, after: np.ndarray, entries: Sequence[str], t: float | None,
                 head: int = 20, points: int = 80) -> dict[str, Any]:
    """Summary for the manifest's `extra`: both sides' head, tail and entries over the cap, and a
    rank curve (entries ordered by count before; ranks log-spaced) for the report's log-log plot."""
    order = np.argsort(-before, kind="stable")
    n = int((before > 0).sum())
    ranks = sorted({int(r) for r in np.unique(np.geomspace(1, max(n, 1), num=min(points, max(n, 1))).round())}) if n else []
    return {
        "t": t,
        # Entries sampled by balancing (count before > t): each keeps about t of its pairs, plus pairs that
        # survive through another of their entries.
        "entries_at_cap": int((before > t).sum()) if t is not None else 0,
        "before": _side(before, entries, t, head),
        "after": _side(after, entries, t, head),
        # [rank (1 = most matched before), count before, count after of that same entry]
        "curve": [[r, int(before[order[r - 1]]), int(after[order[r - 1]])] for r in ranks],
    }
