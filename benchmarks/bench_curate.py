"""Curate's matching cost: captions matched per second on one core against 500k metadata entries, the
automaton's memory and build time, beside MetaCLIP's naive loop over entries on a sample.

    python -m benchmarks.bench_curate [--captions 1000000] [--entries 500000] [--naive-sample 200]

Entries: wordfreq's English "large" list (all ~321k words, zipf >= 1) plus bigrams of wordfreq words up
to --entries (drawn by frequency, as PMI bigrams of a real pool would be made of common words). Captions:
5-15 words drawn by wordfreq frequency (Zipfian, like real alt-text vocabulary), with a trailing period.
Single process: the figure is per core (curate runs one automaton per actor, one actor per CPU).
Writes benchmarks/out/curate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import psutil


def _entries(n: int, rng: random.Random) -> tuple[list[str], list[str], list[float]]:
    import wordfreq

    freqs = wordfreq.get_frequency_dict("en", wordlist="large")
    words = [w for w in freqs if sum(c.isdigit() for c in w) <= 1]
    weights = [freqs[w] for w in words]
    entries = set(words[: n])
    common = words[:20000]
    while len(entries) < n:
        entries.add(f"{rng.choice(common)} {rng.choice(common)}")
    return sorted(entries), words, weights


def _captions(n: int, words: list[str], weights: list[float], rng: random.Random) -> list[str]:
    lengths = [rng.randint(5, 15) for _ in range(n)]
    flat = rng.choices(words, weights=weights, k=sum(lengths))
    out, i = [], 0
    for k in lengths:
        out.append(" ".join(flat[i:i + k]) + ".")
        i += k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=1_000_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--naive-sample", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/out/curate.json")
    args = ap.parse_args()

    from pipelines.curate.match import Matcher, naive_match
    from pipelines.metadata.text import spaced

    rng = random.Random(0)
    proc = psutil.Process()
    entries, words, weights = _entries(args.entries, rng)
    captions = _captions(args.captions, words, weights, rng)
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    matcher = Matcher(entries)
    build_s = time.perf_counter() - t0
    automaton_mib = (proc.memory_info().rss - rss0) / 2**20
    stats = matcher.automaton.get_stats()

    t0 = time.process_time()
    w0 = time.perf_counter()
    matched = n_matches = 0
    for c in captions:
        ids = matcher.match(c)
        matched += bool(ids)
        n_matches += len(ids)
    cpu_s, wall_s = time.process_time() - t0, time.perf_counter() - w0

    spaced_entries = [spaced(e) for e in entries]
    sample = captions[: args.naive_sample]
    t0 = time.process_time()
    naive = [naive_match(c, spaced_entries) for c in sample]
    naive_cpu = time.process_time() - t0
    assert naive == [matcher.match(c) for c in sample], "automaton and naive loop disagree"

    result = {
        "entries": len(entries), "captions": len(captions), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "automaton_build_s": round(build_s, 2), "automaton_rss_mib": round(automaton_mib, 1),
        "automaton_total_size_mib": round(stats["total_size"] / 2**20, 1), "automaton_nodes": stats["nodes_count"],
        "match_cpu_s": round(cpu_s, 2), "match_wall_s": round(wall_s, 2),
        "captions_per_cpu_s": round(len(captions) / cpu_s),
        "captions_matched_share": round(matched / len(captions), 4),
        "mean_entries_per_caption": round(n_matches / len(captions), 2),
        "naive_sample": len(sample), "naive_captions_per_cpu_s": round(len(sample) / naive_cpu, 2),
        "speedup": round((len(captions) / cpu_s) / (len(sample) / naive_cpu)),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
