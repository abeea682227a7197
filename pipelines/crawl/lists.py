"""Read one URL + caption list file into LIST_SCHEMA tables: plain Python and pyarrow, no Ray.

Formats are img2dataset's: Parquet, CSV, TSV and JSONL, each optionally gzipped, on any pyarrow FileSystem
(local, S3, ...). `iter_list_rows` streams one file (the crawl runs it in one Ray task per input file) and
never lets a row kill the file: every input row comes out exactly once, in file order, good (error null)
or with one reject reason. Bad rows are data, and at web scale a list always holds some.

Reject reasons (the `error` column):

    input_parse_error     a JSON line that does not parse (deep nesting included) or is not an object; a
                          CSV/TSV record with the wrong number of fields (or one Python's csv refuses); a
                          record over MAX_RECORD_BYTES (see below)
    url_missing           the URL is null, absent, empty or only whitespace
    url_not_text          the URL is a number, bool, list, dict, ... (any non-text value or column type)
    bad_url_encoding      the URL holds invalid UTF-8 or a lone surrogate (e.g. a JSON "\\ud800" escape)
    caption_missing       the caption is null, absent, empty or only whitespace (rejected here, before the
                          crawl spends a fetch on a pair no filter would keep)
    caption_not_text      the caption is not text. Numbers are rejected too, never str()-ed: a numeric caption
                          (a Parquet int/float column, a JSON number) is almost always the wrong column (a
                          similarity score, an id), and "0.3127" is no caption. (CSV/TSV fields are text:
                          "123" there is a caption.)
    invalid_utf8_caption  the caption holds invalid UTF-8 or a lone surrogate
    input_unreadable      the rest of a file could not be read (corrupt or truncated gzip, corrupt Parquet
                          footer or row group, I/O error): ONE row stands for everything from that point on,
                          every row read before it is kept, and the file ends there

URL reasons are checked before caption reasons. Queries that are not text become "" (an integer query is
str()-ed); they never reject a row. URLs are stripped of leading/trailing whitespace (str.strip()) and
not otherwise validated (the fetcher does that); captions are kept verbatim.

Columns of each row:

    key      good rows: schema.sample_key(url, caption). Rejects: 24 hex digits of sha256 over a 0xff prefix
             (sample_key hashes UTF-8, which never holds 0xff, so no clash with a good key) and the row's raw
             bytes (the JSON line; the CSV record; the url and caption values): stable across runs.
    url      valid UTF-8; bad bytes and lone surrogates of a bad_url_encoding row become U+FFFD; "" when
             the URL is missing or not text, or the record did not parse
    caption  the caption text; null when the row is rejected for its caption (or the record did not parse)
    query    the query column's text, "" when there is none or it is not text
    source   "<path>:<n>": JSONL n = physical line number (1-based); CSV/TSV n = record number with the
             header as record 1 (the line number unless values hold newlines or the file has blank lines);
             Parquet n = row number (1-based). For input_unreadable, n is the first line/record/row not read
             and the detail says where ("from byte N" of the decompressed stream, or "rows N..M of M unread").
    error    null, or one of REASONS
    detail   "" for good rows; a short (<= 200 characters) human explanation for rejects

Format notes. Blank lines are not rows: in JSONL an empty or ASCII-whitespace-only line, in CSV/TSV an empty
line (as every CSV parser reads them); a skipped line still counts in the line numbers. A UTF-8 BOM at the
start of a file is skipped; LF and CRLF (and in CSV/TSV a bare CR) end lines. Gzip is detected from the magic
bytes, whatever the file is named (a .gz name alone does not make a file gzip), and read with Python's gzip,
which hands over every byte before a truncation. A gzipped Parquet file is decompressed to a local temporary
file first (Parquet needs random access to its footer); plain Parquet is read row group by row group.
TSV uses the same quoting dialect as CSV (double quotes, doubled to escape), as img2dataset (pandas) does.
No record is ever buffered beyond MAX_RECORD_BYTES: a longer JSON line is an input_parse_error, and so is a
CSV/TSV record that has no line end within it.

Speed: Parquet and CSV/TSV batches are checked column-wise (pyarrow's UTF-8 validation of the binary column,
a vectorised strip and null/blank test); only the key (one sha256 per row) is per-row Python, plus the
per-row path for the few rows that are null, blank or invalid (and for every row of a non-text column).
JSONL is one json scan per line.

CSV/TSV are cut into record-aligned chunks (at a newline where the count of quote characters since the chunk
start is even) and each chunk is parsed by pyarrow's CSV reader, every column as binary (no UTF-8
validation in the parser), with an invalid_row_handler turning a record with the wrong field count into an
input_parse_error row. pyarrow decodes such a record's text as strict UTF-8 before calling the handler and,
if that fails, prints an "Exception ignored" traceback and fails the whole parse. So a chunk holding invalid
UTF-8 is parsed without a handler (fine unless it also holds a bad record), and a chunk that pyarrow cannot
parse is split into records by Python's csv module instead (the same dialect; tested against the same
expectations), whose values then take the same column path.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import json.scanner
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs  # noqa: F401  (pa.fs in the signatures)
import pyarrow.parquet as pq

from pipelines.core.schema import sample_key

FORMATS = ("parquet", "csv", "tsv", "jsonl")

LIST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("query", pa.string()),
    ("source", pa.string()),
    ("error", pa.string()),
    ("detail", pa.string()),
])

REASONS = ("input_parse_error", "url_missing", "url_not_text", "bad_url_encoding", "caption_missing",
           "caption_not_text", "invalid_utf8_caption", "input_unreadable")

# A JSON line or CSV record longer than this (decompressed) is an input_parse_error, not buffered.
MAX_RECORD_BYTES = 32 << 20
# Decompressed bytes per read, and the size a CSV/TSV chunk grows to before it is cut at a record boundary.
_READ_BYTES = 1 << 20
_CHUNK_BYTES = 4 << 20
_FIRST_BYTES = 64 << 10
_DETAIL_CHARS = 200

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
# Exactly the characters str.strip() / str.isspace() treat as whitespace, for pc.utf8_trim (tested).
_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
               "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class InputConfig:
    # Files or directories of URL lists (local paths or s3:// URIs).
    paths: list[str] = field(default_factory=list)
    # "auto" picks by extension (.parquet, .csv, .tsv, .jsonl/.json, each optionally + .gz).
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    # Column names; img2dataset's defaults.
    url_col: str = "url"
    caption_col: str = "caption"
    # Optional column naming the metadata query / source (used by the per-query cap). None = none.
    query_col: str | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("input.paths is empty: give at least one URL list file or directory")


def detect_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    fmt = {"parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}.get(ext)
    if fmt is None:
        raise ValueError(f"cannot tell the format of URL list {path!r} from its extension; set input.format "
                         f"to one of {FORMATS}")
    return fmt


def _wanted(cfg: InputConfig) -> list[str]:
    return [cfg.url_col, cfg.caption_col] + ([cfg.query_col] if cfg.query_col else [])


def _require_columns(cfg: InputConfig, path: str, columns: list[str]) -> None:
    missing = [c for c in _wanted(cfg) if c not in columns]
    if missing:
        raise ValueError(f"URL list {path} has no column(s) {missing}; its columns are {columns}. "
                         f"Set input.url_col / input.caption_col / input.query_col.")


def check_columns(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, fmt: str) -> None:
    """Fail on the driver, naming the file, before any task starts: one ValueError for missing columns.

    JSONL rows are checked per line (a line without the URL is a url_missing row). A file whose header or
    footer cannot be read passes: its task reports it as an input_unreadable row. A missing file raises.
    """
    if fmt == "parquet":
        with filesystem.open_input_file(path) as f:
            try:
                if f.read(2) == _GZIP_MAGIC:
                    return  # the footer is at the end of the decompressed stream: the task checks it
                f.seek(0)
                columns = pq.read_schema(f).names
            except Exception:  # noqa: BLE001 - unreadable data is the task's input_unreadable row
                return
    elif fmt in ("csv", "tsv"):
        with filesystem.open_input_stream(path, compression=None) as raw:
            try:
                chunks = _chunks(_decompressed(raw), b'"')
                columns = _csv_header(chunks, "\t" if fmt == "tsv" else ",")[0]
            except Exception:  # noqa: BLE001
                return
        if columns is None:
            return  # an empty file: no rows, nothing to check
    else:
        return
    _require_columns(cfg, path, columns)


# ---------------------------------------------------------------------------------------------------------
# One value, one row


class _Absent:
    """A JSON object without the field (as opposed to a JSON null)."""

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()
_OK, _MISSING, _NOT_TEXT, _BAD = 0, 1, 2, 3


def _clean(s: str) -> str:
    """Valid UTF-8, at most _DETAIL_CHARS characters (for details and sources)."""
    return _SURROGATE.sub("\ufffd", s[:_DETAIL_CHARS])


def _type_name(v: Any) -> str:
    if isinstance(v, _Unconvertible):
        return v.type_name
    return "null" if v is None else type(v).__name__


def _value(v: Any) -> tuple[int, str | None, str]:
    """-> (kind, text, detail). text is the str for _OK, the U+FFFD-repaired str for _BAD, else None."""
    t = type(v)
    if t is str:
        m = _SURROGATE.search(v)
        if m is None:
            return _OK, v, ""
        return _BAD, _SURROGATE.sub("\ufffd", v), f"invalid UTF-8 or lone surrogate U+{ord(m.group()):04X} " \
                                                    f"at character {m.start()}"
    if t is bytes:
        try:
            return _OK, v.decode("utf-8"), ""
        except UnicodeDecodeError as err:
            return _BAD, v.decode("utf-8", "replace"), f"invalid UTF-8: {err.reason} at byte {err.start}"
    if v is None:
        return _MISSING, None, "is null"
    if v is _ABSENT:
        return _MISSING, None, "field is absent"
    return _NOT_TEXT, None, f"is {_type_name(v)}, not text"


def _query_text(q: Any) -> str:
    t = type(q)
    if t is str:
        return q if q.isascii() or _SURROGATE.search(q) is None else ""
    if t is bytes:
        try:
            return q.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    if t is int:
        return str(q)
    return ""


def _classify(u: Any, c: Any) -> tuple[str, str | None, str | None, str]:
    """The slow path for one row: -> (url, caption, error, detail); error None = good."""
    ku, url, du = _value(u)
    if url is not None:
        url = url.strip()
        if not url and ku == _OK:
            ku, du = _MISSING, "is empty"
    kc, cap, dc = _value(c)
    if kc == _OK and (not cap or cap.isspace()):
        kc, dc = _MISSING, "is empty"
    out_url = url if ku in (_OK, _BAD) else ""
    out_cap = cap if kc == _OK else None
    if ku == _MISSING:
        return out_url, out_cap, "url_missing", f"url {du}"
    if ku == _NOT_TEXT:
        return out_url, out_cap, "url_not_text", f"url {du}"
    if ku == _BAD:
        return out_url, out_cap, "bad_url_encoding", _clean(f"url: {du}")
    if kc == _MISSING:
        return out_url, None, "caption_missing", f"caption {dc}"
    if kc == _NOT_TEXT:
        return out_url, None, "caption_not_text", f"caption {dc}"
    if kc == _BAD:
        return out_url, None, "invalid_utf8_caption", _clean(f"caption: {dc}")
    return out_url, out_cap, None, ""


def _raw(v: Any) -> bytes:
    """The raw bytes of one value, tagged by kind, for a reject's key."""
    t = type(v)
    if t is bytes:
        return b"b" + v
    if t is str:
        return b"s" + v.encode("utf-8", "surrogatepass")
    if v is None:
        return b"n"
    if v is _ABSENT:
        return b"a"
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001 - a value too deep to repr still needs a key
        text = type(v).__name__
    return b"o" + text.encode("utf-8", "surrogatepass")


