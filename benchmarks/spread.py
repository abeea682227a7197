"""Mean and tail of repeated measurements, for the benchmarks that compare ways round by round."""

from __future__ import annotations

import statistics


def spread(xs: list[float]) -> dict:
    """mean, median, p90 (nearest rank) and max of `xs`."""
    xs = sorted(xs)
    return {"mean": statistics.mean(xs), "median": statistics.median(xs), "max": xs[-1],
            "p90": xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]}
