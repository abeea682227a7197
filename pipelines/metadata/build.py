"""Build the metadata curate matches against: English words, high-PMI bigrams and user lists.

    python -m pipelines.metadata --config configs/metadata.yaml [key=value ...]

What it is, next to the paper's 500,000 queries (Radford et al. 2021, section 2.2) and MetaCLIP's
reconstruction of them (Xu et al. 2023: 251k Wikipedia unigrams, 100k bigrams, 61k titles, 86k
WordNet synsets):

- Words: every English word of `wordfreq` at or above `wordfreq.min_zipf`. wordfreq ships its
  frequencies in the wheel (no download), but they blend Wikipedia with subtitles, news, books, web
  text, Twitter and Reddit, so this is not "words occurring 100 times in English Wikipedia". The
  default floor, zipf 1.4, is that count's frequency in a ~4 billion-word Wikipedia
  (log10(100 / 4e9 * 1e9) = 1.4): about 197k words, near MetaCLIP's 251k. Multi-digit numbers,
  which wordfreq folds into 0-patterns ("0000"), are left out; single digits stay.
- Bigrams: pointwise mutual information, log2(p(a b) / (p(a) p(b))), over a corpus you give,
  counted with Ray Data (default: the pool's own captions, a committed stage output's caption
  column). The paper took its bigrams from Wikipedia; a pool's captions find the pool's own
  phrases ("golden retriever") and its boilerplate too, so look at the top of the list.
- User lists: any number of text files, one entry per line (`#` starts a comment): Wikipedia
  titles above a search volume, WordNet lemmas, a domain's vocabulary. Neither the paper's titles
  nor WordNet ship with this project (no download at run time): bring them as lists.

Every entry is normalised (NFKC, lowercase, whitespace; pipelines.metadata.text), deduplicated on
the tokens curate matches, and keeps the names of all its sources. The file is versioned (format
version in its header) and carries the sha256 of its entries, which curate's fingerprint records.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines.core.config import to_dict
from pipelines.core.runtime import RayConfig, data_args, init_ray
from pipelines.core.storage import S3Options
from pipelines.metadata.store import write_metadata
from pipelines.metadata.text import is_word, normalize, spaced, tokens


@dataclass
class WordfreqConfig:
    enabled: bool = True
    lang: str = "en"
    # wordfreq's "large" list goes down to zipf 1.0 (one per 100 million words); "best" = large when it exists.
    wordlist: str = "large"
    # Zipf = log10(frequency per billion words). 1.4 ~ 100 occurrences in a 4-billion-word Wikipedia.
    min_zipf: float = 1.4

    def __post_init__(self) -> None:
        if self.wordlist not in ("large", "best", "small"):
            raise ValueError(f"wordfreq.wordlist must be large, best or small, got {self.wordlist!r}")


@dataclass
class BigramConfig:
    # A committed stage output (directory with _manifest.json) whose `column` is the corpus; "" = none.
    corpus: str = ""
    column: str = "caption"
    # Plain text files, one document (caption) per line, counted as well.
    text_files: list[str] = field(default_factory=list)
    # A bigram and each of its words must occur at least this often (PMI is noise on rare pairs).
    min_count: int = 20
    # log2 PMI: 4 = the pair occurs 16 times as often as its words' frequencies predict.
    min_pmi: float = 4.0
    # At most this many bigrams, highest PMI first (MetaCLIP: 100k).
    max_bigrams: int = 100000

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.max_bigrams < 0:
            raise ValueError("bigrams.min_count must be >= 1 and bigrams.max_bigrams >= 0")


@dataclass
class MetadataConfig:
    # The metadata file to write (JSON lines), local or s3://; curate's `metadata` key points at it.
    output: str = "out/metadata/metadata.jsonl"
    wordfreq: WordfreqConfig = field(default_factory=WordfreqConfig)
    bigrams: BigramConfig = field(default_factory=BigramConfig)
    # Text files, one entry per line; each file's name becomes its entries' source ("user:<file name>").
    user_lists: list[str] = field(default_factory=list)
    # Connection settings for s3:// paths (output, corpus, lists); credentials from the AWS env/profile.
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output is empty: give the metadata file to write")
        for path in self.user_lists + self.bigrams.text_files:
            if "://" not in path and not os.path.isfile(path):
                raise FileNotFoundError(f"metadata list or corpus file {path} does not exist")


# ---------------------------------------------------------------------------------------------
# Sources. Each returns {normalised entry: info}.


def wordfreq_entries(cfg: WordfreqConfig) -> dict[str, dict[str, Any]]:
    import wordfreq

    freqs = wordfreq.get_frequency_dict(cfg.lang, wordlist=cfg.wordlist)
    out = {}
    for word, freq in freqs.items():
        zipf = math.log10(freq) + 9 if freq > 0 else -math.inf
        # wordfreq folds every multi-digit number into one token of 0s ("0000" = all 4-digit numbers).
        if zipf < cfg.min_zipf or sum(c.isdigit() for c in word) > 1 or not any(c.isalnum() for c in word):
            continue
        out[normalize(word)] = {"zipf": round(zipf, 2)}
    return out


def read_list(path: str, s3: S3Options | None = None) -> list[str]:
    """A user list: one entry per line, `#` comments and blank lines skipped."""
    from pipelines.metadata.store import _split

    storage, name = _split(path, s3)
    text = storage.read_bytes(name).decode("utf-8", errors="replace")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def _count_grams(batch: pa.Table, column: str) -> pa.Table:
    """Unigram and bigram counts of one batch of documents (bigrams of adjacent words only)."""
    counts: Counter = Counter()
    for text in batch.column(column).to_pylist():
        if not text:
            continue
        toks = tokens(text)
        counts.update(t for t in toks if is_word(t))
        counts.update(f"{a} {b}" for a, b in zip(toks, toks[1:]) if is_word(a) and is_word(b))
    grams = list(counts)
    return pa.table({"gram": pa.array(grams, pa.string()), "n": pa.array([counts[g] for g in grams], pa.int64())})


_UNIGRAMS, _BIGRAMS = "\x00unigrams", "\x00bigrams"  # total rows (no token holds a NUL)


def _unigrams_and_totals(batch: pa.Table, min_count: int) -> pa.Table:
    grams, ns = batch.column("gram").to_pylist(), batch.column("n").to_pylist()
    bi = sum(n for g, n in zip(grams, ns) if " " in g)
    keep = [(g, n) for g, n in zip(grams, ns) if " " not in g and n >= min_count]
    keep += [(_UNIGRAMS, sum(ns) - bi), (_BIGRAMS, bi)]
    return pa.table({"gram": pa.array([g for g, _ in keep], pa.string()), "n": pa.array([n for _, n in keep], pa.int64())})


def _pmi(batch: pa.Table, unigrams: Any, n_uni: int, n_bi: int, min_count: int, min_pmi: float) -> pa.Table:
    import ray

    uni = ray.get(unigrams) if isinstance(unigrams, ray.ObjectRef) else unigrams
    keep_gram, keep_n, keep_pmi = [], [], []
    for gram, n in zip(batch.column("gram").to_pylist(), batch.column("n").to_pylist()):
        if " " not in gram or n < min_count:
            continue
        a, b = gram.split(" ")
        ca, cb = uni.get(a, 0), uni.get(b, 0)
        if ca < min_count or cb < min_count:
            continue
        pmi = math.log2((n / n_bi) / ((ca / n_uni) * (cb / n_uni)))
        if pmi >= min_pmi:
            keep_gram.append(gram), keep_n.append(n), keep_pmi.append(pmi)
    return pa.table({"gram": pa.array(keep_gram, pa.string()), "n": pa.array(keep_n, pa.int64()),
                     "pmi": pa.array(keep_pmi, pa.float64())})


def pmi_bigrams(cfg: BigramConfig, s3: S3Options | None = None) -> dict[str, dict[str, Any]]:
    """High-PMI bigrams of the corpus, counted by Ray Data tasks: per-batch counts, one groupby-sum,
    then only words at or above min_count (for the PMI denominators) and the kept bigrams reach the driver."""
    import ray
    import ray.data

    from pipelines.core.manifest import read_committed

    sources = []
    if cfg.corpus:
        storage, manifest = read_committed(cfg.corpus, s3, "bigrams.corpus", column=cfg.column)
        if manifest.files:
            sources.append(ray.data.read_parquet(**storage.ray_read_args(manifest.file_paths()), columns=[cfg.column],
                                                 ray_remote_args=data_args()))
    if cfg.text_files:
        sources.append(ray.data.read_text(cfg.text_files, ray_remote_args=data_args())
                       .rename_columns({"text": cfg.column}))
    if not sources:
        return {}
    ds = sources[0] if len(sources) == 1 else sources[0].union(*sources[1:])
    counted = (ds.map_batches(_count_grams, batch_format="pyarrow", fn_kwargs={"column": cfg.column}, **data_args())
               .groupby("gram").sum("n").rename_columns({"sum(n)": "n"}).materialize())
    # One pass for the PMI denominators: the totals and the words at or above min_count.
    rows = counted.map_batches(_unigrams_and_totals, batch_format="pyarrow", fn_kwargs={"min_count": cfg.min_count},
                               **data_args()).take_all()
    n_bi = sum(r["n"] for r in rows if r["gram"] == _BIGRAMS)
    n_uni = sum(r["n"] for r in rows if r["gram"] == _UNIGRAMS)
    if not n_bi:
        return {}
    unigrams = ray.put({r["gram"]: int(r["n"]) for r in rows if r["gram"] not in (_BIGRAMS, _UNIGRAMS)})
    best = (counted.map_batches(_pmi, batch_format="pyarrow", fn_kwargs={
                "unigrams": unigrams, "n_uni": n_uni, "n_bi": n_bi, "min_count": cfg.min_count,
                "min_pmi": cfg.min_pmi}, **data_args())
            .sort(["pmi", "gram"], descending=[True, False]).limit(cfg.max_bigrams).take_all())
    return {normalize(r["gram"]): {"pmi": round(float(r["pmi"]), 3), "count": int(r["n"])} for r in best}


# ---------------------------------------------------------------------------------------------
# Merging and writing.


def merge(sources: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """{source: {entry: info}} -> sorted unique entries with their sources. Entries that tokenise alike
    ("u.s." and "u. s.") are one entry: the first in sorted order is kept, the sources are unioned."""
    by_key: dict[str, tuple[str, dict[str, Any]]] = {}
    for source, entries in sorted(sources.items()):
        for raw, info in entries.items():
            entry = normalize(raw)
            key = spaced(entry)
            if not any(is_word(t) for t in key.split()):
                continue  # empty or punctuation only: would match every caption's commas
            if key not in by_key:
                by_key[key] = (entry, {"sources": []})
            kept, merged = by_key[key]
            if entry < kept:
                by_key[key] = (entry, merged)
            merged["sources"] = sorted(set(merged["sources"]) | {source})
            merged.update({k: v for k, v in info.items() if k != "sources"})
    rows = sorted(by_key.values())
    return [e for e, _ in rows], [i for _, i in rows]


def build(cfg: MetadataConfig) -> dict[str, Any]:
    """Build and write the metadata file; returns its header (entries, sha256, counts by source)."""
    started = time.time()
    sources: dict[str, dict[str, dict[str, Any]]] = {}
    if cfg.wordfreq.enabled:
        sources["wordfreq"] = wordfreq_entries(cfg.wordfreq)
    if cfg.bigrams.corpus or cfg.bigrams.text_files:
        init_ray(cfg.ray)
        sources["pmi_bigrams"] = pmi_bigrams(cfg.bigrams, cfg.s3)
    for path in cfg.user_lists:
        name = f"user:{os.path.basename(path)}"
        if name in sources:
            raise ValueError(f"user_lists: two lists are named {os.path.basename(path)}; sources are named by file name")
        sources[name] = {entry: {} for entry in read_list(path, cfg.s3)}
    entries, info = merge(sources)
    if not entries:
        raise ValueError("metadata would be empty: enable wordfreq, give a bigram corpus or a user list")
    per_source = Counter(s for i in info for s in i["sources"])
    from importlib.metadata import version

    header = {"sources": dict(sorted(per_source.items())), "wordfreq_version": version("wordfreq"),
              "config": {k: v for k, v in to_dict(cfg).items() if k not in ("ray", "s3")}}
    digest = write_metadata(cfg.output, entries, info, header, cfg.s3)
    print(f"metadata: {len(entries):,} entries ({', '.join(f'{k} {v:,}' for k, v in sorted(per_source.items()))}) "
          f"-> {cfg.output} sha256 {digest[:12]} in {time.time() - started:.1f} s", flush=True)
    return {"entries": len(entries), "sha256": digest, "sources": dict(per_source)}


def main(argv: list[str] | None = None) -> int:
    from pipelines.core.cli import run_command

    return run_command("metadata", MetadataConfig, argv, lambda cfg, _: build(cfg), doc=__doc__,
                       log_root=lambda c: os.path.dirname(c.output) or "." if "://" not in c.output else None)