def _reject_key(*parts: bytes) -> str:
    """sample_key hashes UTF-8, which never holds 0xff: this prefix keeps reject keys apart from good keys."""
    h = hashlib.sha256(b"\xffreject")
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:24]


class _Rows:
    """Output rows built one at a time (the per-row paths), flushed as LIST_SCHEMA tables.

    Good rows append to keys/urls/caps/queries/numbers only (the JSONL loop binds those appends once:
    table() empties the lists in place); rejects also note (index, error, detail).
    """

    def __init__(self, path_text: str) -> None:
        self.path_text = path_text
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.caps: list[str | None] = []
        self.queries: list[str] = []
        self.numbers: list[int] = []
        self.rejects: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, url: str, caption: str | None, query: str, number: int, error: str | None = None,
            detail: str = "") -> None:
        if error is not None:
            self.rejects.append((len(self.keys), error, detail))
        self.keys.append(key)
        self.urls.append(url)
        self.caps.append(caption)
        self.queries.append(query)
        self.numbers.append(number)

    def table(self) -> pa.Table:
        n = len(self.keys)
        if self.rejects:
            errors: list[str | None] = [None] * n
            details = [""] * n
            for i, error, detail in self.rejects:
                errors[i], details[i] = error, detail
            error_col, detail_col = pa.array(errors, pa.string()), pa.array(details, pa.string())
        else:
            error_col, detail_col = pa.nulls(n, pa.string()), pa.repeat(pa.scalar("", pa.string()), n)
        t = pa.Table.from_arrays([pa.array(self.keys, pa.string()), pa.array(self.urls, pa.string()),
                                  pa.array(self.caps, pa.string()), pa.array(self.queries, pa.string()),
                                  _sources(self.path_text, np.array(self.numbers, dtype=np.int64)), error_col,
                                  detail_col], schema=LIST_SCHEMA)
        for col in (self.keys, self.urls, self.caps, self.queries, self.numbers, self.rejects):
            col.clear()
        return t


