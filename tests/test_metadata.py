"""The metadata build (pipelines.metadata): normalisation, sources, wordfreq words, PMI bigrams on Ray Data,
the versioned file curate reads."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.core.config import load_config
from pipelines.metadata.build import BigramConfig, MetadataConfig, WordfreqConfig, build, main, merge, wordfreq_entries
from pipelines.metadata.store import read_metadata, write_metadata
from pipelines.metadata.text import normalize, spaced, tokens

from .test_curate import _row
from .stage_data import commit_rows


def test_normalisation_is_shared_by_entries_and_captions() -> None:
    assert normalize("  New\tYORK  ") == "new york"
    assert normalize("ﬁsh Café") == "fish café"  # NFKC ligature
    assert tokens("A dog, (on) the U.S. ‘beach’!") == ["a", "dog", ",", "(", "on", ")", "the", "u", ".", "s", ".",
                                                        "'beach'", "!"]
    assert spaced("t-shirt don't") == " t-shirt don't "


def test_merge_normalises_dedups_and_records_every_source() -> None:
    entries, info = merge({
        "wordfreq": {"dog": {"zipf": 5.1}, "new": {"zipf": 6.0}},
        "pmi_bigrams": {"new york": {"pmi": 7.5, "count": 40}},
        "user:titles.txt": {"New  York": {}, "U.S.": {}, "u. s.": {}, "Dog": {}, ",": {}, "  ": {}},
    })
    assert entries == ["dog", "new", "new york", "u. s."]  # "u.s." and "u. s." tokenise alike: one entry
    by = dict(zip(entries, info))
    assert by["dog"] == {"sources": ["user:titles.txt", "wordfreq"], "zipf": 5.1}
    assert by["new york"] == {"sources": ["pmi_bigrams", "user:titles.txt"], "pmi": 7.5, "count": 40}
    assert by["u. s."]["sources"] == ["user:titles.txt"]


def test_wordfreq_words_above_the_floor() -> None:
    common = wordfreq_entries(WordfreqConfig(min_zipf=5.0))
    assert 900 < len(common) < 1400 and {"the", "of", "red", "1"} <= set(common)
    assert not any(sum(c.isdigit() for c in w) > 1 for w in common)  # wordfreq's folded numbers ("00", "0000")
    assert all(z >= 5.0 for z in (v["zipf"] for v in common.values()))
    default = wordfreq_entries(WordfreqConfig())
    assert 150_000 < len(default) < 250_000 and set(common) <= set(default) and "triangle" in default


def test_file_is_versioned_and_checked(tmp_path) -> None:
    path = str(tmp_path / "m.jsonl")
    digest = write_metadata(path, ["a", "b c"], [{"sources": ["x"]}, {"sources": ["y"]}], {"note": 1})
    meta = read_metadata(path)
    assert meta.entries == ["a", "b c"] and meta.sha256 == digest and meta.header["version"] == 1
    assert read_metadata(path, parse=False).sha256 == digest
    with open(path) as f:
        text = f.read()
    (tmp_path / "edited.jsonl").write_text(text.replace('"b c"', '"b d"'))
    with pytest.raises(ValueError, match="do not hash"):
        read_metadata(str(tmp_path / "edited.jsonl"))
    (tmp_path / "plain.txt").write_text("dog\ncat\n")
    with pytest.raises(ValueError, match="not a metadata file"):
        read_metadata(str(tmp_path / "plain.txt"))
    with pytest.raises(FileNotFoundError, match="python -m pipelines.metadata"):
        read_metadata(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unique and sorted"):
        write_metadata(path, ["b", "a"], [{}, {}], {})


def test_shipped_demo_metadata_matches_every_demo_caption() -> None:
    from pipelines.curate.match import Matcher
    from pipelines.demo.synthetic import DIGIT_NAMES, digit_samples, shape_samples

    meta = read_metadata("configs/metadata_demo.jsonl")
    m = Matcher(meta.entries)
    for s in shape_samples(72, px=16, seed=1) + digit_samples("train", px=16, seed=1, limit=40):
        found = {meta.entries[i] for i in m.match(s.caption)}
        if s.kind == "digit":  # "the digit seven" or "a handwritten 7"
            assert {s.label, str(DIGIT_NAMES.index(s.label))} & found, s.caption
        else:
            assert set(s.label.split()) <= found, s.caption  # its label words, not just "a"
    cfg = load_config(MetadataConfig, "configs/metadata_demo.yaml")
    assert cfg.user_lists == ["configs/demo_vocabulary.txt"]
    assert load_config(MetadataConfig, "configs/metadata.yaml").bigrams.corpus == "out/dedup"


@pytest.mark.usefixtures("ray_session")
def test_build_counts_pmi_bigrams_on_ray_data(tmp_path) -> None:
    # 40 captions "golden retriever on grass", 40 "a dog on the grass", 20 "the golden hour": "golden retriever"
    # is the one bigram whose words occur (almost) only together.
    captions = ["golden retriever on grass"] * 40 + ["a dog on the grass"] * 40 + ["the golden hour"] * 20
    commit_rows(str(tmp_path / "pool"), [_row(i, c) for i, c in enumerate(captions)], rows_per_part=30, stage="dedup")
    (tmp_path / "more.txt").write_text("golden retriever\n" * 5)
    (tmp_path / "titles.txt").write_text("# Wikipedia titles\nNew York City\ngolden retriever\n")
    out = str(tmp_path / "meta.jsonl")
    cfg = MetadataConfig(output=out, wordfreq=WordfreqConfig(enabled=False), user_lists=[str(tmp_path / "titles.txt")],
                         bigrams=BigramConfig(corpus=str(tmp_path / "pool"), text_files=[str(tmp_path / "more.txt")],
                                              min_count=20, min_pmi=1.0))
    header = build(cfg)
    meta = read_metadata(out)
    by = dict(zip(meta.entries, meta.info))
    # unigrams 4*40 + 5*40 + 3*20 + 2*5 = 430 words; bigrams 3*40 + 4*40 + 2*20 + 5 = 325
    c_ab, c_a, c_b = 45, 65, 45
    assert by["golden retriever"]["count"] == c_ab
    assert by["golden retriever"]["pmi"] == pytest.approx(math.log2((c_ab / 325) / ((c_a / 430) * (c_b / 430))), abs=1e-3)
    assert by["golden retriever"]["sources"] == ["pmi_bigrams", "user:titles.txt"]
    assert "on grass" not in by or by["on grass"]["pmi"] < by["golden retriever"]["pmi"]
    assert "new york city" in by and header["entries"] == len(meta.entries)
    assert json.loads(open(out).readline())["sources"]["user:titles.txt"] == 2


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main([f"output={tmp_path / 'm.jsonl'}", f"user_lists=[{tmp_path / 'nope.txt'}]"]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    assert main([f"output={tmp_path / 'm.jsonl'}", "wordfreq.enabled=false"]) == 2
    assert "metadata would be empty" in capsys.readouterr().err
