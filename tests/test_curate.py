"""The curate stage (MetaCLIP matching and balancing) against a one-process reference, and the filter's
per-query cap on rows without a query (issue 14)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core.config import load_config
from pipelines.core.parts import OutputConfig
from pipelines.core.schema import sample_key
from pipelines.core.storage import Storage
from pipelines.curate.match import (Matcher, balance, entry_hashes, keep_probabilities, key_hashes, mix64,
                                    mix64_int, naive_match)
from pipelines.curate.stage import CurateConfig, main, run
from pipelines.metadata.store import write_metadata
from tests.conftest import actors_created
from pipelines.metadata.text import spaced

from .stage_data import commit_rows

ENTRIES = sorted(["a", "photo", "of", "the", "red", "blue", "triangle", "circle", "new york", "york", "u.s.",
                  "golden retriever", "dog", "rare bird"])


def _row(i: int, caption: str | None, query: str | None = "") -> dict:
    url = f"http://x.test/{i}.jpg"
    return {"key": sample_key(url, caption or ""), "url": url, "caption": caption, "query": query, "image": b"",
            "width": 64, "height": 64, "original_width": 64, "original_height": 64, "sha256": "", "phash": 0}


def _corpus(n: int = 600, seed: int = 0) -> list[dict]:
    """Captions over a Zipf-like vocabulary: a few entries in most rows, a long tail, some rows with no entry."""
    rng = random.Random(seed)
    head = ["a", "photo", "of", "the"]
    tail = ["red", "blue", "triangle", "circle", "New York", "golden retriever", "dog", "U.S.", "cat", "zebra",
            "category", "yorkshire"]
    rows = []
    for i in range(n):
        words = rng.sample(head, rng.randint(0, 3)) + [rng.choice(tail) for _ in range(rng.randint(0, 2))]
        if i % 97 == 0:
            words.append("rare bird")
        rng.shuffle(words)
        rows.append(_row(i, " ".join(words) + rng.choice(["", ".", "!"]) if words else rng.choice(["", None, "zzz"])))
    return rows


def reference(rows: list[dict], entries: list[str], t: float | None, seed: int) -> tuple[set[str], Counter]:
    """One process, MetaCLIP's loop: substring tests per entry, counts, a per-(pair, entry) draw in plain ints."""
    spaced_entries = [spaced(e) for e in entries]
    matches = {r["key"]: naive_match(r["caption"], spaced_entries) for r in rows}
    counts = Counter(i for m in matches.values() for i in m)
    h = lambda s: int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")  # noqa: E731
    kept = set()
    for key, ids in matches.items():
        for i in ids:
            p = 1.0 if t is None or counts[i] <= t else t / counts[i]
            if p >= 1.0 or (mix64_int(h(key) ^ h(f"{seed}\x00{entries[i]}")) >> 11) / 2 ** 53 < p:
                kept.add(key)
                break
    return kept, counts


# ---------------------------------------------------------------------------------------------
# Matching and the draw, without Ray.


def test_matches_on_word_boundaries_exactly() -> None:
    m = Matcher(ENTRIES)
    ids = lambda text: [ENTRIES[i] for i in m.match(text)]  # noqa: E731
    assert ids("A photo of a Red Triangle in New York, U.S.") == ["a", "new york", "of", "photo", "red", "triangle",
                                                                 "u.s.", "york"]
    assert ids("categorY of Yorkshire photos") == ["of"]  # no "cat"/"york"/"photo" inside longer words
    assert ids("golden  retriever!") == ["golden retriever"]  # whitespace runs and punctuation
    assert ids("golden, retriever") == []  # a comma breaks the bigram
    assert ids("the\tdog.") == ["dog", "the"]
    assert ids("ＲＥＤ") == ["red"]  # NFKC: full-width letters
    assert ids(None) == [] and ids("") == [] and ids("zzz") == []
    twins = Matcher(["u. s.", "u.s.", "x", "u.s ."])  # one key, three entries: none is lost
    assert twins.match("the U.S. flag") == [0, 1, 3]
    spaced_entries = [spaced(e) for e in ENTRIES]
    for r in _corpus(300, seed=5):  # the automaton agrees with MetaCLIP's loop on every caption
        assert m.match(r["caption"]) == naive_match(r["caption"], spaced_entries), r["caption"]


def test_counts_and_probabilities_on_a_hand_made_corpus() -> None:
    captions = ["a red dog", "a blue dog", "a dog", "the red circle", "nothing here", "a photo of new york"]
    m = Matcher(ENTRIES)
    counts = np.zeros(len(ENTRIES), np.int64)
    for ids in m.match_many(captions):
        counts[ids] += 1
    got = {ENTRIES[i]: int(c) for i, c in enumerate(counts) if c}
    assert got == {"a": 4, "dog": 3, "red": 2, "blue": 1, "the": 1, "circle": 1, "photo": 1, "of": 1,
                   "new york": 1, "york": 1}
    p = keep_probabilities(counts, t=2)
    assert p[ENTRIES.index("a")] == 0.5 and p[ENTRIES.index("dog")] == pytest.approx(2 / 3)
    assert p[ENTRIES.index("red")] == 1.0 and p[ENTRIES.index("rare bird")] == 1.0  # unmatched: 1, unused
    assert (keep_probabilities(counts, None) == 1.0).all()


