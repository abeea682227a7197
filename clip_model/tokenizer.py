"""CLIP's byte-level BPE tokenizer, token-for-token equal to OpenAI's and open_clip's.

The text path is split in two on purpose:
- Cleaning (ftfy, HTML unescape twice, whitespace, lower-case) and pre-tokenisation (CLIP's regex)
  run in Python with the very libraries the reference uses (`ftfy`, `regex`), because exact parity is
  the requirement: Hugging Face `tokenizers` has no ftfy, and its Oniguruma regex has its own
  Unicode tables and case folding, which matter here (e.g. "'ſ" matches CLIP's `'s` alternative
  under the `regex` module's IGNORECASE). Parity should not rest on two regex engines agreeing.
- The BPE merges (and training, via `BpeTrainer`) run in HF `tokenizers` on the pre-split words.
  This is exact because OpenAI's merges are consistent (no merge uses a token made by a later
  merge), so HF's one-pair-at-a-time priority queue makes the same merges as OpenAI's loop.

Vocabulary layout (OpenAI's): 256 byte symbols, the same 256 + "</w>", one token per merge in merge
order, then <start_of_text>, <end_of_text>. A caption containing the literal text "<start_of_text>" or
"<end_of_text>" gets the special id there, as open_clip does (OpenAI's does the same for its own
spelling "<|startoftext|>").
"""

from __future__ import annotations

import gzip
import html
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ftfy
import numpy as np
import regex
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    import torch

SOT = "<start_of_text>"
EOT = "<end_of_text>"
EOW = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
# OpenAI reads merges[1 : 49152 - 256 - 2 + 1] of its file: 256 byte symbols + 48,894 merges + 2
# specials = the paper's 49,152; the 256 end-of-word byte symbols bring it to 49,408 ids.
OPENAI_NUM_MERGES = 49152 - 256 - 2
DEFAULT_OPENAI_BPE = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SAVE_FORMAT = "clip_model.ClipTokenizer"
SAVE_VERSION = 1
# Distinct words memoised per tokenizer (~100 bytes each); caption vocabularies are Zipfian, so the
# first 200k words seen cover nearly all later ones.
WORD_CACHE_SIZE = 200_000

# CLIP's pre-tokeniser; must stay byte-identical to open_clip's (special tokens first, IGNORECASE).
_PRE_TOKENIZE = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)
# Text made only of these characters is left unchanged by ftfy.fix_text and html.unescape (no
# entity, no control or terminal-escape character, nothing non-ASCII to re-decode or normalise;
# \r line breaks only become other whitespace). ftfy costs ~100-200 us per caption, so skipping it on
# plain-ASCII captions is most of this tokenizer's speed. tests/test_tokenizer.py checks the claim.
_FTFY_INVARIANT = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table. Its insertion order (printable bytes
    first, then the rest) is the order of the vocabulary's first 256 ids and must not change.

    Written out because `tokenizers.pre_tokenizers.ByteLevel.alphabet()` returns the same characters
    unordered.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def clean_text(text: str) -> str:
    """OpenAI's basic_clean (ftfy, HTML unescape twice, strip) then whitespace collapse and lower-case."""
    if not _FTFY_INVARIANT.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split and OpenAI's regex \s differ only on U+001C..U+001F, which ftfy deletes.
    return " ".join(text.split()).lower()


def pre_tokenize(text: str) -> list[str]:
    """The words BPE runs on, for raw (uncleaned) text."""
    return _PRE_TOKENIZE.findall(clean_text(text))


def _base_symbols() -> list[str]:
    chars = list(_BYTE_ENCODER.values())
    return chars + [c + EOW for c in chars]


def _check_merges(merges: Sequence[tuple[str, str]]) -> None:
    """Each merge may only join symbols that exist before it. Besides catching corrupt files, this is
    what makes HF's merge order equal OpenAI's (see the module docstring)."""
    known = set(_base_symbols())
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or not all(isinstance(s, str) and s for s in merge):
            raise ValueError(f"merge {rank} must be a pair of non-empty strings, got {merge!r}")
        for symbol in merge:
            if symbol not in known:
                raise ValueError(f"merge {rank} {merge!r} uses {symbol!r}, which no earlier merge or byte symbol makes")
        known.add(merge[0] + merge[1])


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")