def _exc_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _unreadable_row(path: str, number: int, err: BaseException, where: str) -> pa.Table:
    """The one row standing for the unread rest of a file; number = the first line/record/row not read."""
    rows = _Rows(_clean_path(path))
    rows.add(_reject_key(b"unreadable", path.encode("utf-8", "surrogatepass"), where.encode()), "", None, "",
             number, "input_unreadable", _clean(f"{where}: {_exc_text(err)}"))
    return rows.table()


# ---------------------------------------------------------------------------------------------------------
# Tabular batches (Parquet, CSV/TSV): a vectorised fast path, a per-row slow path


def _as_binary(arr: pa.Array) -> pa.Array | None:
    """Text-like columns as binary/large_binary without UTF-8 validation; None for other types."""
    t = arr.type
    if pa.types.is_dictionary(t):
        values = _as_binary(arr.dictionary)
        return None if values is None else values.take(arr.indices)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr
    if pa.types.is_string(t):
        return arr.view(pa.binary())
    if pa.types.is_large_string(t):
        return arr.view(pa.large_binary())
    if pa.types.is_fixed_size_binary(t) or pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        return arr.cast(pa.binary())  # casting *to* binary never validates
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.binary())
    return None


def _string_type(arr: pa.Array) -> pa.DataType:
    return pa.large_string() if pa.types.is_large_binary(arr.type) else pa.string()


