"""How captions and metadata entries are cut into tokens: the one definition both sides of a match use.

MetaCLIP (facebookresearch/MetaCLIP, metaclip/substr_matching.py) pads the text with spaces, wraps
, . ; : ? ! ` in spaces and looks for " entry " as a substring, so an entry matches only on word
boundaries ("cat" is not found in "category"). We do the same with two changes, applied alike to
entries and captions: text is NFKC-normalised and lowercased (MetaCLIP matches case-sensitively,
its entries keep Wikipedia's capitals), and whitespace runs collapse to one space, so that the
match is exactly "the entry's tokens occur as a contiguous run of the caption's tokens".
"""

from __future__ import annotations

import unicodedata

# MetaCLIP's list plus brackets and double quotes. Apostrophes and hyphens stay inside words
# ("don't", "t-shirt"), as in wordfreq's tokens.
WRAPPED_PUNCTUATION = ",.;:?!`\"()[]{}"
_WRAP = str.maketrans({c: f" {c} " for c in WRAPPED_PUNCTUATION} | {"\u2019": "'", "\u2018": "'"})


def normalize(text: str) -> str:
    """NFKC, lowercase, whitespace runs to one space, stripped: how an entry is stored."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def tokens(text: str) -> list[str]:
    """The normalised text split into words, with wrapped punctuation as tokens of its own."""
    return unicodedata.normalize("NFKC", text).lower().translate(_WRAP).split()


def spaced(text: str) -> str:
    """" tok1 tok2 ... ": the form the automaton holds (entries) and scans (captions)."""
    return f" {' '.join(tokens(text))} "


def is_word(token: str) -> bool:
    """A token holding a letter or a digit (not a lone punctuation mark)."""
    return any(c.isalnum() for c in token)