def test_draw_is_the_plain_int_hash_and_t_inf_keeps_every_matched_pair() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2 ** 63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    assert [int(v) for v in mix64(x)] == [mix64_int(int(v)) for v in x]
    matches = [[0], [1, 2], [], [2], [0, 1, 2]] * 40
    keys = key_hashes([str(i) for i in range(len(matches))])
    hashes = entry_hashes(["x", "y", "z"], seed=0)
    keep = balance(keys, matches, np.ones(3), hashes)
    assert keep.tolist() == [bool(m) for m in matches]
    p = np.array([0.1, 0.0, 0.5])
    keep = balance(keys, matches, p, hashes)
    assert not keep[[i for i, m in enumerate(matches) if m == [] or m == [1]]].any()
    share = keep[[i for i, m in enumerate(matches) if m == [2]]].mean()
    assert 0.3 < share < 0.7  # p = 0.5 on 40 pairs


# ---------------------------------------------------------------------------------------------
# The stage on Ray.


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The same rows committed as one file and as seven, and a metadata file."""
    root = tmp_path_factory.mktemp("curate")
    rows = _corpus()
    commit_rows(str(root / "one"), rows, rows_per_part=len(rows), stage="dedup")
    commit_rows(str(root / "seven"), rows, rows_per_part=90, stage="dedup")
    meta = str(root / "metadata.jsonl")
    write_metadata(meta, ENTRIES, [{"sources": ["test"]}] * len(ENTRIES), {})
    return {"root": root, "rows": rows, "meta": meta}


def _curate(pool, layout: str, out: str, **kw) -> tuple:
    cfg = CurateConfig(input=str(pool["root"] / layout), metadata=pool["meta"], output=OutputConfig(path=out), **kw)
    m = run(cfg)
    st = Storage.from_uri(out)
    kept = set(st.read_parquet(m.file_paths(), columns=["key"]).column("key").to_pylist()) if m.files else set()
    rej = st.read_parquet(m.extra["rejected_files"][0]["path"] if len(m.extra["rejected_files"]) == 1 else
                          [f["path"] for f in m.extra["rejected_files"]])
    return m, kept, rej


@pytest.mark.usefixtures("ray_session")
def test_stage_equals_the_reference_for_any_layout_and_worker_count(pool, tmp_path) -> None:
    t, seed = 40, 3
    want, counts = reference(pool["rows"], ENTRIES, t, seed)
    m1, kept1, rej1 = _curate(pool, "one", str(tmp_path / "a"), t=t, seed=seed, workers=1)
    m7, kept7, rej7 = _curate(pool, "seven", str(tmp_path / "b"), t=t, seed=seed, workers=3)
    assert kept1 == want and kept7 == want and 0 < len(want) < len(pool["rows"])
    assert m1.fingerprint != m7.fingerprint  # different inputs, same result
    no_match = {r["key"] for r in pool["rows"]} - {r["key"] for r in pool["rows"] if
                                                   naive_match(r["caption"], [spaced(e) for e in ENTRIES])}
    for m, rej in ((m1, rej1), (m7, rej7)):
        reasons = dict(zip(rej.column("key").to_pylist(), rej.column("reason").to_pylist()))
        assert {k for k, r in reasons.items() if r == "no_metadata_match"} == no_match
        assert m.rejected == {"no_metadata_match": len(no_match),
                              "balanced_out": len(pool["rows"]) - len(want) - len(no_match)}
        assert m.rows_out == len(want)
        dist = m.extra["entry_counts"]
        assert dist["entries_at_cap"] == sum(c > t for c in counts.values())
        assert dict(map(tuple, dist["before"]["head"])) == {ENTRIES[i]: c for i, c in counts.items()}
        kept_counts = Counter(i for r in pool["rows"] if r["key"] in want
                              for i in naive_match(r["caption"], [spaced(e) for e in ENTRIES]))
        assert dict(map(tuple, dist["after"]["head"])) == {ENTRIES[i]: c for i, c in kept_counts.items()}
        assert dist["after"]["max"] < dist["before"]["max"]
    detail = rej7.filter(pa.compute.equal(rej7.column("reason"), "balanced_out")).column("detail")[0].as_py()
    assert "(c=" in detail and "p=" in detail
    counts_file = Storage.from_uri(str(tmp_path / "b")).read_parquet("entry_counts.parquet")
    assert dict(zip(counts_file.column("entry").to_pylist(), counts_file.column("count_before").to_pylist())) == {
        ENTRIES[i]: c for i, c in counts.items()}
    assert not Storage.from_uri(str(tmp_path / "b")).list(f"_work/{m7.fingerprint[:8]}")
    # Same config and input again: nothing to do, the same manifest.
    again = run(CurateConfig(input=str(pool["root"] / "seven"), metadata=pool["meta"], t=t, seed=seed,
                             output=OutputConfig(path=str(tmp_path / "b"))))
    assert again.created_at == m7.created_at


@pytest.mark.usefixtures("ray_session")
def test_t_infinity_keeps_every_matched_row(pool, tmp_path) -> None:
    cfg = load_config(CurateConfig, None, [f"input={pool['root'] / 'seven'}", f"metadata={pool['meta']}", "t=.inf",
                                           f"output.path={tmp_path / 'inf'}"])
    assert cfg.t is None and cfg.workers is None
    before = actors_created("MatchFiles")
    m = run(cfg)
    # workers unset: one matcher per ROWS_PER_WORKER input rows, so one for this small input of several files.
    assert len(m.file_paths()) > 1 and actors_created("MatchFiles") == before + 1
    matched = {r["key"] for r in pool["rows"] if naive_match(r["caption"], [spaced(e) for e in ENTRIES])}
    kept = set(Storage.from_uri(str(tmp_path / "inf")).read_parquet(m.file_paths(), columns=["key"])
               .column("key").to_pylist())
    assert kept == matched and set(m.rejected) == {"no_metadata_match"}
    assert m.extra["entry_counts"]["entries_at_cap"] == 0
    assert m.extra["entry_counts"]["before"] == m.extra["entry_counts"]["after"]


def test_config_errors_are_one_line(pool, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="curate.t must be > 0"):
        CurateConfig(input="x", t=0)
    assert main([f"input={pool['root'] / 'one'}", f"metadata={tmp_path / 'nope.jsonl'}",
                 f"output.path={tmp_path / 'o'}"]) == 2
    assert "curate.metadata" in capsys.readouterr().err
    bad = tmp_path / "edited.jsonl"
    text = open(pool["meta"]).read().replace('"dog"', '"cat"')
    bad.write_text(text)
    assert main([f"input={pool['root'] / 'one'}", f"metadata={bad}", f"output.path={tmp_path / 'o'}"]) == 2
    assert "do not hash to the header's sha256" in capsys.readouterr().err


def test_report_plots_the_entry_counts() -> None:
    from pipelines.run.report import build_report_html

    dist = {"t": 10, "entries_at_cap": 1, "curve": [[1, 100, 12], [2, 9, 9], [5, 1, 1]]}
    html = build_report_html({"stages": {"curate": {"rows_in": 10, "rows_out": 8, "rejected": {"balanced_out": 2},
                                                    "extra": {"entry_counts": dist}}}})
    assert "pairs per metadata entry, before and after balancing (1 entries over t)" in html
    assert html.count("data:image/png") == 2  # the funnel and the entry counts


# ---------------------------------------------------------------------------------------------
# The filter's per-query cap (issue 14): rows without a query are never one bucket.


@pytest.mark.usefixtures("ray_session")
def test_filter_cap_exempts_rows_without_a_query(tmp_path) -> None:
    from pipelines.filter.rules import over_query_cap
    from pipelines.filter.stage import FilterStageConfig, run as run_filter

    assert over_query_cap(["q", "", None], ["k9", "k9", "k9"], {"q": "k1", "": "k1"}) == [True, False, False]
    rows = [_row(i, f"a photo of a red triangle number {i}", query=("popular" if i < 20 else ("" if i % 2 else None)))
            for i in range(60)]
    commit_rows(str(tmp_path / "crawl"), rows, rows_per_part=30)
    m = run_filter(load_config(FilterStageConfig, None, [f"input={tmp_path / 'crawl'}",
                                                         f"output.path={tmp_path / 'filter'}",
                                                         "rules.max_per_query=5", "rules.min_image_side=1"]))
    assert m.rejected == {"query_cap": 15} and m.rows_out == 45
    assert m.extra["query_cap_exempt_rows"] == 40
    # A cap above the input's 60 rows: no query can be over it (the cut-off pass is skipped); the exempt rows
    # are still counted, by the parts.
    m = run_filter(load_config(FilterStageConfig, None, [f"input={tmp_path / 'crawl'}",
                                                         f"output.path={tmp_path / 'filter_60'}",
                                                         "rules.max_per_query=60", "rules.min_image_side=1"]))
    assert m.rejected == {} and m.rows_out == 60 and m.extra["queries_capped"] == 0
    assert m.extra["query_cap_exempt_rows"] == 40