def _py_values(arr: pa.Array) -> list:
    try:
        return arr.to_pylist()
    except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 nested in a list<string>, out-of-range dates
        out = []
        for i in range(len(arr)):
            try:
                out.append(arr[i].as_py())
            except Exception:  # noqa: BLE001
                out.append(_Unconvertible(str(arr.type)))
        return out


class _Unconvertible:
    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<unconvertible {self.type_name}>"


def _query_column(q: pa.Array | None, n: int) -> pa.Array:
    if q is None:
        return pa.repeat(pa.scalar("", pa.string()), n)
    b = _as_binary(q)
    if b is not None:
        try:
            return b.cast(_string_type(b)).fill_null("").cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return pa.array([_query_text(v) for v in b.to_pylist()], pa.string())
    if pa.types.is_integer(q.type):
        return pc.cast(q, pa.string()).fill_null("")
    return pa.repeat(pa.scalar("", pa.string()), n)


def _sources(path_text: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(path_text + ":"), pa.array(numbers).cast(pa.string()), "")


def _as_text(b: pa.Array) -> pa.Array:
    """A binary column as text, its invalid UTF-8 values as nulls: pyarrow validates the whole column at once
    and, only if that fails, Python finds the bad values (those are then patched row by row)."""
    text_type = _string_type(b)
    try:
        return b.cast(text_type)
    except pa.ArrowInvalid:
        pass
    bad = np.zeros(len(b), dtype=bool)
    for i, v in enumerate(b.to_pylist()):
        if v is not None and not v.isascii():
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    return pc.if_else(pa.array(bad), pa.scalar(None, b.type), b).cast(text_type)


def _validated(u: pa.Array | None, c: pa.Array | None) -> tuple[pa.Array, pa.Array, np.ndarray | None] | None:
    """(stripped urls, captions, rows to patch or None) as string arrays when both columns are text; rows to
    patch are those whose url or caption is null, blank or invalid UTF-8. None for a non-text column."""
    if u is None or c is None:
        return None
    try:  # pyarrow's UTF-8 validation rejects surrogates and overlongs as Python does (tested)
        us = pc.utf8_trim(_as_text(u), _WHITESPACE).cast(pa.string())
        cs = _as_text(c).cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a large_string batch over 2 GiB
        return None
    if not len(us):
        return us, cs, None
    missing = pc.or_(pc.fill_null(pc.equal(pc.binary_length(us), 0), True),
                     pc.fill_null(pc.equal(pc.binary_length(pc.utf8_trim(cs, _WHITESPACE)), 0), True))
    return us, cs, (missing.to_numpy(zero_copy_only=False) if pc.any(missing).as_py() else None)


def _tabular_table(path_text: str, url: pa.Array, caption: pa.Array, query: pa.Array | None,
                   numbers: np.ndarray) -> pa.Table:
    """LIST_SCHEMA rows for one batch of column values; numbers are the rows' source numbers.

    Vectorised when both columns are text (rows with a null, blank or invalid UTF-8 url or caption are then
    patched row by row); for other column types every row goes through _classify. Both give a row the same
    result (tested).
    """
    n = len(url)
    queries = _query_column(query, n)
    sources = _sources(path_text, numbers)
    u, c = _as_binary(url), _as_binary(caption)
    checked = _validated(u, c)
    if checked is not None:
        us, cs, missing = checked
        urls, caps = us.to_pylist(), cs.to_pylist()
        sha256 = hashlib.sha256  # == sample_key: validated text has no surrogates, so strict UTF-8 is its encoding
        keys = [sha256(f"{a}\x00{b}".encode()).hexdigest()[:24] for a, b in zip(urls, caps)]
        if missing is None:
            return pa.Table.from_arrays([pa.array(keys, pa.string()), us, cs, queries, sources,
                                         pa.nulls(n, pa.string()), pa.repeat(pa.scalar("", pa.string()), n)],
                                        schema=LIST_SCHEMA)
        errors: list[str | None] = [None] * n
        details = [""] * n
        for i in np.flatnonzero(missing).tolist():
            uv, cv = u[i].as_py(), c[i].as_py()
            urls[i], caps[i], errors[i], details[i] = _classify(uv, cv)
            keys[i] = sample_key(urls[i], caps[i]) if errors[i] is None else _reject_key(_raw(uv), _raw(cv))
    else:
        u_vals = _py_values(u if u is not None else url)
        c_vals = _py_values(c if c is not None else caption)
        keys, urls, caps, errors, details = [], [], [], [], []
        for uv, cv in zip(u_vals, c_vals):
            out_url, out_cap, error, detail = _classify(uv, cv)
            keys.append(sample_key(out_url, out_cap) if error is None else _reject_key(_raw(uv), _raw(cv)))
            urls.append(out_url)
            caps.append(out_cap)
            errors.append(error)
            details.append(detail)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(urls, pa.string()),
                                 pa.array(caps, pa.string()), queries, sources, pa.array(errors, pa.string()),
                                 pa.array(details, pa.string())], schema=LIST_SCHEMA)