class ClipTokenizer:
    """Callable like open_clip's SimpleTokenizer: `tok(texts) -> LongTensor[N, context_length]`.

    Picklable (state is the merge list; the word memo is rebuilt) and safe to share between threads:
    the only mutable state is an add-only word memo, and HF's Tokenizer is thread-safe.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        merges = [tuple(m) for m in merges]
        _check_merges(merges)
        _check_context_length(context_length)
        self._merges: list[tuple[str, str]] = merges
        self.context_length = context_length
        self._id_to_token = _base_symbols() + [a + b for a, b in merges] + [SOT, EOT]
        # Like OpenAI's dict(zip(vocab, ids)): if two merges spell the same token the later id wins.
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        self._hf = self._build_hf()
        self._word_cache: dict[str, list[int]] = {}

    def _build_hf(self) -> Tokenizer:
        bpe = models.BPE(vocab=self._token_to_id, merges=self._merges, end_of_word_suffix=EOW, fuse_unk=False)
        hf = Tokenizer(bpe)
        # Words arrive pre-split; ByteLevel only maps their UTF-8 bytes to the table above.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # Our regex emits a special-token literal as a word of its own; HF then maps it to its id.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
        return hf

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_openai_bpe(
        cls, path: str | os.PathLike[str] | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> ClipTokenizer:
        """Load OpenAI's `bpe_simple_vocab_16e6.txt.gz` (default: the copy in clip_model/assets)."""
        path = Path(path) if path is not None else DEFAULT_OPENAI_BPE
        lines = _read_gzip_lines(path)
        if "#version" not in lines[0]:
            raise ValueError(f"{path}: not a BPE merges file (first line {lines[0][:60]!r} has no '#version' header)")
        body = lines[1:OPENAI_NUM_MERGES + 1]
        if len(body) < OPENAI_NUM_MERGES:
            raise ValueError(f"{path}: has {len(body)} merges, OpenAI's vocabulary needs {OPENAI_NUM_MERGES}")
        merges = []
        for lineno, line in enumerate(body, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {lineno} is not a merge of two symbols: {line[:60]!r}")
            merges.append((parts[0], parts[1]))
        try:
            return cls(merges, context_length)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        num_merges: int,
        *,
        min_frequency: int = 2,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        show_progress: bool = False,
    ) -> ClipTokenizer:
        """Learn up to `num_merges` merges on `texts` (OpenAI's vocabulary has OPENAI_NUM_MERGES = 48,894).

        Same cleaning and pre-tokenisation as encoding. Fewer merges result when no pair occurs at
        least `min_frequency` times any more.
        """
        if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
            raise ValueError(f"num_merges must be an int >= 0, got {num_merges!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        _check_context_length(context_length)
        if num_merges == 0:
            return cls([], context_length)
        hf = Tokenizer(models.BPE(end_of_word_suffix=EOW))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        trainer = trainers.BpeTrainer(
            # The alphabet takes at most 512 entries (bytes, bytes + </w>), so this leaves room for
            # num_merges merges; HF learns them greedily, so the first num_merges are the answer.
            vocab_size=2 * 256 + num_merges,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=[],
            initial_alphabet=list(_BYTE_ENCODER.values()),
            end_of_word_suffix=EOW,
        )
        hf.train_from_iterator(_training_words(texts), trainer=trainer)
        merges = _merges_from_hf_json(hf.to_str())
        return cls(merges[:num_merges], context_length)

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """One JSON file: the merges plus what is needed to check and rebuild the vocabulary."""
        path = Path(path)
        doc = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "context_length": self.context_length,
            "special_tokens": [SOT, EOT],
            "vocab_size": self.vocab_size,
            # A symbol never contains a space (space is byte-mapped to "Ġ"), so "a b" is unambiguous.
            "merges": [f"{a} {b}" for a, b in self._merges],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)  # readers never see a half-written file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a saved ClipTokenizer (invalid JSON: {e})") from e
        if not isinstance(doc, dict) or doc.get("format") != SAVE_FORMAT:
            raise ValueError(f"{path}: not a saved ClipTokenizer (format field is not {SAVE_FORMAT!r})")
        if doc.get("version") != SAVE_VERSION:
            raise ValueError(f"{path}: unsupported ClipTokenizer file version {doc.get('version')!r}")
        if doc.get("special_tokens") != [SOT, EOT]:
            raise ValueError(f"{path}: special_tokens {doc.get('special_tokens')!r}, expected {[SOT, EOT]!r}")
        try:
            merges = [tuple(m.split(" ")) for m in doc["merges"]]
            tok = cls(merges, doc["context_length"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt ClipTokenizer file: {e!r}") from e
        if doc.get("vocab_size") != tok.vocab_size:
            raise ValueError(
                f"{path}: vocab_size {doc.get('vocab_size')!r} does not match its merges ({tok.vocab_size})"
            )
        return tok

    def __getstate__(self) -> dict[str, Any]:
        return {"merges": self._merges, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["merges"], state["context_length"])  # type: ignore[misc]

    # --- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def sot_token_id(self) -> int:
        return len(self._id_to_token) - 2

    @property
    def eot_token_id(self) -> int:
        return len(self._id_to_token) - 1

    @property
    def merges(self) -> list[tuple[str, str]]:
        return list(self._merges)

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        words = [pre_tokenize(t) for t in texts]
        ids = self._word_ids({w for ws in words for w in ws})
        return [[i for w in ws for i in ids[w]] for ws in words]

    def _word_ids(self, words: set[str]) -> dict[str, list[int]]:
        """BPE ids per distinct word, memoised: a dict hit costs far less than HF's per-Encoding overhead
        (~5x faster end to end), and caption words repeat. The memo only grows (up to a cap) and is
        never cleared, so concurrent threads only ever see complete entries."""
        cache = self._word_cache
        found = {w: cache[w] for w in words if w in cache}
        missing = [w for w in words if w not in found]
        if missing:
            encoded = self._hf.encode_batch([[w] for w in missing], is_pretokenized=True, add_special_tokens=False)
            for w, enc in zip(missing, encoded):
                found[w] = enc.ids
                if len(cache) < WORD_CACHE_SIZE:
                    cache[w] = enc.ids
        return found

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, context_length]: sot, tokens, eot, zeros; too long -> cut, last kept as eot."""
        import torch

        return torch.from_numpy(self.token_array(texts, context_length))

    def token_array(self, texts: str | Iterable[str], context_length: int | None = None) -> np.ndarray:
        """What calling the tokenizer gives, as an int64 NumPy array (no torch import: data loaders use it)."""
        context_length = self.context_length if context_length is None else context_length
        _check_context_length(context_length)
        texts = _as_text_list(texts)
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for n, ids in enumerate(self.encode_batch(texts)):
            row = [self.sot_token_id, *ids[: context_length - 2], self.eot_token_id]
            out[n, :len(row)] = row
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """OpenAI's decode: every word ends in a space; invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "reshape") and hasattr(ids, "tolist"):  # a torch tensor or a NumPy array
            ids = ids.reshape(-1).tolist()
        pieces = []
        for i in ids:
            if not 0 <= int(i) < len(self._id_to_token):
                raise ValueError(f"token id {i!r} out of range for a vocabulary of {self.vocab_size}")
            pieces.append(self._id_to_token[int(i)])
        # Special tokens are printable ASCII, so they pass through the byte table unchanged.
        data = bytes(_BYTE_DECODER[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(EOW, " ")

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _as_text_list(texts: str | Iterable[str]) -> list[str]:
    # Any iterable of str: Ray Data batches arrive as numpy object arrays or pandas Series.
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def _read_gzip_lines(path: Path) -> list[str]:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"BPE merges file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: merges are not valid UTF-8 ({e})") from e


def _training_words(texts: Iterable[str], batch: int = 4096) -> Iterator[list[str]]:
    """Pre-split words in batches (HF takes lists); special-token literals are not learned from."""
    buf: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text {i} must be a str, got {type(text).__name__}")
        buf.extend(w for w in pre_tokenize(text) if w not in (SOT, EOT))
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


def _merges_from_hf_json(serialized: str) -> list[tuple[str, str]]:
    # tokenizers >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings.
    raw = json.loads(serialized)["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in raw]
