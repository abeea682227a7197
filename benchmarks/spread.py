"""Mean and tail of repeated measurements, and the report files, for the benchmarks that compare ways round by round."""

from __future__ import annotations

import json
import os
import statistics


def spread(xs: list[float]) -> dict:
    """mean, median, p90 (nearest rank) and max of `xs`."""
    xs = sorted(xs)
    return {"mean": statistics.mean(xs), "median": statistics.median(xs), "max": xs[-1],
            "p90": xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]}


def write_report(out_dir: str, name: str, lines: list[str], data: dict) -> None:
    """`out_dir`/`name`.md (the table a person reads) and `name`.json (every round), and the table on stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
    print("\n".join(lines))