def _sliced(table: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


# ---------------------------------------------------------------------------------------------------------
# Byte streams: gzip by magic bytes, record-aligned chunks


class _Unreadable(Exception):
    """The stream failed after `offset` decompressed bytes (everything before it was delivered)."""

    def __init__(self, err: BaseException, offset: int) -> None:
        super().__init__(str(err))
        self.err = err
        self.offset = offset


class _Prefixed:
    """A read()-only stream that first returns bytes already read (the sniffed magic)."""

    def __init__(self, head: bytes, f: Any) -> None:
        self.head = head
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n < 0 else self.head[:n]
            self.head = self.head[len(out):]
            rest = -1 if n < 0 else n - len(out)
            return out + self.f.read(rest) if rest else out
        return self.f.read(n)


def _decompressed(raw: Any) -> Callable[[int], bytes]:
    """read(n) over the decompressed bytes of `raw`: gzip when it starts with the gzip magic.

    Python's gzip returns every byte before a truncation or bad member (pyarrow's CompressedInputStream drops
    the block it was decoding), so the rows before the cut are kept.
    """
    state: dict[str, Any] = {}

    def read(n: int) -> bytes:
        if "read" not in state:
            head = raw.read(2)
            # read1: one decompression step per call. GzipFile.read(n) loops until n bytes and drops what it
            # gathered when a later step fails.
            state["read"] = (gzip.GzipFile(fileobj=_Prefixed(head, raw), mode="rb").read1 if head == _GZIP_MAGIC
                             else _Prefixed(head, raw).read)
        return state["read"](n)

    return read


def _safe_cut(buf: bytes, quote: bytes | None) -> int:
    """The end of the last whole record in buf (after a newline outside quotes), or -1."""
    i = buf.rfind(b"\n")
    if quote is None or i < 0:
        return i + 1 if i >= 0 else -1
    total = buf.count(quote)
    after, end = 0, len(buf)
    while i >= 0:
        after += buf.count(quote, i, end)
        if (total - after) % 2 == 0:
            return i + 1
        end, i = i, buf.rfind(b"\n", 0, i)
    return -1


def _chunks(read: Callable[[int], bytes], quote: bytes | None) -> Iterator[tuple[str, Any]]:
    """("data", bytes) chunks of whole records, in order, and ("long", (nbytes, sha256, head)) for a record
    over `cap` bytes (skipped to its next newline). A leading BOM is dropped. A read error first delivers
    the whole records already buffered, then raises _Unreadable. The first chunk is small (a CSV header
    costs one small read, e.g. in check_columns)."""
    target, cap = _CHUNK_BYTES, MAX_RECORD_BYTES
    buf = b""
    offset = 0  # decompressed bytes delivered (or skipped)
    first = True
    want = _FIRST_BYTES
    while True:
        try:
            data = read(want if len(buf) < want else _READ_BYTES)
        except Exception as err:  # noqa: BLE001 - gzip/I/O errors end the file, not the job
            cut = _safe_cut(buf, quote)
            if cut > 0:
                yield "data", buf[:cut]
                offset += cut
            raise _Unreadable(err, offset) from err
        buf += data
        if first and (len(buf) >= len(_BOM) or not data):
            first = False
            if buf.startswith(_BOM):
                buf = buf[len(_BOM):]
                offset += len(_BOM)
        if not data:
            if buf:
                yield "data", buf
            return
        if len(buf) < want:
            continue
        cut = _safe_cut(buf, quote)
        if cut <= 0 and len(buf) >= cap:
            cut = buf.rfind(b"\n") + 1  # no whole record within the cap: cut at any newline
            if cut <= 0:
                cut = buf.rfind(b"\r") + 1
        if cut > 0:
            yield "data", buf[:cut]
            offset += cut
            buf = buf[cut:]
            want = target
        elif len(buf) >= cap:  # one line longer than the cap: hash it on the fly up to its newline
            h, head, size = hashlib.sha256(b"\xfflong"), buf[:_DETAIL_CHARS], 0
            while True:
                i = buf.find(b"\n")
                part = buf if i < 0 else buf[:i]
                h.update(part)
                size += len(part)
                if i >= 0:
                    buf = buf[i + 1:]
                    break
                try:
                    buf = read(_READ_BYTES)
                except Exception as err:  # noqa: BLE001
                    raise _Unreadable(err, offset) from err
                if not buf:
                    break
            yield "long", (size, h.hexdigest()[:24], head)
            offset += size + 1


def _long_detail(size: int, head: bytes) -> str:
    return _clean(f"record of {size} bytes is longer than {MAX_RECORD_BYTES}: "
                  f"{head.decode('utf-8', 'replace')[:100]}")


# ---------------------------------------------------------------------------------------------------------
# The reader


def iter_list_rows(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, fmt: str,
                   batch_rows: int = 8192) -> Iterator[pa.Table]:
    """Stream one URL list file as LIST_SCHEMA tables of at most batch_rows rows, in file order.

    Nothing about a row raises: every input row comes out exactly once, good (error null) or rejected with a
    reason (see the module docstring). What raises is about the call: an unknown format, a missing file,
    a Parquet/CSV/TSV file without the configured columns (the ValueError of check_columns).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown URL list format {fmt!r}; expected one of {FORMATS}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if fmt == "parquet":
        yield from _parquet_rows(cfg, filesystem, path, batch_rows)
    elif fmt == "jsonl":
        yield from _jsonl_rows(cfg, filesystem, path, batch_rows)
    else:
        yield from _csv_rows(cfg, filesystem, path, "\t" if fmt == "tsv" else ",", batch_rows)


def _parquet_rows(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, batch_rows: int) -> Iterator[pa.Table]:
    path_text = _clean_path(path)
    with filesystem.open_input_file(path) as f, contextlib.ExitStack() as stack:
        try:
            source: Any = f
            if f.read(2) == _GZIP_MAGIC:
                f.seek(0)
                source = stack.enter_context(tempfile.TemporaryFile())
                shutil.copyfileobj(gzip.GzipFile(fileobj=f, mode="rb"), source, _READ_BYTES)
                source.seek(0)
            else:
                f.seek(0)
            pfile = pq.ParquetFile(source)
            columns = pfile.schema_arrow.names
            total = pfile.metadata.num_rows
        except Exception as err:  # noqa: BLE001
            yield _unreadable_row(path, 1, err, "the whole file")
            return
        _require_columns(cfg, path, columns)
        wanted = list(dict.fromkeys(_wanted(cfg)))
        done = 0
        # Row group by row group, so a batch never spans two: a corrupt group loses only rows from it on.
        batches = (batch for group in range(pfile.num_row_groups)
                   for batch in pfile.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted,
                                                   use_threads=False))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - a corrupt row group ends the file
                yield _unreadable_row(path, done + 1, err, f"rows {done + 1}..{total} of {total} unread")
                return
            n = batch.num_rows
            if n:
                names = batch.schema.names
                col = lambda name: batch.column(names.index(name))  # noqa: E731
                yield _tabular_table(path_text, col(cfg.url_col), col(cfg.caption_col),
                                     col(cfg.query_col) if cfg.query_col else None,
                                     np.arange(done + 1, done + n + 1, dtype=np.int64))
            done += n


def _clean_path(path: str) -> str:
    return _SURROGATE.sub("\ufffd", path)


# --- JSONL


def _jsonl_rows(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, batch_rows: int) -> Iterator[pa.Table]:
    ucol, ccol, qcol = cfg.url_col, cfg.caption_col, cfg.query_col
    scan = json.scanner.c_make_scanner(json.JSONDecoder()) if json.scanner.c_make_scanner else None
    sha256 = hashlib.sha256
    rows = _Rows(_clean_path(path))
    # The good-row path appends straight to the columns (rows.table() empties them in place).
    row_keys = rows.keys
    key_add, url_add, cap_add, query_add, number_add = (rows.keys.append, rows.urls.append, rows.caps.append,
                                                        rows.queries.append, rows.numbers.append)
    lineno = 0
    cap = MAX_RECORD_BYTES
    with filesystem.open_input_stream(path, compression=None) as raw:
        try:
            for kind, payload in _chunks(_decompressed(raw), None):
                if kind == "long":
                    if len(row_keys) >= batch_rows:
                        yield rows.table()
                    size, digest, head = payload
                    lineno += 1
                    rows.add(digest, "", None, "", lineno, "input_parse_error", _long_detail(size, head))
                    continue
                lines = payload.split(b"\n")
                if not lines[-1]:
                    lines.pop()
                for line in lines:
                    lineno += 1
                    if not line or line.isspace():
                        continue  # blank lines are not rows
                    if len(row_keys) >= batch_rows:
                        yield rows.table()
                    if line[-1] == 13:  # CRLF
                        line = line[:-1]
                    if len(line) > cap:
                        rows.add(_reject_key(b"line", line), "", None, "", lineno, "input_parse_error",
                                 _long_detail(len(line), line[:_DETAIL_CHARS]))
                        continue
                    # Invalid UTF-8 inside a string becomes lone surrogates there (so a url/caption reason);
                    # elsewhere it is a JSON syntax error.
                    text = line.decode("utf-8", "surrogateescape")
                    try:  # json.loads minus its two regex calls; anything unusual goes to json.loads itself
                        obj, end = scan(text, 0)
                    except Exception:  # noqa: BLE001
                        obj, end = None, -1
                    if end != len(text) or type(obj) is not dict:
                        try:
                            obj = json.loads(text)
                        except (ValueError, RecursionError) as err:
                            rows.add(_reject_key(b"line", line), "", None, "", lineno, "input_parse_error",
                                     _clean(f"{type(err).__name__}: {err}: {text[:80]}"))
                            continue
                        if type(obj) is not dict:
                            rows.add(_reject_key(b"line", line), "", None, "", lineno, "input_parse_error",
                                     _clean(f"a JSON {_type_name(obj)}, not an object: {text[:80]}"))
                            continue
                    u = obj.get(ucol, _ABSENT)
                    c = obj.get(ccol, _ABSENT)
                    q = obj.get(qcol, "") if qcol else ""
                    if type(u) is str and type(c) is str and c and not c.isspace():
                        u = u.strip()
                        try:
                            kb = f"{u}\x00{c}".encode() if u else None
                        except UnicodeEncodeError:  # a lone surrogate: the slow path names it
                            kb = None
                        if kb is not None:
                            key_add(sha256(kb).hexdigest()[:24])  # == sample_key(u, c)
                            url_add(u)
                            cap_add(c)
                            query_add(q if type(q) is str and q.isascii() else _query_text(q))
                            number_add(lineno)
                            continue
                    out_url, out_cap, error, detail = _classify(obj.get(ucol, _ABSENT), obj.get(ccol, _ABSENT))
                    rows.add(sample_key(out_url, out_cap) if error is None else _reject_key(b"line", line),
                             out_url, out_cap, _query_text(q), lineno, error, detail)
        except _Unreadable as err:
            if len(rows) >= batch_rows:
                yield rows.table()
            rows.add(_reject_key(b"unreadable", path.encode("utf-8", "surrogatepass"), str(err.offset).encode()),
                     "", None, "", lineno + 1, "input_unreadable",
                     _clean(f"from byte {err.offset}: {_exc_text(err.err)}"))
    if len(rows):
        yield rows.table()


# --- CSV / TSV


def _csv_header(chunks: Iterator[tuple[str, Any]], delimiter: str) -> tuple[list[str] | None, bytes]:
    """The first record's fields (None for a file without one) and the rest of the chunk it came in."""
    for kind, payload in chunks:
        if kind == "long":
            return [], b""  # a header over the cap: no column can match
        text = payload.decode("utf-8", "surrogateescape")
        buf = io.StringIO(text, newline="")
        reader = csv.reader(buf, delimiter=delimiter)
        try:
            for row in reader:
                if row:
                    return row, text[buf.tell():].encode("utf-8", "surrogateescape")
        except csv.Error:
            return [], b""
    return None, b""


def _csv_rows(cfg: InputConfig, filesystem: pa.fs.FileSystem, path: str, delimiter: str,
              batch_rows: int) -> Iterator[pa.Table]:
    path_text = _clean_path(path)
    record = 1  # the header's record number
    with filesystem.open_input_stream(path, compression=None) as raw:
        chunks = _chunks(_decompressed(raw), b'"')
        try:
            header, rest = _csv_header(chunks, delimiter)
        except _Unreadable as err:
            yield _unreadable_row(path, 1, err.err, f"from byte {err.offset}")
            return
        if header is None:
            return  # an empty file holds no rows
        _require_columns(cfg, path, header)
        parser = _CsvChunkParser(cfg, header, delimiter, path_text)
        try:
            for kind, payload in _chain_rest(rest, chunks):
                if kind == "long":
                    size, digest, head = payload
                    record += 1
                    rows = _Rows(path_text)
                    rows.add(digest, "", None, "", record, "input_parse_error", _long_detail(size, head))
                    yield rows.table()
                    continue
                table, n_records = parser.parse(payload, record)
                record += n_records
                yield from _sliced(table, batch_rows)
        except _Unreadable as err:
            yield _unreadable_row(path, record + 1, err.err, f"from byte {err.offset}")


def _chain_rest(rest: bytes, chunks: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    if rest:
        yield "data", rest
    yield from chunks


class _CsvChunkParser:
    """Parses one record-aligned chunk (no header) into LIST_SCHEMA rows, in record order."""

    def __init__(self, cfg: InputConfig, header: list[str], delimiter: str, path_text: str) -> None:
        self.ncols = len(header)
        self.delimiter = delimiter
        self.path_text = path_text
        self.idx = [header.index(cfg.url_col), header.index(cfg.caption_col),
                    header.index(cfg.query_col) if cfg.query_col else None]
        self.names = [f"c{i}" for i in range(self.ncols)]
        keep = sorted({i for i in self.idx if i is not None})
        self.convert = pacsv.ConvertOptions(column_types={self.names[i]: pa.binary() for i in keep},
                                            include_columns=[self.names[i] for i in keep])

    def parse(self, chunk: bytes, before: int) -> tuple[pa.Table, int]:
        """-> (rows, number of records in the chunk); `before` is the last record number before it."""
        try:
            chunk.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        try:
            # pyarrow decodes a bad record's text strictly before it calls the handler, and on failure prints
            # an "Exception ignored" traceback and fails the parse. So a chunk with invalid UTF-8 is first tried
            # without a handler: it parses unless it also holds a bad record, and then Python's csv takes it.
            return self._arrow(chunk, before, handle_invalid=valid)
        except Exception:  # noqa: BLE001
            return self._python(chunk, before)

    def _arrow(self, chunk: bytes, before: int, handle_invalid: bool) -> tuple[pa.Table, int]:
        invalid: list[tuple[int, str, int]] = []

        def handler(row: pacsv.InvalidRow) -> str:
            invalid.append((row.number, row.text, row.actual_columns))
            return "skip"

        table = pacsv.read_csv(
            pa.py_buffer(chunk),
            read_options=pacsv.ReadOptions(column_names=self.names, use_threads=False, block_size=len(chunk) + 1),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True,
                                             invalid_row_handler=handler if handle_invalid else None),
            convert_options=self.convert)
        n_good = table.num_rows
        total = n_good + len(invalid)
        if any(number is None for number, _, _ in invalid):
            raise ValueError("pyarrow did not number an invalid row")  # -> the Python parser
        bad_numbers = np.array([number for number, _, _ in invalid], dtype=np.int64)
        if invalid and (len(set(bad_numbers.tolist())) != len(invalid) or bad_numbers.min() < 1
                        or bad_numbers.max() > total):
            raise ValueError("cannot place the invalid rows")  # -> the Python parser
        numbers = np.setdiff1d(np.arange(1, total + 1, dtype=np.int64), bad_numbers) if invalid else \
            np.arange(1, total + 1, dtype=np.int64)
        col = lambda i: None if i is None else table.column(self.names[i]).combine_chunks()  # noqa: E731
        bad = [(number, text, f"{actual} fields, expected {self.ncols}") for number, text, actual in invalid]
        return self._merge([col(i) for i in self.idx], numbers, bad, before), total

    def _python(self, chunk: bytes, before: int) -> tuple[pa.Table, int]:
        """Python's csv module only splits the records (same dialect); the values take the same column path."""
        if csv.field_size_limit() < MAX_RECORD_BYTES:
            csv.field_size_limit(MAX_RECORD_BYTES)
        lines = list(io.StringIO(chunk.decode("utf-8", "surrogateescape"), newline=""))
        reader = csv.reader(lines, delimiter=self.delimiter)
        values: list[list[bytes]] = [[] for i in self.idx if i is not None]
        wanted = [i for i in self.idx if i is not None]
        numbers: list[int] = []
        bad: list[tuple[int, str, str]] = []
        number = prev = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                number += 1
                bad.append((number, "".join(lines[prev:reader.line_num]), str(err)))
                prev = reader.line_num
                continue
            text = lines[prev:reader.line_num]
            prev = reader.line_num
            if not fields:
                continue  # a blank line
            number += 1
            if len(fields) != self.ncols:
                bad.append((number, "".join(text), f"{len(fields)} fields, expected {self.ncols}"))
                continue
            numbers.append(number)
            for col, i in zip(values, wanted):
                col.append(fields[i].encode("utf-8", "surrogateescape"))
        arrays = iter([pa.array(col, pa.binary()) for col in values])
        columns = [None if i is None else next(arrays) for i in self.idx]
        return self._merge(columns, np.array(numbers, dtype=np.int64), bad, before), number

    def _merge(self, columns: list[pa.Array | None], numbers: np.ndarray, bad: list[tuple[int, str, str]],
               before: int) -> pa.Table:
        """The good-shaped records (url, caption, query columns at record numbers `numbers`) and the bad ones
        (number, text, what), in record order; numbers count from 1 within the chunk."""
        good = _tabular_table(self.path_text, columns[0], columns[1], columns[2], numbers + before)
        if not bad:
            return good
        rows = _Rows(self.path_text)
        for number, text, what in bad:
            text = text.rstrip("\r\n")
            rows.add(_reject_key(b"record", text.encode("utf-8", "surrogateescape")), "", None, "", before + number,
                     "input_parse_error", _clean(f"{what}: {text}"))
        merged = pa.concat_tables([good, rows.table()])
        order = np.argsort(np.concatenate([numbers, np.array([b[0] for b in bad], dtype=np.int64)]), kind="stable")
        return merged.take(pa.array(order))
