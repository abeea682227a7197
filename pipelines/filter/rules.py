"""Filter rules: each returns, for a batch of sample rows, a reason per row ("" = keep).

Rules know nothing of Ray or storage (datatrove's base_filter habit); the filter stage runs them,
counts drops by reason and keeps every rejected row for audit. A rule looks at one row at a time
except the per-query cap, which needs a global view and is computed by the stage with a groupby.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
import pyarrow as pa


@dataclass
class FilterConfig:
    # Caption rules (characters and whitespace-separated words after stripping).
    min_caption_chars: int = 5
    max_caption_chars: int = 1000
    min_words: int = 2
    max_words: int = 200
    # Language identification with py3langid (its model ships in the wheel). Empty list = any language.
    languages: list[str] = field(default_factory=lambda: ["en"])
    # Drop a caption only when langid is at least this sure it is in a language outside `languages`:
    # on short captions langid is often unsure, and an unsure English caption must not be lost.
    min_language_prob: float = 0.5
    # Captions shorter than this (chars) skip the language rule: langid is unreliable on 2-3 words.
    language_min_chars: int = 20
    # Image rules on the stored (resized) image and the original.
    min_image_side: int = 32
    max_aspect_ratio: float = 3.0
    # The paper's class balance: "up to 20,000 (image, text) pairs per query". None = no cap. Rows without a
    # query (null or "") are exempt, never one bucket; balance such pools with the curate stage instead.
    max_per_query: int | None = 20000
    # CLIP-score filter (DataComp's strongest baseline): any checkpoint clip_model.formats.load_checkpoint reads
    # (our export, OpenAI's .pt, open_clip files and hub dirs, Hugging Face CLIPModel dirs), local or s3://
    # (read with the input's S3 options). None = off.
    clip_score_checkpoint: str | None = None
    # That checkpoint's MLP activation, quick_gelu or gelu (evaluate's `activation`): needed where it does not
    # record it (bare state dicts, open_clip epoch_N.pt without params.txt); None = what the checkpoint says.
    clip_score_activation: str | None = None
    min_clip_score: float = 0.28

    def __post_init__(self) -> None:
        if self.min_caption_chars < 0 or self.max_caption_chars < self.min_caption_chars:
            raise ValueError(f"filter caption chars range [{self.min_caption_chars}, {self.max_caption_chars}] is empty")
        if self.min_words < 0 or self.max_words < self.min_words:
            raise ValueError(f"filter word range [{self.min_words}, {self.max_words}] is empty")
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"filter max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_per_query is not None and self.max_per_query < 1:
            raise ValueError(f"filter max_per_query must be >= 1 or null, got {self.max_per_query}")
        if not 0.0 <= self.min_language_prob <= 1.0:
            raise ValueError(f"filter min_language_prob must be in [0, 1], got {self.min_language_prob}")
        if self.clip_score_activation not in (None, "quick_gelu", "gelu"):
            raise ValueError(f"filter clip_score_activation must be quick_gelu, gelu or null, "
                             f"got {self.clip_score_activation!r}")


@functools.lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    lang, prob = _language_identifier().classify(text)
    return lang, float(prob)


def caption_reason(caption: str | None, cfg: FilterConfig) -> str:
    if caption is None:
        return "caption_missing"
    text = caption.strip()
    if len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    words = len(text.split())
    if words < cfg.min_words:
        return "caption_too_few_words"
    if words > cfg.max_words:
        return "caption_too_many_words"
    if cfg.languages and len(text) >= cfg.language_min_chars:
        lang, prob = detect_language(text)
        if lang not in cfg.languages and prob >= cfg.min_language_prob:
            return "caption_language"
    return ""


def image_reason(width: int, height: int, original_width: int, original_height: int, cfg: FilterConfig) -> str:
    if min(width, height) < cfg.min_image_side or min(original_width, original_height) < cfg.min_image_side:
        return "image_too_small"
    ow, oh = max(original_width, 1), max(original_height, 1)
    if max(ow / oh, oh / ow) > cfg.max_aspect_ratio:
        return "image_aspect_ratio"
    return ""


def row_reasons(table: pa.Table, cfg: FilterConfig) -> list[str]:
    """The first failing rule per row, in a fixed order: caption rules, then image rules."""
    cols = table.select(["caption", "width", "height", "original_width", "original_height"]).to_pydict()
    out = []
    for cap, w, h, ow, oh in zip(cols["caption"], cols["width"], cols["height"], cols["original_width"],
                                 cols["original_height"]):
        out.append(caption_reason(cap, cfg) or image_reason(w, h, ow, oh, cfg))
    return out


def query_cutoffs(keys_by_query: dict[str, list[str]], cap: int) -> dict[str, str]:
    """For each query over the cap: the largest key kept (rows keep iff key <= cutoff).

    Keys are hashes, so keeping the `cap` smallest keys is a deterministic uniform sample.
    """
    out = {}
    for query, keys in keys_by_query.items():
        if len(keys) > cap:
            out[query] = sorted(keys)[cap - 1]
    return out


def over_query_cap(queries: list[str | None], keys: list[str], cutoffs: dict[str, str]) -> list[bool]:
    """Rows over their query's cut-off. A row without a query (None or "") is never over: it has no bucket."""
    return [bool(q) and q in cutoffs and k > cutoffs[q] for q, k in zip(queries, keys)]

