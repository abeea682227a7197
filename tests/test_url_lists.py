"""The URL list reader: every format x gzip, every reject reason, and no row lost or duplicated on garbage.

Plain Python and pyarrow on files the tests write into tmp_path; no Ray.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipelines.crawl.lists as ul
from pipelines.core.schema import sample_key
from pipelines.crawl.lists import (FORMATS, LIST_SCHEMA, REASONS, InputConfig, check_columns, detect_format, iter_list_rows)

FS = pafs.LocalFileSystem()
SURROGATE = re.compile("[\ud800-\udfff]")


def cfg_for(path, **kw) -> InputConfig:
    return InputConfig(paths=[str(path)], **{"query_col": "query", **kw})


def read(path, fmt: str | None = None, cfg: InputConfig | None = None, batch_rows: int = 8192,
         fs: pafs.FileSystem = FS) -> list[dict]:
    """All rows of one file, checking the contract of every table on the way."""
    path = str(path)
    fmt = fmt or detect_format(path)
    tables = list(iter_list_rows(cfg or cfg_for(path), fs, path, fmt, batch_rows))
    for t in tables:
        assert t.schema.equals(LIST_SCHEMA)
        assert 0 < t.num_rows <= batch_rows
    rows = [r for t in tables for r in t.to_pylist()]
    for r in rows:
        assert r["error"] in REASONS or r["error"] is None
        assert re.fullmatch(r"[0-9a-f]{24}", r["key"])
        assert r["url"] is not None and r["query"] is not None and r["detail"] is not None
        assert len(r["detail"]) <= 200
        assert r["source"].startswith(path + ":") or r["source"].startswith(path.lstrip("/") + ":")
        if r["error"] is None:
            assert r["detail"] == "" and r["url"] == r["url"].strip() and r["url"]
            assert r["key"] == sample_key(r["url"], r["caption"])
        else:
            assert r["detail"]
    return rows


def line_numbers(rows: list[dict]) -> list[int]:
    return [int(r["source"].rsplit(":", 1)[1]) for r in rows]


def put(path, data: bytes):
    """Write bytes, gzipped when the name ends in .gz."""
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
    return path


def parquet_bytes(table: pa.Table, **kw) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue().to_pybytes()


def csv_bytes(rows: list[dict], delimiter: str = ",", line_end: str = "\r\n") -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator=line_end)
    w.writerow(list(rows[0]))
    for r in rows:
        w.writerow(list(r.values()))
    return buf.getvalue().encode()


def list_bytes(rows: list[dict], fmt: str) -> bytes:
    if fmt == "parquet":
        return parquet_bytes(pa.Table.from_pylist(rows))
    if fmt in ("csv", "tsv"):
        return csv_bytes(rows, "\t" if fmt == "tsv" else ",")
    return b"".join(json.dumps(r, ensure_ascii=i % 2 == 0).encode() + b"\n" for i, r in enumerate(rows))


def expected_reason(u, c) -> str | None:
    """A reference classification, independent of the reader: values are bytes, str, None or anything."""
    def kind(v):
        if v is None:
            return "missing"
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                return "bad"
        elif not isinstance(v, str):
            return "not_text"
        if SURROGATE.search(v):
            return "bad"
        return "ok" if v.strip() else "missing"
    ku, kc = kind(u), kind(c)
    if ku != "ok":
        return {"missing": "url_missing", "not_text": "url_not_text", "bad": "bad_url_encoding"}[ku]
    if kc != "ok":
        return {"missing": "caption_missing", "not_text": "caption_not_text", "bad": "invalid_utf8_caption"}[kc]
    return None


ROWS = [
    {"url": "http://a.example/1.jpg", "caption": "a red car", "query": "car"},
    {"url": "  http://a.example/2.jpg\t", "caption": 'comma, "quoted" and\ttab', "query": ""},
    {"url": "http://a.example/3.jpg", "caption": "two\nlines\r\nand a CRLF", "query": "q"},
    {"url": "http://a.example/4.jpg", "caption": "ünïcödé 日本語 😀", "query": "ü"},
    {"url": "http://a.example/5.jpg", "caption": " leading and trailing spaces kept ", "query": "q"},
]


# --- every format x gzip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_rows_in_file_order(tmp_path, fmt, gz) -> None:
    path = put(tmp_path / f"list.{fmt}{'.gz' if gz else ''}", list_bytes(ROWS, fmt))
    rows = read(path)
    assert [r["error"] for r in rows] == [None] * len(ROWS)
    assert [r["url"] for r in rows] == [r["url"].strip() for r in ROWS]
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    assert [r["query"] for r in rows] == [r["query"] for r in ROWS]
    if fmt == "jsonl":
        assert line_numbers(rows) == [1, 2, 3, 4, 5]
    elif fmt == "parquet":
        assert line_numbers(rows) == [1, 2, 3, 4, 5]
    else:
        assert line_numbers(rows) == [2, 3, 4, 5, 6]  # records; the header is record 1
    # The same list read through any pyarrow FileSystem (here one rooted elsewhere, with relative paths).
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    again = read(path.name, fmt=fmt, cfg=cfg_for(path), fs=sub)
    assert [(r["key"], r["url"], r["caption"]) for r in again] == [(r["key"], r["url"], r["caption"]) for r in rows]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gzip_is_detected_by_its_magic_bytes_not_the_name(tmp_path, fmt) -> None:
    zipped = tmp_path / f"list.{fmt}"  # gzip without a .gz name
    zipped.write_bytes(gzip.compress(list_bytes(ROWS, fmt)))
    plain = tmp_path / f"plain.{fmt}.gz"  # a .gz name on a plain file
    plain.write_bytes(list_bytes(ROWS, fmt))
    assert [r["url"] for r in read(zipped, fmt)] == [r["url"].strip() for r in ROWS]
    assert [r["url"] for r in read(plain, fmt)] == [r["url"].strip() for r in ROWS]


def test_no_query_column_and_bad_arguments(tmp_path) -> None:
    for fmt in FORMATS:
        path = put(tmp_path / f"l.{fmt}", list_bytes(ROWS, fmt))
        rows = read(path, cfg=InputConfig(paths=["x"]))
        assert [r["query"] for r in rows] == [""] * len(ROWS) and all(r["error"] is None for r in rows)
    with pytest.raises(ValueError, match="unknown URL list format"):
        list(iter_list_rows(InputConfig(paths=["x"]), FS, str(path), "xml"))
    with pytest.raises(ValueError, match="batch_rows"):
        list(iter_list_rows(InputConfig(paths=["x"]), FS, str(path), "jsonl", batch_rows=0))
    with pytest.raises(FileNotFoundError):
        list(iter_list_rows(InputConfig(paths=["x"]), FS, str(tmp_path / "missing.jsonl"), "jsonl"))


def test_batches_hold_at_most_batch_rows_and_do_not_change_the_rows(tmp_path) -> None:
    rows = [{"url": f"http://x/{i}", "caption": f"c{i}" if i % 7 else None, "query": "q"} for i in range(100)]
    for fmt in FORMATS:
        path = put(tmp_path / f"l.{fmt}", list_bytes(rows, fmt))
        whole = read(path)
        assert len(whole) == 100
        for batch_rows in (1, 7, 64):
            assert read(path, batch_rows=batch_rows) == whole


# --- JSONL --------------------------------------------------------------------------------------------------


def test_jsonl_reject_reasons_and_their_rows(tmp_path) -> None:
    lines = [
        b'\xef\xbb\xbf{"url": " http://x/1 ", "caption": "ok", "query": "q"}\r',  # BOM, CRLF, spaces
        b"",  # blank lines are not rows
        b"   \t",
        b'{"url": "http://x/2", "caption": "bad',  # malformed JSON
        b'["not", "an", "object"]',
        b'"a string"',
        b'{"url": null, "caption": "c"}',
        b'{"caption": "c"}',
        b'{"url": "   ", "caption": "c"}',
        b'{"url": 7, "caption": "c"}',
        b'{"url": ["http://x"], "caption": "c"}',
        b'{"url": {"a": 1}, "caption": "c"}',
        b'{"url": true, "caption": "c"}',
        b'{"url": "http://x/\\ud800", "caption": "c"}',  # a lone surrogate escape
        b'{"url": "http://x/\xff\xfe", "caption": "c"}',  # invalid UTF-8 inside the URL string
        b'{"url": "http://x/3", "caption": null}',
        b'{"url": "http://x/3"}',
        b'{"url": "http://x/3", "caption": ""}',
        b'{"url": "http://x/4", "caption": 3.5}',
        b'{"url": "http://x/4", "caption": 12}',
        b'{"url": "http://x/4", "caption": ["a"]}',
        b'{"url": "http://x/5", "caption": "half a pair \\udc00"}',
        b'{"url": "http://x/5", "caption": "caf\xe9"}',  # Latin-1
        b'{"url": "http://x/6", "caption": "ok", "query": "\\ud800"}',  # bad query -> ""
        b'{"url": "http://x/6", "caption": "ok", "query": 12}',
        b'{"url": "http://x/6", "caption": "ok", "query": [1]}',
        b'{"url": "http://x/7", "caption": "ok", \xff: 1}',  # invalid byte outside strings
        b'{"url": "http://x/8", "caption": "pair \\ud83d\\ude00 is fine"}',
    ]
    path = put(tmp_path / "l.jsonl", b"\n".join(lines) + b"\n")
    rows = read(path)
    got = [(n, r["error"]) for n, r in zip(line_numbers(rows), rows)]
    assert got == [
        (1, None), (4, "input_parse_error"), (5, "input_parse_error"), (6, "input_parse_error"),
        (7, "url_missing"), (8, "url_missing"), (9, "url_missing"), (10, "url_not_text"), (11, "url_not_text"),
        (12, "url_not_text"), (13, "url_not_text"), (14, "bad_url_encoding"), (15, "bad_url_encoding"),
        (16, "caption_missing"), (17, "caption_missing"), (18, "caption_missing"), (19, "caption_not_text"),
        (20, "caption_not_text"), (21, "caption_not_text"), (22, "invalid_utf8_caption"),
        (23, "invalid_utf8_caption"), (24, None), (25, None), (26, None), (27, "input_parse_error"), (28, None),
    ]
    by_line = dict(zip(line_numbers(rows), rows))
    assert by_line[1]["url"] == "http://x/1" and by_line[1]["query"] == "q"
    assert by_line[14]["url"] == "http://x/\ufffd" and by_line[15]["url"].startswith("http://x/\ufffd")
    assert by_line[10]["detail"] == "url is int, not text" and by_line[10]["caption"] == "c"
    assert by_line[16]["caption"] is None and by_line[16]["url"] == "http://x/3"
    assert by_line[22]["caption"] is None and "U+DC00" in by_line[22]["detail"]
    assert (by_line[24]["query"], by_line[25]["query"], by_line[26]["query"]) == ("", "12", "")
    assert by_line[28]["caption"] == "pair 😀 is fine"
    assert "Expecting" in by_line[4]["detail"] or "Unterminated" in by_line[4]["detail"]
    assert "not an object" in by_line[5]["detail"]


def test_jsonl_deep_nesting_huge_and_overlong_lines(tmp_path, monkeypatch) -> None:
    nested_caption = {"url": "http://x/1", "caption": json.loads("[" * 200 + "]" * 200)}
    lines = [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than json can recurse: a parse error, not a crash
        json.dumps(nested_caption).encode(),
        json.dumps({"url": "http://x/2", "caption": "x" * 3_000_000}).encode(),  # bigger than a read block
        json.dumps({"url": "http://x/3", "caption": "after"}).encode(),
    ]
    path = put(tmp_path / "l.jsonl.gz", b"\n".join(lines))  # and no newline at the end
    rows = read(path)
    assert [r["error"] for r in rows] == ["input_parse_error", "caption_not_text", None, None]
    assert "RecursionError" in rows[0]["detail"]
    assert len(rows[2]["caption"]) == 3_000_000
    # A line over the cap is one input_parse_error row, and is never buffered whole.
    monkeypatch.setattr(ul, "MAX_RECORD_BYTES", 100_000)
    small = read(path)
    assert [r["error"] for r in small] == ["input_parse_error", "caption_not_text", "input_parse_error", None]
    assert line_numbers(small) == [1, 2, 3, 4]
    assert "longer than" in small[2]["detail"] and small[3]["caption"] == "after"


# --- CSV / TSV ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_reject_reasons_and_field_counts(tmp_path, fmt, capfd) -> None:
    d = b"\t" if fmt == "tsv" else b","
    records = [
        b"url" + d + b"caption" + d + b"query",
        b"http://x/1" + d + b'"quoted, with ""quotes""\nand a newline"' + d + b"q",
        b"too few" + d + b"fields",
        b"too" + d + b"many" + d + b"fields" + d + b"here",
        b"",  # blank: not a row
        b"http://x/\xff" + d + b"c" + d + b"q",
        b"http://x/2" + d + b"caf\xe9" + d + b"q",
        b"http://x/3" + d + b"\xed\xa0\x80 an encoded surrogate" + d + b"q",
        b"" + d + b"c" + d + b"q",
        b"  " + d + b"c" + d + b"q",
        b"http://x/4" + d + b"" + d + b"q",
        b"http://x/5" + d + b"ok" + d + b"bad query \xff",
        b"http://x/6" + d + b"ok" + d + b"",
    ]
    path = put(tmp_path / f"l.{fmt}", b"\xef\xbb\xbf" + b"\r\n".join(records) + b"\r\n")
    rows = read(path)
    assert [(n, r["error"]) for n, r in zip(line_numbers(rows), rows)] == [
        (2, None), (3, "input_parse_error"), (4, "input_parse_error"), (5, "bad_url_encoding"),
        (6, "invalid_utf8_caption"), (7, "invalid_utf8_caption"), (8, "url_missing"), (9, "url_missing"),
        (10, "caption_missing"), (11, None), (12, None),
    ]
    assert rows[0]["caption"] == 'quoted, with "quotes"\nand a newline'
    sep = "\t" if fmt == "tsv" else ","
    assert rows[1]["detail"] == f"2 fields, expected 3: too few{sep}fields"
    assert rows[2]["detail"].startswith("4 fields, expected 3: too")
    assert rows[3]["url"] == "http://x/\ufffd" and rows[3]["caption"] == "c"
    assert rows[9]["query"] == "" and rows[10]["query"] == ""
    assert capfd.readouterr().err == ""


def test_csv_bad_record_with_invalid_utf8_falls_back_to_python_csv_quietly(tmp_path, capfd) -> None:
    """pyarrow cannot hand such a record to invalid_row_handler (it decodes it strictly first)."""
    data = (b"url,caption\nhttp://x/1,one\nbad\xff,record,with three\nhttp://x/2,\"two\nlines\"\n"
            b"http://x/3,caf\xe9\n")
    rows = read(put(tmp_path / "l.csv", data), cfg=InputConfig(paths=["x"]))
    assert [(r["error"], r["url"], r["caption"]) for r in rows] == [
        (None, "http://x/1", "one"), ("input_parse_error", "", None), (None, "http://x/2", "two\nlines"),
        ("invalid_utf8_caption", "http://x/3", None)]
    assert rows[1]["detail"] == "3 fields, expected 2: bad\ufffd,record,with three"
    assert line_numbers(rows) == [2, 3, 4, 5]
    assert capfd.readouterr().err == ""


def test_csv_unterminated_quote_and_overlong_record(tmp_path, monkeypatch) -> None:
    data = b"url,caption\nhttp://x/1,one\nhttp://x/2,\"never closed\nhttp://x/3,three\n"
    rows = read(put(tmp_path / "l.csv", data), cfg=InputConfig(paths=["x"]))
    # The open quote swallows the rest of the file into one field: one record, as any CSV parser reads it.
    assert [r["error"] for r in rows] == [None, None]
    assert rows[1]["caption"] == "never closed\nhttp://x/3,three\n"
    monkeypatch.setattr(ul, "MAX_RECORD_BYTES", 1000)
    monkeypatch.setattr(ul, "_CHUNK_BYTES", 100)
    monkeypatch.setattr(ul, "_FIRST_BYTES", 50)
    monkeypatch.setattr(ul, "_READ_BYTES", 64)
    long = b"url,caption\nhttp://x/1,one\nhttp://x/2," + b"y" * 5000 + b"\nhttp://x/3,three\n"
    rows = read(put(tmp_path / "long.csv", long), cfg=InputConfig(paths=["x"]))
    assert [r["error"] for r in rows] == [None, "input_parse_error", None]
    assert line_numbers(rows) == [2, 3, 4] and "longer than" in rows[1]["detail"]


def test_empty_and_header_only_files_hold_no_rows(tmp_path) -> None:
    for name, data in [("e.csv", b""), ("h.csv", b"url,caption\r\n"), ("e.jsonl", b""), ("b.jsonl", b"\n\n"),
                       ("e.csv.gz", b""), ("e.jsonl.gz", b"")]:
        assert read(put(tmp_path / name, data), cfg=InputConfig(paths=["x"])) == []


# --- Parquet ------------------------------------------------------------------------------------------------


def test_parquet_column_types(tmp_path) -> None:
    bad = pa.array([b"http://x/1", b"http://x/\xff", None, b"  "], pa.binary())
    caps = pa.array([b"one", b"two", b"three", b"four"], pa.binary())
    cases = {
        # Strings written by another tool can hold invalid UTF-8: pyarrow reads them unvalidated.
        "string": (bad.view(pa.string()), caps.view(pa.string())),
        "large_string": (bad.cast(pa.large_binary()).view(pa.large_string()), caps.cast(pa.large_string())),
        "binary": (bad, caps),
        "large_binary": (bad.cast(pa.large_binary()), caps.cast(pa.large_binary())),
        "dictionary": (bad.view(pa.string()).dictionary_encode(), caps.view(pa.string()).dictionary_encode()),
    }
    for name, (u, c) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"url": u, "caption": c}), path)
        rows = read(path, cfg=InputConfig(paths=["x"]))
        assert [r["error"] for r in rows] == [None, "bad_url_encoding", "url_missing", "url_missing"], name
        assert [r["url"] for r in rows] == ["http://x/1", "http://x/\ufffd", "", ""], name
        assert [r["caption"] for r in rows] == ["one", "two", "three", "four"], name
        assert line_numbers(rows) == [1, 2, 3, 4]
    bad_caption = pa.array([b"ok", b"caf\xe9", None, b" "], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"url": ["http://x/1"] * 4, "caption": bad_caption}), tmp_path / "c.parquet")
    assert [r["error"] for r in read(tmp_path / "c.parquet", cfg=InputConfig(paths=["x"]))] == [
        None, "invalid_utf8_caption", "caption_missing", "caption_missing"]


def test_parquet_non_text_columns_and_queries(tmp_path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "url": pa.array([1, None, 3], pa.int64()), "caption": ["a", "b", "c"],
        "query": pa.array([b"ok", b"\xff", None], pa.binary())}), path)
    rows = read(path)
    assert [r["error"] for r in rows] == ["url_not_text", "url_missing", "url_not_text"]
    assert [r["query"] for r in rows] == ["ok", "", ""]
    pq.write_table(pa.table({
        "url": ["http://x/1", "http://x/2", "http://x/3"], "caption": pa.array([[1], None, [2, 3]]),
        "query": pa.array([5, None, 7], pa.int32())}), path)
    rows = read(path)
    assert [r["error"] for r in rows] == ["caption_not_text", "caption_missing", "caption_not_text"]
    assert [r["query"] for r in rows] == ["5", "", "7"] and rows[0]["detail"] == "caption is list, not text"
    pq.write_table(pa.table({"url": ["http://x/1", "http://x/2"], "caption": [1.5, 2.0]}), path)
    assert [r["error"] for r in read(path, cfg=InputConfig(paths=["x"]))] == ["caption_not_text"] * 2
    pq.write_table(pa.table({"url": ["http://x/1"], "caption": pa.nulls(1)}), path)
    assert [r["error"] for r in read(path, cfg=InputConfig(paths=["x"]))] == ["caption_missing"]


def test_parquet_streams_row_groups_and_stops_at_a_corrupt_one(tmp_path) -> None:
    n = 3000
    table = pa.table({"url": [f"http://x/{i}" for i in range(n)], "caption": [f"caption {i} " * 4 for i in range(n)]})
    good = tmp_path / "rg.parquet"
    pq.write_table(table, good, row_group_size=1000, compression="zstd")
    rows = read(good, cfg=InputConfig(paths=["x"]), batch_rows=400)
    assert [r["url"] for r in rows] == table.column("url").to_pylist() and line_numbers(rows) == list(range(1, n + 1))
    data = bytearray(good.read_bytes())
    start = pq.ParquetFile(good).metadata.row_group(1).column(0).data_page_offset
    for i in range(start + 10, start + 60):
        data[i] ^= 0xA5
    bad = tmp_path / "rg_bad.parquet"
    bad.write_bytes(bytes(data))
    rows = read(bad, cfg=InputConfig(paths=["x"]), batch_rows=400)
    assert [r["error"] for r in rows] == [None] * 1000 + ["input_unreadable"]
    assert rows[-1]["source"] == f"{bad}:1001" and "rows 1001..3000 of 3000 unread" in rows[-1]["detail"]
    footer = tmp_path / "footer.parquet"
    footer.write_bytes(good.read_bytes()[:-30])
    rows = read(footer, cfg=InputConfig(paths=["x"]))
    assert [(r["error"], r["source"]) for r in rows] == [("input_unreadable", f"{footer}:1")]


# --- unreadable remainders -------------------------------------------------------------------------------


def decompressible_prefix(data: bytes) -> bytes:
    return zlib.decompressobj(31).decompress(data)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_truncated_or_corrupt_gzip_keeps_the_rows_before_the_cut(tmp_path, fmt) -> None:
    rows_in = [{"url": f"http://x/{i}", "caption": f"caption number {i} " + "z" * (i % 50), "query": "q"}
               for i in range(20_000)]
    zipped = gzip.compress(list_bytes(rows_in, fmt))
    path = tmp_path / f"cut.{fmt}.gz"
    path.write_bytes(zipped[:len(zipped) // 2])
    rows = read(path)
    kept = decompressible_prefix(path.read_bytes()).count(b"\n") - (0 if fmt == "jsonl" else 1)  # the header
    assert 1000 < kept < 20_000
    assert [r["error"] for r in rows] == [None] * kept + ["input_unreadable"]
    assert [r["url"] for r in rows[:-1]] == [r["url"] for r in rows_in[:kept]]
    first_unread = kept + 1 if fmt == "jsonl" else kept + 2
    assert rows[-1]["source"] == f"{path}:{first_unread}"
    assert rows[-1]["detail"].startswith("from byte ") and "EOFError" in rows[-1]["detail"]
    # Corrupt deflate data may decode to some garbage before zlib (or at the latest the CRC) notices.
    path = tmp_path / f"flipped.{fmt}.gz"
    path.write_bytes(zipped[:len(zipped) // 2] + bytes(b ^ 0x55 for b in zipped[len(zipped) // 2:]))
    rows = read(path)
    first_bad = [r["error"] for r in rows].index("input_unreadable")
    first_bad = min(first_bad, next(i for i, r in enumerate(rows) if r["url"] != rows_in[i]["url"]))
    assert first_bad > 1000 and all(r["error"] is None for r in rows[:first_bad])
    assert rows[-1]["error"] == "input_unreadable" and "Error" in rows[-1]["detail"]
    # Garbage after a complete gzip member: every row, then one unreadable row.
    path = tmp_path / f"trailing.{fmt}.gz"
    path.write_bytes(zipped + b"not gzip at all")
    rows = read(path)
    assert len(rows) == 20_001 and rows[-1]["error"] == "input_unreadable"


def test_truncated_gzipped_parquet_is_one_unreadable_row(tmp_path) -> None:
    data = gzip.compress(list_bytes(ROWS, "parquet"))
    path = tmp_path / "l.parquet.gz"
    path.write_bytes(data[:-40])
    rows = read(path)
    assert [(r["error"], r["source"]) for r in rows] == [("input_unreadable", f"{path}:1")]


class FlakyFileSystem:
    """Duck-types the two FileSystem calls the reader makes; reads fail past `fail_after` bytes."""

    def __init__(self, fail_after: int) -> None:
        self.fail_after = fail_after

    def open_input_stream(self, path, compression=None):
        return FlakyFile(open(path, "rb").read(), self.fail_after)

    def open_input_file(self, path):
        return FlakyFile(open(path, "rb").read(), self.fail_after)


class FlakyFile(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, n=-1):
        """Like a socket: a short read up to the failure point, then an error. Parquet reads its footer
        first (the last 64 KiB): that always works."""
        start = self.tell()
        if start < len(self.getbuffer()) - 64 * 1024:
            if start >= self.fail_after:
                raise OSError("connection reset by peer")
            if n < 0 or start + n > self.fail_after:
                n = self.fail_after - start
        return super().read(n)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_io_error_mid_file(tmp_path, fmt) -> None:
    rows_in = [{"url": f"http://x/{i}", "caption": f"c{i} " + "x" * (i % 97), "query": "q"} for i in range(20_000)]
    data = (parquet_bytes(pa.Table.from_pylist(rows_in), row_group_size=2000) if fmt == "parquet"
            else list_bytes(rows_in, fmt))
    path = put(tmp_path / f"l.{fmt}", data)
    rows = read(path, fs=FlakyFileSystem(len(data) // 2))
    assert rows[-1]["error"] == "input_unreadable"
    assert "connection reset" in rows[-1]["detail"] or fmt == "parquet"  # (Parquet: the short read)
    assert 1000 < len(rows) - 1 < 20_000
    assert [r["url"] for r in rows[:-1]] == [r["url"] for r in rows_in[:len(rows) - 1]]
    if fmt == "parquet":
        assert (len(rows) - 1) % 2000 == 0  # whole row groups
    else:  # every whole line before the failure
        assert len(rows) - 1 == data[:len(data) // 2].count(b"\n") - (fmt == "csv")


# --- keys ---------------------------------------------------------------------------------------------------


def test_keys_are_stable_and_rejects_never_take_a_good_key(tmp_path) -> None:
    path = put(tmp_path / "l.jsonl", b'{"url": "http://x/1", "caption": "c"}\n{"url": 1, "caption": "c"}\n'
                                     b'{"url": 1, "caption": "c"}\n{"url": 2, "caption": "c"}\n')
    rows = read(path)
    assert rows[0]["key"] == sample_key("http://x/1", "c")
    assert rows[1]["key"] == rows[2]["key"] != rows[3]["key"]  # the same raw line, the same key
    assert read(path) == rows
    # A good row's key does not depend on its neighbours (the vectorised vs the per-row path).
    alone = tmp_path / "alone.csv"
    alone.write_bytes(b"url,caption\nhttp://x/1, c \n")
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes(b"url,caption\nhttp://x/1, c \n\xff,c\n")
    a, m = read(alone, cfg=InputConfig(paths=["x"])), read(mixed, cfg=InputConfig(paths=["x"]))
    assert a[0]["key"] == m[0]["key"] == sample_key("http://x/1", " c ")


def test_whitespace_and_utf8_rules_match_python() -> None:
    """The vectorised path must strip and validate exactly as the per-row path does."""
    import sys

    assert ul._WHITESPACE == "".join(ch for ch in map(chr, range(sys.maxunicode + 1)) if ch.isspace())
    rng = random.Random(7)
    alphabet = [b"a", b" ", b"\x00", b"\xc3\xa9", b"\xe2\x80\x83", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
                b"\xf0\x9f\x98\x80", b"\xe3\x80\x80", b"\x85", b"\xc2\x85", b"\xef\xbf\xbe", b"\xff", b"\xe2\x80"]
    values = [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(6))) for _ in range(5000)]
    for v in values:
        try:
            text = v.decode("utf-8")
        except UnicodeDecodeError:
            with pytest.raises(pa.ArrowInvalid):
                pa.array([v], pa.binary()).cast(pa.string())
            continue
        arrow = pa.array([v], pa.binary()).cast(pa.string())
        assert ul.pc.utf8_trim(arrow, ul._WHITESPACE)[0].as_py() == text.strip()


# --- check_columns --------------------------------------------------------------------------------------


def test_check_columns_names_the_file_and_the_column(tmp_path) -> None:
    csv_path = put(tmp_path / "l.csv.gz", b'\xef\xbb\xbf"url","the caption",query\r\nhttp://x,c,q\r\n')
    tsv_path = put(tmp_path / "l.tsv", b"url\tcaption\nhttp://x\tc\n")
    pq_path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"link": ["http://x"], "caption": ["c"]}), pq_path)
    check_columns(InputConfig(paths=["x"], caption_col="the caption", query_col="query"), FS, str(csv_path), "csv")
    check_columns(InputConfig(paths=["x"]), FS, str(tsv_path), "tsv")
    with pytest.raises(ValueError, match=r"l\.csv\.gz has no column\(s\) \['caption'\]"):
        check_columns(InputConfig(paths=["x"]), FS, str(csv_path), "csv")
    with pytest.raises(ValueError, match=r"l\.tsv has no column\(s\) \['query'\]"):
        check_columns(InputConfig(paths=["x"], query_col="query"), FS, str(tsv_path), "tsv")
    with pytest.raises(ValueError, match=r"l\.parquet has no column\(s\) \['url'\]"):
        check_columns(InputConfig(paths=["x"]), FS, str(pq_path), "parquet")
    with pytest.raises(ValueError, match="has no column"):  # the reader raises the same usage error
        list(iter_list_rows(InputConfig(paths=["x"]), FS, str(pq_path), "parquet"))
    with pytest.raises(ValueError, match="has no column"):
        list(iter_list_rows(InputConfig(paths=["x"]), FS, str(csv_path), "csv"))
    # Unreadable or empty files pass: their task reports them as rows. A missing file is an error.
    corrupt = tmp_path / "corrupt.csv.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    check_columns(InputConfig(paths=["x"]), FS, str(corrupt), "csv")
    check_columns(InputConfig(paths=["x"]), FS, str(put(tmp_path / "empty.csv", b"")), "csv")
    check_columns(InputConfig(paths=["x"]), FS, str(put(tmp_path / "x.jsonl", b"{}\n")), "jsonl")
    with pytest.raises(FileNotFoundError):
        check_columns(InputConfig(paths=["x"]), FS, str(tmp_path / "missing.csv"), "csv")
    rows = read(corrupt, cfg=InputConfig(paths=["x"]))
    assert [(r["error"], r["source"]) for r in rows] == [("input_unreadable", f"{corrupt}:1")]


# --- fuzz: rows in == rows out ----------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    pool = ["http://x/", "a", " ", "\t", "é", "日", "😀", ",", '"', "\n", "\r", "\\", "{", "}", "\x00", "\u2028"]
    return "".join(rng.choice(pool) for _ in range(rng.randrange(8)))


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randrange(n)))


def test_fuzz_jsonl_every_line_comes_out_once(tmp_path) -> None:
    rng = random.Random(1234)
    values = [None, 0, 1.5, True, False, [], {}, [1, "a"], {"a": None}, "", "  ", "http://x/\\ud800"]
    lines: list[bytes] = []
    expect: dict[int, str | None] = {}  # line number -> reason ("?" = some reject)
    for n in range(1, 4001):
        kind = rng.random()
        if kind < 0.3:
            u, c = random_text(rng), random_text(rng)
            obj = {"url": u, "caption": c, "query": random_text(rng)}
            line = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
            expect[n] = expected_reason(u, c)
        elif kind < 0.55:
            obj = {}
            for col in ("url", "caption", "query"):
                if rng.random() < 0.8:
                    obj[col] = rng.choice(values + [random_text(rng)])
            text = json.dumps(obj).replace("\\\\ud800", "\\ud800")  # a real lone-surrogate escape
            line = text.encode()
            parsed = json.loads(text)
            expect[n] = expected_reason(parsed.get("url"), parsed.get("caption"))
        elif kind < 0.65:
            line = json.dumps(rng.choice([v for v in values if not isinstance(v, dict)] + [random_text(rng)])).encode()
            expect[n] = "input_parse_error"
        elif kind < 0.75:  # invalid UTF-8 inside the strings
            u, c = b"http://x/" + random_bytes(rng, 6), random_bytes(rng, 6)
            u, c = (v.replace(b'"', b"").replace(b"\\", b"").replace(b"\n", b"").replace(b"\r", b"") for v in (u, c))
            u, c = (bytes(b for b in v if b >= 0x20) for v in (u, c))
            line = b'{"url": "' + u + b'", "caption": "' + c + b'"}'
            expect[n] = expected_reason(u, c)
        elif kind < 0.8:
            line = b"[" * rng.randrange(1, 5000) + b"1"
            expect[n] = "input_parse_error"
        elif kind < 0.9:
            line = random_bytes(rng, 60).replace(b"\n", b"")
            if line.isspace() or not line.strip(b"\r"):
                line = b"\r" * len(line)
                expect.pop(n, None)
            else:
                expect[n] = "?"
        else:
            line = rng.choice([b"", b" ", b"\t\t", b"\r"])  # blank: not a row
        if rng.random() < 0.2 and not line.endswith(b"\r"):
            line += b"\r"
        lines.append(line)
    path = put(tmp_path / "fuzz.jsonl.gz", b"\n".join(lines))
    rows = read(path)
    assert line_numbers(rows) == sorted(expect)
    for n, r in zip(line_numbers(rows), rows):
        if expect[n] == "?":
            assert r["error"] is not None, (n, lines[n - 1])
        else:
            assert r["error"] == expect[n], (n, lines[n - 1], r)
    assert read(path, batch_rows=13) == rows
    assert len({r["key"] for r in rows if r["error"] is None} & {r["key"] for r in rows if r["error"]}) == 0


def csv_field(rng: random.Random, delimiter: bytes, utf8: bool) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        v = random_text(rng).encode()
    elif kind < 0.6:
        v = random_bytes(rng, 12)
        if utf8:
            v = v.decode("utf-8", "replace").encode()
    elif kind < 0.7:
        v = rng.choice([b"", b" ", b"\t", b"\xe3\x80\x80"])
    else:
        v = b"http://x/" + rng.choice([b"ok", b"\xf0\x9f\x98\x80"] + ([] if utf8 else [b"caf\xe9", b"\xed\xa0\x80"]))
    must_quote = any(ch in v for ch in (delimiter, b'"', b"\n", b"\r"))
    return b'"' + v.replace(b'"', b'""') + b'"' if must_quote or rng.random() < 0.2 else v


@pytest.mark.parametrize("small_chunks", [False, True], ids=["default", "tiny-chunks"])
@pytest.mark.parametrize("content", ["utf8", "bytes-good-counts", "bytes"])
@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_fuzz_csv_every_record_comes_out_once(tmp_path, monkeypatch, fmt, content, small_chunks) -> None:
    """utf8: pyarrow with its invalid_row_handler; bytes-good-counts: pyarrow without; bytes: Python's csv."""
    rng = random.Random(f"{fmt}-{content}")
    d = b"\t" if fmt == "tsv" else b","
    utf8 = content == "utf8"
    out = [b"url" + d + b"caption" + d + b"query"]
    expect = []
    for _ in range(3000):
        nfields = rng.choice([3] * 8 + [1, 2, 4, 5]) if content != "bytes-good-counts" else 3
        if rng.random() < 0.1 and content != "bytes-good-counts":  # garbage: no quotes or line ends
            raw = bytes(b for b in random_bytes(rng, 40) if b not in b'"\r\n') or b"x"
            if utf8:
                raw = raw.decode("utf-8", "replace").encode()
            fields_raw = raw.split(d)
            record, nfields = raw, len(fields_raw)
            values = fields_raw
        else:
            fields = [csv_field(rng, d, utf8) for _ in range(nfields)]
            if nfields == 1 and fields[0] == b"":
                fields[0] = b'""'  # an empty unquoted single field would be a blank line
            record = d.join(fields)
            values = [f[1:-1].replace(b'""', b'"') if f.startswith(b'"') else f for f in fields]
        out.append(record)
        expect.append("input_parse_error" if nfields != 3 else expected_reason(values[0], values[1]))
        if rng.random() < 0.05:
            out.append(b"")  # a blank line: not a record
    data = b"".join(line + rng.choice([b"\n", b"\r\n"]) for line in out)
    path = put(tmp_path / f"fuzz.{fmt}.gz", data)
    if small_chunks:
        monkeypatch.setattr(ul, "_READ_BYTES", 97)
        monkeypatch.setattr(ul, "_FIRST_BYTES", 31)
        monkeypatch.setattr(ul, "_CHUNK_BYTES", 1500)
    parsers = []
    for name in ("_arrow", "_python"):
        def spy(self, *args, _orig=getattr(ul._CsvChunkParser, name), _name=name, **kw):
            out = _orig(self, *args, **kw)
            parsers.append(_name if _name == "_python" or kw.get("handle_invalid", args[-1]) else "_arrow-bare")
            return out
        monkeypatch.setattr(ul._CsvChunkParser, name, spy)
    rows = read(path)
    assert len(rows) == len(expect)
    assert line_numbers(rows) == list(range(2, len(expect) + 2))
    assert [r["error"] for r in rows] == expect
    assert set(parsers) == {{"utf8": "_arrow", "bytes-good-counts": "_arrow-bare", "bytes": "_python"}[content]}


@pytest.mark.parametrize("utf8", [True, False], ids=["utf8", "bytes"])
def test_fuzz_parquet_every_row_comes_out_once(tmp_path, utf8) -> None:
    """utf8: the vectorised path patching null/blank rows; bytes: the per-row path for most batches."""
    rng = random.Random(5 if utf8 else 6)
    n = 4000

    def value():
        k = rng.random()
        if k < 0.1:
            return None
        if k < 0.5:
            return random_text(rng).encode("utf-8")
        if k < 0.8:
            v = random_bytes(rng, 10)
            return v.decode("utf-8", "replace").encode() if utf8 else v
        return b"http://x/" + rng.choice([b"a", b" "] + ([] if utf8 else [b"\xff", b"\xed\xb0\x80"]))
    urls, caps, queries = [value() for _ in range(n)], [value() for _ in range(n)], [value() for _ in range(n)]
    table = pa.table({"url": pa.array(urls, pa.binary()).view(pa.string()),
                      "caption": pa.array(caps, pa.binary()).view(pa.string()),
                      "query": pa.array(queries, pa.binary()).view(pa.string())})
    path = put(tmp_path / "fuzz.parquet.gz", parquet_bytes(table, row_group_size=700))
    rows = read(path, batch_rows=300)
    assert line_numbers(rows) == list(range(1, n + 1))
    assert [r["error"] for r in rows] == [expected_reason(u, c) for u, c in zip(urls, caps)]
    for r, q in zip(rows, queries):
        try:
            assert r["query"] == (q or b"").decode("utf-8")
        except UnicodeDecodeError:
            assert r["query"] == ""
    assert read(path, batch_rows=8192) == rows
    np.testing.assert_array_equal([r["key"] for r in read(path, batch_rows=7)], [r["key"] for r in rows])


def test_reads_through_s3(s3_storage) -> None:
    """The same API on a real S3 endpoint (the session's local SeaweedFS): every format, gzipped or not."""
    for fmt in FORMATS:
        for name, data in [(f"l.{fmt}", list_bytes(ROWS, fmt)), (f"l.{fmt}.gz", gzip.compress(list_bytes(ROWS, fmt)))]:
            s3_storage.write_bytes(name, data)
            path = s3_storage.fs_path(name)
            check_columns(cfg_for(path), s3_storage.fs, path, fmt)
            rows = read(path, fmt, fs=s3_storage.fs)
            assert [r["url"] for r in rows] == [r["url"].strip() for r in ROWS]
            assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
