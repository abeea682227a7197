"""A seeded hostile web and hostile URL lists, for fuzzing the crawler (tests only).

`HostileWeb(seed, robots=...)` is a loopback HTTP server on 127.0.0.1 (a free port) that answers
`/f/<n>` with a response drawn at random from (seed, n): about half are plain images (JPEG, PNG,
GIF, WebP, BMP in many modes: CMYK, 16-bit, 1-bit, palette, animated, EXIF-rotated), the rest are
what the open web sends a crawler on a bad day, in families (see `_Routes`): odd and nonsense
statuses and Retry-Afters, redirects to anywhere (loops, chains `/c/<n>/<k>`, sibling servers,
broken, non-http, private and non-ASCII Locations), broken headers and framing, broken bodies, old
or no protocol, resets, slow trickles. `/k/<family>/<label>` serves one named case, and
`catalogue()` lists them all, so a fuzz meets every case at least once. `/robots.txt` is one of
`ROBOTS_VARIANTS` per server. Connections are kept alive when a response's own framing says it may
be (so a lying Content-Length or an extra response poisons the next exchange on that connection),
and some are closed at once although they said keep-alive.

Every route is the same bytes for the same (seed, n) (only the server's own and its peers' port
numbers, and timing, differ between runs), so a failure reproduces from the seed; `describe(n)`
names the route's kind and `response_bytes(path)` shows what it sends.

Written on asyncio streams instead of http.server because it must send what http.server refuses
to: status lines like "000" or "abc", no status line at all, header bytes that are not Latin-1,
NULs, obs-folds, broken chunk sizes, a reset in the middle of a body. The server never crashes
itself: a handler error is logged, kept in `errors`, and the connection closed. It counts requests
per path in `hits`.

No route ever needs DNS: hosts in redirects and lists are IP literals, "localhost" (/etc/hosts) or
names a crawler must refuse before any lookup (a label too long for IDNA, broken brackets, bad
ports). So the fuzz sends no traffic beyond 127.0.0.1, not even a DNS query (a resolver that
refuses names in the fetcher fuzz checks this).

`hostile_lists(dir, urls, seed)` writes a URL list in every input format with hostile lines mixed
in and returns the paths and how many ROWS each file holds. A row is:
- Parquet: a row of the table;
- JSONL: every line that is not blank (empty or only spaces); lines end at "\\n" (JSON Lines: a "\\r"
  before it belongs to the line ending; a lone "\\r", U+2028 or NEL inside a line does not end it);
- CSV/TSV: every line that is not empty, after the header line (the file's first line, after an
  optional BOM). A line of spaces IS a row here (a record of one field: the wrong field count), as
  CSV parsers read it. The generator never puts a line break (nor a lone "\\r") inside a field, and
  the one unterminated quote of a file is on its last line, so a line-based reader and a quote-aware
  one see the same rows.
Lines end with "\\n" or "\\r\\n", mixed; the "\\r" is part of the ending. A .gz file holds the same rows as
the file it compresses (written as two gzip members, which RFC 1952 allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import json
import logging
import os
import random
import socket
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass

from PIL import Image

log = logging.getLogger(__name__)

ROBOTS_VARIANTS = ("valid", "bom", "garbage", "unicode-digits", "500", "404", "huge", "hang", "redirect",
                   "empty", "binary")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Sleep:
    seconds: float


RESET = "reset"  # abort with an RST (SO_LINGER 0)
CLOSE = "close"  # close now (FIN), whatever was planned after


@dataclass(frozen=True)
class Route:
    kind: str  # family:label, e.g. "good:plain-png-LA", "redirect:ipv6-unclosed", "headers:content-length-3"
    parts: tuple  # bytes | Sleep | RESET | CLOSE, played in order
    # How long a kept-alive connection waits for the client's next request; 0 = close at once although the
    # response did not say so (the client's pool then holds a dead connection).
    idle_s: float = 10.0

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open for the client's next request after this response: an HTTP/1.1
        response all in bytes, framed by one numeric Content-Length or by chunked encoding (as a real server
        thinks of its own response, even when the framing lies: the bytes after it then poison the next
        response on that connection), and not saying Connection: close."""
        if not self.parts or not all(isinstance(p, bytes) for p in self.parts):
            return False
        data = b"".join(self.parts)
        end = data.find(b"\r\n\r\n")
        if not data.startswith(b"HTTP/1.1 ") or end < 0:
            return False
        lines = [line.lower() for line in data[:end].split(b"\r\n")[1:]]
        lengths = [line for line in lines if line.startswith(b"content-length:")]
        chunked = b"transfer-encoding: chunked" in lines
        framed = chunked or (bool(lengths) and all(line[15:].strip().isdigit() for line in lengths))
        return framed and b"connection: close" not in lines


# --------------------------------------------------------------------------- images


_IMAGE_KINDS = ("jpeg-RGB", "jpeg-L", "jpeg-CMYK", "jpeg-progressive", "jpeg-exif-rotated", "jpeg-low-quality",
                "png-RGB", "png-RGBA", "png-P-transparent", "png-L", "png-LA", "png-16bit", "png-1bit",
                "gif", "gif-animated", "webp", "webp-RGBA", "webp-lossless", "webp-animated", "bmp")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                 "BMP": "image/bmp"}


def make_image(rng: random.Random, kind: str | None = None) -> tuple[bytes, str, str]:
    """A tiny valid image: (bytes, its content type, its kind)."""
    kind = kind or rng.choice(_IMAGE_KINDS)
    shape = rng.random()
    if shape < 0.05:
        w = h = 1
    elif shape < 0.10:
        w, h = rng.choice([(1, rng.randint(2, 96)), (rng.randint(2, 96), 1)])
    else:
        w, h = rng.randint(8, 48), rng.randint(8, 48)

    def noise(mode: str, per_pixel: int) -> Image.Image:
        return Image.frombytes(mode, (w, h), rng.randbytes(w * h * per_pixel))

    def palette() -> Image.Image:
        im = noise("P", 1)
        im.putpalette(rng.randbytes(768))
        return im

    buf = io.BytesIO()
    fmt = kind.split("-", 1)[0].upper()
    if kind == "jpeg-RGB":
        noise("RGB", 3).save(buf, "JPEG", quality=rng.randint(30, 95), subsampling=rng.choice([0, 1, 2]))
    elif kind == "jpeg-L":
        noise("L", 1).save(buf, "JPEG")
    elif kind == "jpeg-CMYK":
        noise("CMYK", 4).save(buf, "JPEG")
    elif kind == "jpeg-progressive":
        noise("RGB", 3).save(buf, "JPEG", progressive=True)
    elif kind == "jpeg-exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = rng.choice([2, 3, 5, 6, 7, 8, 9, 0])  # orientation, 0 and 9 out of range
        noise("RGB", 3).save(buf, "JPEG", exif=exif.tobytes())
    elif kind == "jpeg-low-quality":
        noise("RGB", 3).save(buf, "JPEG", quality=1)
    elif kind == "png-RGB":
        noise("RGB", 3).save(buf, "PNG")
    elif kind == "png-RGBA":
        noise("RGBA", 4).save(buf, "PNG")
    elif kind == "png-P-transparent":
        palette().save(buf, "PNG", transparency=rng.randrange(256))
    elif kind == "png-L":
        noise("L", 1).save(buf, "PNG")
    elif kind == "png-LA":
        noise("LA", 2).save(buf, "PNG")
    elif kind == "png-16bit":
        noise("I;16", 2).save(buf, "PNG")
    elif kind == "png-1bit":
        Image.frombytes("1", (w, h), rng.randbytes((w + 7) // 8 * h)).save(buf, "PNG")
    elif kind == "gif":
        palette().save(buf, "GIF")
    elif kind == "gif-animated":
        frames = [palette() for _ in range(3)]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    elif kind == "webp":
        noise("RGB", 3).save(buf, "WEBP", quality=rng.randint(20, 90))
    elif kind == "webp-RGBA":
        noise("RGBA", 4).save(buf, "WEBP")
    elif kind == "webp-lossless":
        noise("RGB", 3).save(buf, "WEBP", lossless=True)
    elif kind == "webp-animated":
        frames = [noise("RGB", 3) for _ in range(3)]
        frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=40)
    elif kind == "bmp":
        noise("RGB", 3).save(buf, "BMP")
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return buf.getvalue(), CONTENT_TYPES[fmt], kind


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb if decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- HTTP pieces


def head(status: bytes | None, lines: list[bytes], eol: bytes = b"\r\n", end: bool = True) -> bytes:
    """A status line (None = none at all) and header lines, each ended by `eol`, then the blank line."""
    out = (status + eol) if status is not None else b""
    out += b"".join(line + eol for line in lines)
    return out + (eol if end else b"")


def chunked(body: bytes, rng: random.Random) -> bytes:
    """Valid chunked encoding with random chunk sizes, extensions and a trailer."""
    out, i = b"", 0
    while i < len(body):
        size = rng.randint(1, 4096)
        piece = body[i:i + size]
        ext = rng.choice([b"", b";foo=bar", b";x", b' ;name="q uoted"'])
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        i += size
    return out + b"0\r\n" + rng.choice([b"", b"X-Trailer: yes\r\n"]) + b"\r\n"


_X_ROBOTS = [b"noai", b"noimageai", b"NOAI", b"noindex, noai", b"ray-bot: noai", b"clip-on-ray-bot: noai",
             b"clip-on-ray-bot: noimageai", b"googlebot: noai", b"none", b"noindex, nofollow", b"all",
             b"unavailable_after: 25 Jun 2010 15:00:00 PST", b"max-image-preview: none", b"noai,",
             b",,,", b":::", b"", b"\xff\xfe noai", b"no\xc3\xa4i", b"\xe2\x80\x8bnoai", b"noai\x00",
             b"CLIP-ON-RAY-BOT: NOAI", b"other-bot: noai, noimageai", b"noimageai; noai", b"no ai"]
_TDM = [b"1", b"0", b"2", b"-1", b"yes", b"", b"1, 0", b"\xff", b"true", b"1" * 500]
_RETRY_AFTER = [b"0", b"1", b"-1", b"99999999999999999999", b"1.5", b"Wed, 21 Oct 2015 07:28:00 GMT",
                b"Fri, 31 Dec 9999 23:59:59 GMT", b"Thu, 01 Jan 1970 00:00:00 GMT", b"Mon, 32 Foo 2020 99:99:99 GMT",
                b"Sun, 06 Nov 1994 08:49:37", b"soon", b"", b"\xb2", b"\xb9", b"\xff", b"9" * 400, b"  2  ",
                b"+3", b"1e3", b"0x10", b"inf", b"nan", b"\xd9\xa3", b"\xef\xbc\x91", b"1, 2", b"Retry-After: 1"]
_CONTENT_LENGTHS = [b"-1", b"99999999999999999999", b"12, 13", b"abc", b"", b"+12", b" 7 ", b"0x10",
                    b"1e3", b"\xd9\xa1\xd9\xa2", b"\xb2", b"1_0", b"18446744073709551616", b"-0"]
_SECOND_CONTENT_TYPES = [b"IMAGE/JPEG", b"image/jpeg; charset=binary", b"image/png;;;", b" image/png ", b"image/jpg",
                         b"image/pjpeg", b"image/*", b"application/octet-stream", b"", b"text/html", b"image/svg+xml",
                         b"\xff\xfe/\x00", b"image/jpeg, text/html", b"image/webp\x00", b"image/gif; q=\xff"]
_NONSENSE_STATUS = [b"000 Zero", b"999 Nine", b"1000 Big", b"abc Letters", b"-1 Negative", b"20 Short", b"2000 Long",
                    b"200abc OK", b" 200 OK", b"200", b"", b"199 Low", b"600 High", b"\xff\xfe Bytes", b"2\x0000 OK",
                    b"\xd9\xa2\xd9\xa0\xd9\xa0 Arabic-Indic digits", b"\xb2\xb2\xb2 Superscripts", b"+200 OK",
                    b"0200 OK", b"\xef\xbc\x92\xef\xbc\x90\xef\xbc\x90 Fullwidth"]
_CHUNK_SIZES = [b"zz", b"-5", b"ffffffffffffffffffff", b"", b"0x10", b"1 0", b"\xff", b"+10", b"1_0", b"\xd9\xa1",
                b"10;ext=\xff", b"  10  "]
_TRANSFER_ENCODINGS = [b"gzip, chunked", b"chunked, gzip", b"identity", b"x-unknown", b"Chunked", b"chunked\x00",
                       b"\xff", b"chunked, chunked"]
_JUNK_HEADERS = [b"X-\xff\xfe: \xff\xfe\xfd", b"X-Utf8: caf\xc3\xa9 \xe2\x98\x95", b"X-Latin1: caf\xe9",
                 b"X-Nul: a\x00b", b"X-Empty:", b"X-Space-Name : v", b" X-Leading-Space: v", b"no colon at all",
                 b": empty name", b"X-Ctl: \x01\x02\x1b[31m", b"Set-Cookie: a=b; Path=/; HttpOnly",
                 b"Server: \xe6\x97\xa5\xe6\x9c\xac", b"Content-Disposition: attachment; filename=\"x\xff.jpg\"",
                 b"Link: <http://[::1>; rel=preload", b"Refresh: 0; url=http://169.254.169.254/",
                 b"Content-Location: http://169.254.169.254/", b"Cache-Control: no-store, \xff",
                 b"Date: Thu, 01 Jan 1970 00:00:00 GMT", b"Last-Modified: yesterday", b"ETag: \"\xff\"",
                 b"Vary: *", b"Via: 1.1 \x00", b"Connection: keep-alive, Upgrade", b"Upgrade: h2c",
                 b"Keep-Alive: timeout=99999999999", b"Accept-Ranges: bytes", b"Content-Range: bytes 0-1/2",
                 b"Alt-Svc: h3=\":443\"", b"Strict-Transport-Security: max-age=-1", b"X-Frame-Options: DENY",
                 b"tdm-policy: http://127.0.0.1:1/policy.json", b"X-Very-Long: " + b"v" * 8000]


Parts = tuple  # bytes | Sleep | RESET | CLOSE, played in order
Case = tuple  # (weight, builder): builder() -> bytes | Parts


class _Routes:
    """The route families. Each returns its cases {label: (weight, builder)} drawn from one Random;
    the labels never depend on the Random, so `/k/<family>/<label>` addresses one case directly."""

    def __init__(self, web: HostileWeb) -> None:
        self.web = web

    def build(self, family: str, rng: random.Random, n: int, label: str | None = None) -> Route | None:
        cases = getattr(self, family)(rng, n)
        if label is None:
            names = sorted(cases)
            label = rng.choices(names, [cases[k][0] for k in names])[0]
        elif label not in cases:
            return None
        parts = cases[label][1]()
        idle = 0.0 if label.startswith("stale-") else 10.0
        return Route(f"{family}:{label}", parts if isinstance(parts, tuple) else (parts,), idle)

    def labels(self, family: str) -> list[str]:
        return sorted(getattr(self, family)(random.Random(0), 0))

    # ---- shared pieces

    def _url(self, rng: random.Random, path: str, peer: bool = True) -> bytes:
        port = rng.choice(self.web.peers or [self.web.port]) if peer else self.web.port
        return f"http://{HOST}:{port}{path}".encode()

    @staticmethod
    def _target(rng: random.Random, n: int) -> int:
        """Another route of this server; redirects land mostly on the first thousand."""
        return rng.randrange(max(1000, n + 1))

    @staticmethod
    def _image_response(rng: random.Random, extra: list[bytes] = (), version: bytes = b"HTTP/1.1") -> bytes:
        body, ctype, _ = make_image(rng)
        lines = [b"Content-Type: " + ctype.encode(), b"Content-Length: %d" % len(body), *extra]
        rng.shuffle(lines)
        return head(version + b" 200 OK", lines) + body

    @staticmethod
    def _values(prefix: str, values: list, weight: float, build) -> dict[str, Case]:
        """One case per hostile value, sharing `weight` between them."""
        return {f"{prefix}-{i}": (weight / len(values), functools.partial(build, v)) for i, v in enumerate(values)}

    # ---- route families

    def good(self, rng: random.Random, n: int) -> dict[str, Case]:
        def build(style: str, kind: str) -> bytes:
            body, ctype, _ = make_image(rng, kind)
            ct = b"Content-Type: " + ctype.encode()
            if style in ("plain", "stale-keepalive"):  # keep-alive (stale: the server closes it at once)
                return head(b"HTTP/1.1 200 OK", [ct, b"Content-Length: %d" % len(body)]) + body
            if style == "plain-close":
                return head(b"HTTP/1.1 200 OK", [ct, b"Content-Length: %d" % len(body), b"Connection: close"]) + body
            if style == "http10":  # close-delimited
                return head(b"HTTP/1.0 200 OK", [ct]) + body
            if style == "no-length":  # HTTP/1.1 without a length: close-delimited too
                return head(b"HTTP/1.1 200 OK", [ct, b"Connection: close"]) + body
            return head(b"HTTP/1.1 200 OK", [ct, b"Transfer-Encoding: chunked"]) + chunked(body, rng)

        return {f"{style}-{kind}": (weight / len(_IMAGE_KINDS), functools.partial(build, style, kind))
                for style, weight in (("plain", 0.45), ("plain-close", 0.2), ("stale-keepalive", 0.05),
                                      ("http10", 0.1), ("no-length", 0.1), ("chunked", 0.1))
                for kind in _IMAGE_KINDS}

    def noisy(self, rng: random.Random, n: int) -> dict[str, Case]:
        """A good image with odd but survivable headers: X-Robots-Tag, tdm-reservation, junk."""
        def mixed() -> bytes:
            extra = []
            for _ in range(rng.randint(2, 5)):
                pool = rng.choice([[b"X-Robots-Tag: " + v for v in _X_ROBOTS], [b"tdm-reservation: " + v for v in _TDM],
                                   _JUNK_HEADERS, [b"Content-Type: " + v for v in _SECOND_CONTENT_TYPES]])
                extra.append(rng.choice(pool))
            return self._image_response(rng, extra)

        def one(line: bytes) -> bytes:
            return self._image_response(rng, [line])

        return {"mixed": (0.6, mixed),
                **self._values("x-robots-tag", [b"X-Robots-Tag: " + v for v in _X_ROBOTS], 0.2, one),
                **self._values("tdm-reservation", [b"tdm-reservation: " + v for v in _TDM], 0.05, one),
                **self._values("junk", _JUNK_HEADERS, 0.1, one),
                **self._values("second-content-type", [b"Content-Type: " + v for v in _SECOND_CONTENT_TYPES], 0.05,
                               one)}

    def redirect(self, rng: random.Random, n: int) -> dict[str, Case]:
        port, host = self.web.port, HOST.encode()
        m, m2 = self._target(rng, n), self._target(rng, n)
        status = rng.choice([b"301 Moved Permanently", b"302 Found", b"303 See Other", b"307 Temporary Redirect",
                             b"308 Permanent Redirect"])
        locations = {
            "empty": b"",
            "spaces": b"   ",
            "relative-abs-path": b"/f/%d" % m,
            "relative-path": b"%d" % m,
            "relative-dotdot": b"../../f/%d" % m,
            "self-loop-relative": b"./%d" % n,
            "self-loop-query": b"?again=1",
            "self-loop-fragment": b"#frag",
            "self-loop-absolute": self._url(rng, f"/f/{n}", peer=False),
            "absolute": self._url(rng, f"/f/{m}"),
            "scheme-relative": b"//%s:%d/f/%d" % (host, port, m),
            "one-slash": b"http:/f/%d" % m,
            "chain": b"/c/%d/%d" % (n, rng.randint(1, 8)),
            "uppercase-scheme": b"HTTP://%s:%d/f/%d" % (host, port, m),
            "localhost": b"http://localhost:%d/f/%d" % (port, m),
            "userinfo": b"http://a:b@%s:%d/f/%d" % (host, port, m),
            "userinfo-broken-ipv6": b"http://a:b@[::1",
            "userinfo-empty-host": b"http://a:b@/f/1",
            "ftp": b"ftp://%s/x.jpg" % host,
            "file": b"file:///etc/passwd",
            "javascript": b"javascript:alert(1)",
            "data": b"data:image/png;base64,iVBORw0KGgo=",
            "mailto": b"mailto:a@b",
            "https-to-plain": b"https://%s:%d/f/%d" % (host, port, m),
            "metadata": b"http://169.254.169.254/latest/meta-data/",
            "private": b"http://10.0.0.1/x.jpg",
            "unspecified": b"http://0.0.0.0:%d/f/%d" % (port, m),
            "other-loopback": b"http://127.0.0.2:%d/f/%d" % (port, m),
            "non-ascii-path": b"/f/%d/caf\xc3\xa9/\xe2\x98\x95" % m,
            "non-utf8-path": b"/f/\xff\xfe%d" % m,
            "non-ascii-host-too-long": b"http://" + b"\xc3\xbc" * 70 + b"/x.jpg",
            "nul": b"/f/%d\x00x" % m,
            "control": b"/f/%d\x7f\x1b" % m,
            "spaces-inside": b"/f/%d with spaces" % m,
            "backslashes": b"\\\\%s\\f\\%d" % (host, m),
            "huge-under-limit": b"/f/" + b"a" * 20000,
            "huge-over-limit": b"/f/" + b"a" * 70000,
            "ipv6-unclosed": b"http://[::1",
            "ipv6-double-close": b"http://[::1]]/",
            "ipv6-zone": b"http://[fe80::1%25eth0]/",
            "ipv6-loopback": b"http://[::1]:%d/f/%d" % (port, m),
            "ipv6-mapped-loopback": b"http://[::ffff:127.0.0.1]:%d/f/%d" % (port, m),
            "ipv6-empty": b"http://[]/",
            "ipv6-ipvfuture": b"http://[v1." + b"x" * 70 + b"]/",  # a valid IPvFuture whose name no resolver would send
            "ipv4-in-brackets": b"http://[127.0.0.1]/",
            "ipv6-no-brackets": b"http://::1/",
            "port-99999": b"http://%s:99999/f/1" % host,
            "port-negative": b"http://%s:-1/f/1" % host,
            "port-zero": b"http://%s:0/f/1" % host,
            "port-65536": b"http://%s:65536/f/1" % host,
            "port-letters": b"http://%s:abc/f/1" % host,
            "port-empty": b"http://%s:/f/1" % host,
            "port-huge": b"http://%s:%s/f/1" % (host, b"9" * 30),
            "scheme-only": b"http:",
            "scheme-slashes": b"http://",
            "no-host": b"http:///f/1",
        }

        def build(loc: bytes | None) -> bytes:
            lines = [b"Content-Length: 0"]
            lines += [b"Location: /f/%d" % m, b"Location: /f/%d" % m2] if loc is None else [b"Location: " + loc]
            return head(b"HTTP/1.1 " + status, lines)

        cases = {label: (1.0, functools.partial(build, loc)) for label, loc in locations.items()}
        cases["two-locations"] = (1.0, functools.partial(build, None))
        cases["no-location"] = (1.0, lambda: head(b"HTTP/1.1 " + status, [b"Content-Length: 0"]))
        cases["image-body"] = (1.0, lambda: _with_length(b"HTTP/1.1 " + status, [b"Location: /f/%d" % m,
                                                                                  b"Content-Type: image/png"],
                                                          make_image(rng)[0]))
        return cases

    def chain(self, n: int, k: int) -> Route:
        """/c/<n>/<k>: k more hops, then an image (k > max_redirects = too many redirects)."""
        rng = random.Random(f"hostile-web:{self.web.seed}:chain:{n}:{k}")
        if k <= 0:
            return Route("chain-end", (self._image_response(rng),))
        nxt = f"/c/{n}/{k - 1}"
        loc = rng.choice([nxt.encode(), self._url(rng, nxt), f"{k - 1}".encode()])
        status = rng.choice([b"301 Moved", b"302 Found", b"303 See Other", b"307 Temporary", b"308 Permanent"])
        return Route("chain", (head(b"HTTP/1.1 " + status, [b"Location: " + loc, b"Content-Length: 0"]),))

    def status(self, rng: random.Random, n: int) -> dict[str, Case]:
        body = rng.choice([b"", b"<html>nope</html>", rng.randbytes(rng.randint(1, 300))])
        ctype = rng.choice([b"text/html", b"image/jpeg", b"application/json"])

        def plain(code: bytes, extra: list[bytes] = ()) -> bytes:
            lines = [b"Content-Type: " + ctype, b"Content-Length: %d" % len(body), *extra]
            return head(b"HTTP/1.1 " + code, lines) + body

        def partial_content() -> bytes:
            img, ctype_s, _ = make_image(rng)
            part = img[: max(1, len(img) // 2)]
            return head(b"HTTP/1.1 206 Partial Content", [
                b"Content-Type: " + ctype_s.encode(), b"Content-Range: bytes 0-%d/%d" % (len(part) - 1, len(img)),
                b"Content-Length: %d" % len(part)]) + part

        def nonsense(code: bytes) -> bytes:  # a perfectly good image behind a nonsense status line
            img, ctype_s, _ = make_image(rng)
            lines = [b"Content-Type: " + ctype_s.encode(), b"Content-Length: %d" % len(img)]
            return head(b"HTTP/1.1 " + code, lines) + img

        return {
            "204": (0.12, lambda: plain(b"204 No Content")),
            "204-with-body": (0.02, lambda: head(b"HTTP/1.1 204 No Content", [b"Content-Length: 10"]) + b"0123456789"),
            "206": (0.08, partial_content),
            "304": (0.07, lambda: plain(b"304 Not Modified")),
            "4xx": (0.18, lambda: plain(b"%d Client Error" % rng.randint(400, 451))),
            "5xx": (0.11, lambda: plain(b"%d Server Error" % rng.randint(500, 599))),
            "3xx-other": (0.05, lambda: plain(
                rng.choice([b"300 Multiple Choices", b"305 Use Proxy", b"306 Switch Proxy", b"309 Nine"]),
                [b"Location: /f/%d" % self._target(rng, n)])),
            **self._values("429-retry-after", _RETRY_AFTER, 0.17,
                           lambda ra: plain(b"429 Too Many Requests", [b"Retry-After: " + ra])),
            **self._values("503-retry-after", _RETRY_AFTER, 0.07,
                           lambda ra: plain(b"503 Service Unavailable", [b"Retry-After: " + ra])),
            **self._values("nonsense", _NONSENSE_STATUS, 0.15, nonsense),
        }

    def headers(self, rng: random.Random, n: int) -> dict[str, Case]:
        """Broken or absurd headers around a (mostly valid) image."""
        body, ctype, _ = make_image(rng)
        ct = b"Content-Type: " + ctype.encode()
        ok = b"HTTP/1.1 200 OK"
        chunked_head = head(ok, [ct, b"Transfer-Encoding: chunked"])
        cases = {
            "content-length-disagree": lambda: head(ok, [
                ct, b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + rng.randint(1, 99))]) + body,
            "content-length-disagree-smaller-first": lambda: head(ok, [ct, b"Content-Length: %d" % (len(body) // 2),
                                                                       b"Content-Length: %d" % len(body)]) + body,
            "content-length-and-chunked": lambda: head(ok, [ct, b"Content-Length: 5", b"Transfer-Encoding: chunked"])
            + chunked(body, rng),
            "chunked-size-too-big": lambda: chunked_head + b"%x\r\n" % (len(body) + 1000) + body,
            "chunked-no-terminator": lambda: chunked_head + b"%x\r\n" % len(body) + body,
            "chunked-huge-extension": lambda: chunked_head + b"%x;" % len(body) + b"e" * 70000 + b"\r\n" + body
            + b"\r\n0\r\n\r\n",
            "content-encoding-gzip-plain-body": lambda: _with_length(ok, [ct, b"Content-Encoding: gzip"], body),
            "content-encoding-gzip-body": lambda: _with_length(ok, [ct, b"Content-Encoding: gzip"],
                                                               gzip.compress(body, mtime=0)),
            "content-encoding-gzip-broken": lambda: _with_length(ok, [ct, b"Content-Encoding: gzip"],
                                                                 gzip.compress(body, mtime=0)[:20] + rng.randbytes(50)),
            "content-encoding-br": lambda: _with_length(ok, [ct, b"Content-Encoding: br"], body),
            "content-encoding-deflate": lambda: _with_length(ok, [ct, b"Content-Encoding: deflate"],
                                                             zlib.compress(body)),
            "header-line-20k": lambda: _with_length(ok, [ct, b"X-Long: " + b"x" * 20000], body),
            "header-line-70k": lambda: _with_length(ok, [ct, b"X-Long: " + b"x" * 70000], body),
            "header-line-200k": lambda: _with_length(ok, [ct, b"X-Long: " + b"x" * 200000], body),
            "header-name-long": lambda: _with_length(ok, [ct, b"X-" + b"n" * 70000 + b": v"], body),
            "headers-99": lambda: _with_length(ok, [ct, *(b"X-Junk-%d: %d" % (i, i) for i in range(97))], body),
            "headers-150": lambda: _with_length(ok, [ct, *(b"X-Junk-%d: %d" % (i, i) for i in range(150))], body),
            "headers-3000": lambda: _with_length(ok, [ct, *(b"X-Junk-%d: %d" % (i, i) for i in range(3000))], body),
            "obs-fold": lambda: _with_length(ok, [b"Content-Type: image/", b"\t" + ctype.split("/")[1].encode(),
                                                  b"X-Robots-Tag: noindex,", b"  noai"], body),
            "obs-fold-first": lambda: _with_length(ok, [b" folded-before-any-header", ct], body),
            "nul-in-headers": lambda: _with_length(ok, [ct, b"X-\x00: \x00", b"X-Robots-Tag: \x00noai\x00"], body),
            "nul-in-content-type": lambda: _with_length(ok, [b"Content-Type: image/jpeg\x00text/html"], body),
            "non-latin1-everywhere": lambda: _with_length(ok, [ct, b"\xe2\x98\x83: \xf0\x9f\x92\xa9",
                                                               b"X-Robots-Tag: \xe2\x80\xaenoai"], body),
            "bare-lf": lambda: head(ok, [ct, b"Content-Length: %d" % len(body)], eol=b"\n") + body,
            "bare-cr": lambda: head(ok, [ct, b"Content-Length: %d" % len(body)], eol=b"\r") + body,
            "mixed-eol": lambda: ok + b"\r\n" + ct + b"\n" + b"Content-Length: %d\r\n\n" % len(body) + body,
            "missing-final-crlf": lambda: head(ok, [ct, b"Content-Length: %d" % len(body)], end=False),
            "missing-final-crlf-body": lambda: head(ok, [ct, b"Content-Length: %d" % len(body)], end=False) + body,
            "header-without-colon": lambda: _with_length(ok, [ct, b"this is not a header"], body),
            "space-before-colon": lambda: head(ok, [ct, b"Content-Length : %d" % len(body)]) + body,
            "x-robots-50": lambda: _with_length(
                ok, [ct, *(b"X-Robots-Tag: " + rng.choice(_X_ROBOTS) for _ in range(50))], body),
            "upgrade": lambda: _with_length(ok, [ct, b"Connection: Upgrade", b"Upgrade: websocket"], body),
            **self._values("content-length", _CONTENT_LENGTHS, 2.0,
                           lambda v: head(ok, [ct, b"Content-Length: " + v]) + body),
            **self._values("chunked-bad-size", _CHUNK_SIZES, 2.0,
                           lambda v: chunked_head + v + b"\r\n" + body[:16] + b"\r\n0\r\n\r\n"),
            **self._values("transfer-encoding", _TRANSFER_ENCODINGS, 1.0,
                           lambda v: head(ok, [ct, b"Transfer-Encoding: " + v]) + body),
            **self._values("content-encoding", [b"gzip, br, zstd", b"\xff", b"identity", b"x-gzip", b"compress"], 1.0,
                           lambda v: _with_length(ok, [ct, b"Content-Encoding: " + v], body)),
        }
        return {label: case if isinstance(case, tuple) else (1.0, case) for label, case in cases.items()}

    def body(self, rng: random.Random, n: int) -> dict[str, Case]:
        img, ctype, _ = make_image(rng)
        ct = b"Content-Type: " + ctype.encode()
        ok = b"HTTP/1.1 200 OK"
        cut = rng.randint(1, max(1, len(img) - 1))
        big = 3 * 1024 * 1024
        cases = {
            "truncated": lambda: _with_length(ok, [ct], img[:cut]),
            "random-bytes": lambda: _with_length(ok, [ct], rng.randbytes(rng.randint(1, 5000))),
            "magic-then-garbage": lambda: _with_length(ok, [ct], img[:12] + rng.randbytes(rng.randint(0, 3000))),
            "empty": lambda: _with_length(ok, [ct], b""),
            "empty-close-delimited": lambda: (head(b"HTTP/1.0 200 OK", [ct]), CLOSE),
            "shorter-than-length": lambda: (head(ok, [ct, b"Content-Length: %d" % (len(img) + 500)]) + img,
                                            Sleep(0.05)),
            "longer-than-length": lambda: head(ok, [ct, b"Content-Length: %d" % cut]) + img + rng.randbytes(100),
            "reset-mid-body": lambda: (head(ok, [ct, b"Content-Length: %d" % len(img)]) + img[:cut], Sleep(0.05),
                                       RESET),
            "reset-mid-headers": lambda: (ok + b"\r\n" + ct[:7], Sleep(0.05), RESET),
            "reset-at-once": lambda: (RESET,),
            "close-at-once": lambda: (CLOSE,),
            "close-after-status": lambda: (ok + b"\r\n", CLOSE),
            "html-as-image": lambda: _with_length(ok, [ct], b"<!doctype html><title>x</title>" * 20),
            "svg-as-image": lambda: _with_length(ok, [b"Content-Type: image/svg+xml"],
                                                 b'<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>'),
            "bomb-header": lambda: _with_length(ok, [b"Content-Type: image/png"], png_claiming(
                rng.choice([30000, 100000, 2 ** 31 - 1]), rng.choice([30000, 1, 65535]))),
            "zero-size-png": lambda: _with_length(ok, [b"Content-Type: image/png"], png_claiming(0, 0)),
            "tiff-as-jpeg": lambda: _with_length(ok, [b"Content-Type: image/jpeg"], _tiff(rng)),
            "type-mismatch": lambda: _with_length(ok, [b"Content-Type: "
                                                       + rng.choice(list(CONTENT_TYPES.values())).encode()], img),
            "too-big": lambda: head(ok, [ct, b"Content-Length: %d" % big]) + img + b"\x00" * (big - len(img)),
            "too-big-close-delimited": lambda: (head(b"HTTP/1.0 200 OK", [ct]) + img + b"\x00" * big, CLOSE),
            "image-twice": lambda: _with_length(ok, [ct], img + img),
            # A second, unasked-for response after the first on a kept-alive connection: whoever reuses the
            # connection reads it as the answer to its next request.
            "two-responses": lambda: _with_length(ok, [ct], img) + _with_length(ok, [ct], img[::-1]),
        }
        return {label: (1.0, build) for label, build in cases.items()}

    def protocol(self, rng: random.Random, n: int) -> dict[str, Case]:
        img, ctype, _ = make_image(rng)
        ct = b"Content-Type: " + ctype.encode()
        cases = {
            "http10": lambda: _with_length(b"HTTP/1.0 200 OK", [ct], img),
            "http09": lambda: img,
            "no-status-line": lambda: head(None, [ct, b"Content-Length: %d" % len(img)]) + img,
            "http2-status": lambda: _with_length(b"HTTP/2 200", [ct], img),
            "http20-status": lambda: _with_length(b"HTTP/2.0 200 OK", [ct], img),
            "http11-lower": lambda: _with_length(b"http/1.1 200 OK", [ct], img),
            "icy": lambda: _with_length(b"ICY 200 OK", [ct], img),
            "version-only": lambda: _with_length(b"HTTP/1.1", [ct], img),
            "leading-blank-lines": lambda: b"\r\n\r\n" + _with_length(b"HTTP/1.1 200 OK", [ct], img),
            "tabs-in-status": lambda: _with_length(b"HTTP/1.1\t200\tOK", [ct], img),
            "reason-non-ascii": lambda: _with_length(b"HTTP/1.1 200 \xc3\x96K \xff\x00", [ct], img),
            "status-line-huge": lambda: _with_length(b"HTTP/1.1 200 " + b"O" * 70000, [ct], img),
            "continue-then-200": lambda: b"HTTP/1.1 100 Continue\r\n\r\n" * rng.randint(1, 5)
            + _with_length(b"HTTP/1.1 200 OK", [ct], img),
            "early-hints-then-200": lambda: b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
            + _with_length(b"HTTP/1.1 200 OK", [ct], img),
            "continue-forever": lambda: b"HTTP/1.1 100 Continue\r\n\r\n" * 3000,
            "switching-protocols": lambda: head(b"HTTP/1.1 101 Switching Protocols", [b"Upgrade: websocket",
                                                                                    b"Connection: Upgrade"]) + img,
            "garbage": lambda: rng.randbytes(rng.randint(1, 2000)),
            "tls-alert": lambda: b"\x15\x03\x01\x00\x02\x02\x46",
            "json": lambda: b'{"status": 200}\r\n',
        }
        return {label: (1.0, lambda build=build: (build(), CLOSE)) for label, build in cases.items()}

    def slow(self, rng: random.Random, n: int) -> dict[str, Case]:
        img, ctype, _ = make_image(rng)
        data = head(b"HTTP/1.1 200 OK", [b"Content-Type: " + ctype.encode(), b"Content-Length: %d" % len(img)]) + img
        split = data.index(b"\r\n\r\n") + 4

        def trickle() -> Parts:  # each read succeeds, the whole never arrives in time
            parts: list = []
            for i in range(0, min(len(data), 16 * 15), 16):
                parts += [data[i:i + 16], Sleep(0.2)]
            return tuple(parts)

        return {"trickle": (1.0, trickle),
                "hang-then-send": (1.0, lambda: (Sleep(rng.uniform(0.2, 0.6)), data)),  # under any sane deadline
                "headers-then-stall": (1.0, lambda: (data[:split], Sleep(3.0), data[split:])),
                "stall-silent": (1.0, lambda: (Sleep(3.0), CLOSE))}

    # ---- robots.txt

    def robots(self, variant: str) -> Route:
        rng = random.Random(f"hostile-web:{self.web.seed}:robots:{variant}")
        rules = b"User-agent: *\nDisallow: /f/7\nAllow: /f/\nDisallow: /c/9\nCrawl-delay: 0\n\nSitemap: /sitemap.xml\n"
        text = [b"Content-Type: text/plain"]
        if variant == "valid":
            return Route("robots:valid", (_with_length(b"HTTP/1.1 200 OK", text, rules),))
        if variant == "bom":
            body = b"\xef\xbb\xbf" + rules.replace(b"\n", b"\r\n")
            utf8 = [b"Content-Type: text/plain; charset=utf-8"]
            return Route("robots:bom", (_with_length(b"HTTP/1.1 200 OK", utf8, body),))
        if variant in ("garbage", "unicode-digits", "binary"):
            pool = [b"User-agent: *", b"User-agent:", b"user-agent: clip-on-ray-bot", b"Disallow:", b"Disallow: /f/1",
                    b"Allow: /", b"Disallow", b"Allow: *\xff", b"Crawl-delay: -1", b"Crawl-delay: abc",
                    b"Crawl-delay: 1e9", b"Request-rate: 1/0", b"Request-rate: x/y", b"Request-rate: 1/2/3",
                    b"Sitemap: javascript:x", b"Disallow: /%ff%fe", b"Disallow: /f/\xff", b"\x00\x00\x00",
                    b"<html><body>404</body></html>", b"# comment \xe2\x98\x83", b"Noindex: /", b": :", b"::::",
                    b"User-agent: * # trailing", b"Disallow: /f/13 # comment", b"\xef\xbb\xbfUser-agent: *",
                    b"DISALLOW: /f/2", b"  Disallow :  /f/3  ", b"Disallow: " + b"/x" * 5000]
            if variant == "binary":
                body = rng.randbytes(4000)
            else:
                lines = [rng.choice(pool) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 60))
                         for _ in range(120)]
                if variant == "unicode-digits":
                    # Valid lines whose numbers are digits to str.isdigit() but not to int(): superscripts.
                    lines = [b"User-agent: *", b"Crawl-delay: \xc2\xb2", b"Request-rate: \xc2\xb9/\xc2\xb3",
                             b"Disallow: /f/7", *lines[:20]]
                body = b"\n".join(lines)
            return Route(f"robots:{variant}", (_with_length(b"HTTP/1.1 200 OK", text, body),))
        if variant == "500":
            return Route("robots:500", (_with_length(b"HTTP/1.1 500 Internal Server Error", [], b"oops"),))
        if variant == "404":
            html = [b"Content-Type: text/html"]
            return Route("robots:404", (_with_length(b"HTTP/1.1 404 Not Found", html, b"<h1>404"),))
        if variant == "huge":  # over 512 KiB: comments first, the rules last
            return Route("robots:huge", (_with_length(b"HTTP/1.1 200 OK", text,
                                                      b"# " + b"padding " * 80_000 + b"\n" + rules),))
        if variant == "hang":  # answers, late but within a 1.5 s deadline
            return Route("robots:hang", (Sleep(0.8), _with_length(b"HTTP/1.1 200 OK", text, rules)))
        if variant == "redirect":
            return Route("robots:redirect", (head(b"HTTP/1.1 301 Moved", [b"Location: /robots-real.txt",
                                                                          b"Content-Length: 0"]),))
        if variant == "empty":
            return Route("robots:empty", (_with_length(b"HTTP/1.1 200 OK", text, b""),))
        raise ValueError(f"unknown robots variant {variant!r}; choose from {ROBOTS_VARIANTS} or 'random'")


def _with_length(status: bytes, lines: list[bytes], body: bytes) -> bytes:
    return head(status, [*lines, b"Content-Length: %d" % len(body)]) + body


def _tiff(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (8, 8), rng.randbytes(192)).save(buf, "TIFF")
    return buf.getvalue()


# Route families and their shares of /f/<n>.
_FAMILIES = (("good", 0.47), ("noisy", 0.12), ("redirect", 0.10), ("status", 0.10), ("headers", 0.10),
             ("body", 0.07), ("protocol", 0.03), ("slow", 0.01))


# --------------------------------------------------------------------------- the server


class HostileWeb:
    """`with HostileWeb(seed=7, robots="garbage") as web: web.url(12)` -> http://127.0.0.1:PORT/f/12

    robots: one of ROBOTS_VARIANTS, or "random" (picked from the seed). slow_share scales the share
    of slow routes (0 = none). `peers` (set by `link`) are the ports absolute redirects may point to.
    """

    def __init__(self, seed: int, robots: str = "random", slow_share: float = 1.0) -> None:
        self.seed = seed
        if robots == "random":
            robots = random.Random(f"hostile-web:{seed}:robots").choice(ROBOTS_VARIANTS)
        if robots not in ROBOTS_VARIANTS:
            raise ValueError(f"unknown robots variant {robots!r}; choose from {ROBOTS_VARIANTS} or 'random'")
        self.robots_variant = robots
        self.slow_share = slow_share
        self.hits: Counter[str] = Counter()
        self.errors: list[tuple[str, str]] = []  # (path, repr of the handler's exception)
        self.peers: list[int] = []
        self.port = 0
        self._routes = _Routes(self)
        self._cache: dict[str, Route] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None

    # ---- addresses

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, n: int, host: str = HOST) -> str:
        return f"http://{host}:{self.port}/f/{n}"

    @staticmethod
    def link(servers: list[HostileWeb]) -> None:
        """Let absolute redirects of each server point at any of them (cross-server chains)."""
        ports = [s.port for s in servers]
        for s in servers:
            s.peers = ports

    # ---- routes

    def family(self, n: int) -> str:
        rng = random.Random(f"hostile-web:{self.seed}:family:{n}")
        shares = [(name, share * (self.slow_share if name == "slow" else 1.0)) for name, share in _FAMILIES]
        x = rng.random() * sum(s for _, s in shares)
        for name, share in shares:
            x -= share
            if x < 0:
                return name
        return "good"

    def route(self, path: str) -> Route:
        cached = self._cache.get(path)
        if cached is None:
            cached = self._cache[path] = self._build(path)
        return cached

    def describe(self, n: int) -> str:
        """What /f/<n> sends, e.g. "redirect:ipv6-unclosed" (family:label; the same as /k/<family>/<label>
        sends, up to the random values drawn inside a case)."""
        return self.route(f"/f/{n}").kind

    def catalogue(self, slow: bool = True) -> list[str]:
        """Paths /k/<family>/<label>: one of every case of every family, so that a fuzz meets each at least once."""
        return [f"/k/{family}/{label}" for family, _ in _FAMILIES if slow or family != "slow"
                for label in self._routes.labels(family)]

    def response_bytes(self, path: str) -> bytes:
        """The bytes a path answers with (sleeps, resets and closes left out), for reading a failure."""
        return b"".join(p for p in self.route(path).parts if isinstance(p, bytes))

    def _build(self, path: str) -> Route:
        parts = path.split("/")
        if path == "/robots.txt":
            return self._routes.robots(self.robots_variant)
        if path == "/robots-real.txt":
            return self._routes.robots("valid")
        if len(parts) == 3 and parts[1] == "f" and parts[2].isascii() and parts[2].isdigit():
            n = int(parts[2])
            family = self.family(n)
            return self._routes.build(family, random.Random(f"hostile-web:{self.seed}:{family}:{n}"), n)
        if len(parts) == 4 and parts[1] == "k" and parts[2] in dict(_FAMILIES):
            family, label = parts[2], parts[3]
            route = self._routes.build(family, random.Random(f"hostile-web:{self.seed}:k:{family}:{label}"), 0, label)
            if route is not None:
                return route
        if len(parts) == 4 and parts[1] == "c" and all(p.isascii() and p.isdigit() for p in parts[2:]):
            return self._routes.chain(int(parts[2]), int(parts[3]))
        text = [b"Content-Type: text/plain"]
        return Route("not-found", (_with_length(b"HTTP/1.1 404 Not Found", text, b"not found"),))

    # ---- lifecycle

    def __enter__(self) -> HostileWeb:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, HOST, 0, limit=1 << 20, backlog=512))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as err:  # pragma: no cover - surfaced to start()
                failure.append(err)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name=f"hostile-web-{self.seed}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)

    # ---- one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        path = "?"
        idle = 10.0
        try:
            while True:  # one request after another while both sides keep the connection
                try:
                    request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=idle)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return  # the client sent no (further) complete request: nothing to answer
                line, _, headers = request.partition(b"\r\n")
                words = line.split(b" ")
                target = words[1] if len(words) > 1 else b"/"
                path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
                self.hits[path] += 1
                route = self.route(path)
                keep = route.keep_alive and b"connection: close" not in headers.lower()
                idle = route.idle_s
                if not await self._play(route.parts, writer, keep):
                    return
        except (OSError, asyncio.CancelledError):
            pass  # the client hung up (deadline, too large: resets, ENOTCONN) or the server is stopping
        except Exception as err:  # noqa: BLE001 - the server must outlive its own bugs
            log.exception("hostile web %s: handler failed on %r", self.seed, path)
            self.errors.append((path, repr(err)))
        finally:
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.transport.close()

    async def _play(self, parts: tuple, writer: asyncio.StreamWriter, keep: bool) -> bool:
        """Send one response; True if the connection stays open for another request."""
        for part in parts:
            if isinstance(part, Sleep):
                await asyncio.sleep(part.seconds)
            elif part == RESET:
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif part == CLOSE:
                keep = False
                break
            else:
                writer.write(part)
                await writer.drain()
        if keep:
            return True
        with contextlib.suppress(OSError):  # the client may be gone already
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(writer.drain(), timeout=5)
        return False


# --------------------------------------------------------------------------- hostile URL lists


LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl", "csv.gz", "tsv.gz", "jsonl.gz")

_CAPTIONS = ["a photo", "caf\u00e9 \u2615", "\u65e5\u672c\u8a9e\u306e\u30ad\u30e3\u30d7\u30b7\u30e7\u30f3",
             "\u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
             "emoji \U0001f408\u200d\u2b1b\U0001f3f3\ufe0f\u200d\U0001f308",
             "z\u0334\u0321a\u0337l\u0336g\u0335o", "\u200b zero width \ufeff", "comma, inside", 'quote "inside"',
             "<script>alert(1)</script>", "' OR 1=1 --", "%s%n%x", "{{7*7}}", "\\x00 literal", "  padded  ",
             "\u202eright to left override", "\U0010ffff last code point", "\ufffd replacement", "null", "None", ""]


def _caption(rng: random.Random, i: int) -> str:
    base = rng.choice(_CAPTIONS)
    pick = rng.random()
    if pick < 0.03:
        return f"long {i} " + "w" * rng.randint(10_000, 100_000)
    return f"{base} #{i}"


def _plain(s: str) -> str:
    """A caption safe for a valid CSV/TSV/JSONL row: no line breaks of any kind."""
    return "".join(" " if c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029" else c for c in s)


def _csv_field(value: bytes, delim: bytes) -> bytes:
    if value[:1] in (b'"', b" ") or value[-1:] == b" " or delim in value or b'"' in value:
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def _text_lines(fmt: str, rng: random.Random, urls: list[str]) -> tuple[list[bytes], int]:
    """Lines (without endings) of a CSV/TSV/JSONL list, and how many rows they hold."""
    long_caption = "L" * 1_500_000  # one caption longer than Arrow's default CSV block (1 MiB)
    def u() -> str:
        return rng.choice(urls)

    good: list[bytes] = []
    for i, url in enumerate(urls):
        cap, query = _plain(_caption(rng, i)), rng.choice(["q", "", "\u00fcber", "query with spaces"])
        if fmt == "jsonl":
            obj = {"url": url, "caption": cap, "query": query}
            keys = list(obj)
            rng.shuffle(keys)
            good.append(json.dumps({k: obj[k] for k in keys}, ensure_ascii=rng.random() < 0.5).encode())
        else:
            delim = b"," if fmt == "csv" else b"\t"
            cells = [url.encode(), cap.encode(), query.encode()]
            if fmt == "tsv":  # TSV rows carry no tabs and never start a field with a quote
                cells = [c.replace(b"\t", b" ").lstrip(b'"') for c in cells]
                good.append(delim.join(cells))
            else:
                good.append(delim.join(_csv_field(c, delim) for c in cells))
    if fmt == "jsonl":
        hostile = [
            b'{"url": "%s", "caption": "x\\ud800y"}' % u().encode(),
            b'{"url": "%s", "caption": "low \\udfff alone"}' % u().encode(),
            b'{"url": "%s", "caption": "reversed \\udc00\\ud800"}' % u().encode(),
            b'{"url": "%s\\ud83d", "caption": "surrogate in url"}' % u().encode(),
            b'{"url": "%s", "caption": "caf\xe9 \xff latin-1"}' % u().encode(),
            b'{"url": "%s\xff\xfe", "caption": "invalid utf-8 in url"}' % u().encode(),
            b'{"url": "%s", "caption": "cesu \xed\xa0\x80 overlong \xc0\xaf"}' % u().encode(),
            b'{"url": "%s", "caption": "q", "query": "\xff"}' % u().encode(),
            b'{"url": 123, "caption": "number url"}',
            b'{"url": 1.5e300, "caption": "float url"}',
            b'{"url": ["%s"], "caption": "list url"}' % u().encode(),
            b'{"url": {"href": "%s"}, "caption": "dict url"}' % u().encode(),
            b'{"url": null, "caption": "null url"}',
            b'{"url": true, "caption": "bool url"}',
            b'{"url": "", "caption": "empty url"}',
            b'{"url": "%s", "caption": 42}' % u().encode(),
            b'{"url": "%s", "caption": ["a", "b"]}' % u().encode(),
            b'{"url": "%s", "caption": {"text": "x"}}' % u().encode(),
            b'{"url": "%s", "caption": null}' % u().encode(),
            b'{"url": "%s", "caption": false}' % u().encode(),
            b'{"url": "%s", "caption": "q", "query": [1, 2]}' % u().encode(),
            b'{"url": "%s", "caption": "q", "query": {"a": null}}' % u().encode(),
            b'{"caption": "no url key"}',
            b'{"url": "%s"}' % u().encode(),
            b'{"url": "%s", "url": "http://127.0.0.1:1/dup", "caption": "duplicate keys"}' % u().encode(),
            b'{"url": "%s", "caption": "extra", "extra": {"deep": [1, {"x": null}]}}' % u().encode(),
            b'{"url": "%s"' % u().encode(),
            b'{url: "%s", caption: "unquoted keys"}' % u().encode(),
            b"{'url': '%s', 'caption': 'single quotes'}" % u().encode(),
            b'["%s", "a list, not an object"]' % u().encode(),
            b'"%s"' % u().encode(),
            b"123",
            b"null",
            b"true",
            b"{}",
            b"[]",
            b"garbage text, not json",
            b'{"url": "%s", "caption": "trailing"} trailing' % u().encode(),
            b'{"url": NaN, "caption": Infinity}',
            b'{"url": 1e999, "caption": -1e999}',
            b'{"url": 1' + b"0" * 5000 + b', "caption": "a 5000-digit number"}',
            b"[" * 100_000,
            b'{"a":' * 50_000,
            b'{"url": "%s", "caption": "nul escape \\u0000 inside"}' % u().encode(),
            b'{"url": "%s", "caption": "raw nul \x00 inside"}' % u().encode(),
            b'{"url": "%s", "caption": "raw U+2028 \xe2\x80\xa8 U+2029 \xe2\x80\xa9 NEL \xc2\x85"}' % u().encode(),
            b'{"url": "%s", "caption": "raw lone CR \r inside"}' % u().encode(),
            b'{"url": "%s", "caption": "vertical tab \x0b form feed \x0c"}' % u().encode(),
            b'\x1e{"url": "%s", "caption": "json-seq record separator"}' % u().encode(),
            b'\xef\xbb\xbf{"url": "%s", "caption": "BOM mid-file"}' % u().encode(),
            b'{"url": "%s", "caption": "%s"}' % (u().encode(), long_caption.encode()),
            b'{"url": "%s", "caption": "%s"}' % (u().encode(), b"\\u00e9" * 20000),
            b'{"url": "  %s  ", "caption": "padded url"}' % u().encode(),
            b'{"url": "http://[::1", "caption": "broken ipv6"}',
            b'{"url": "http://' + "\u00fc".encode() * 70 + b'/x.jpg", "caption": "non-ascii host"}',
            b'{"url": "javascript:alert(1)", "caption": "js"}',
            b'{"url": "%s", "caption": "\xf0\x9f\x98"}' % u().encode(),  # a cut 4-byte sequence
        ]
    else:
        d = b"," if fmt == "csv" else b"\t"
        hostile = [
            u().encode(),  # one field
            u().encode() + d + b"two fields",
            u().encode() + d + b"cap" + d + b"q" + d + b"extra" + d + b"extra",
            d * 6,
            d * 2,
            b" ",  # spaces only: a one-field record in CSV/TSV
            b"   ",
            u().encode() + d + d,
            d + b"caption without url" + d + b"q",
            b'"' + u().encode() + b'"' + d + b'"cap"tion"' + d + b'"q"',
            u().encode() + d + b'"ca"p"' + d + b"q",
            u().encode() + d + b'ca"p' + d + b"q",
            b'"' + u().encode() + b'"x' + d + b"cap" + d + b"q",
            b'"' + u().encode() + b'"' + d + b'"say ""hi"""' + d + b'"q"',
            u().encode() + b"\xff\xfe" + d + b"invalid utf-8 in url" + d + b"q",
            u().encode() + d + b"caf\xe9 \xff" + d + b"q",
            u().encode() + d + b"cap" + d + b"\xfe",
            u().encode() + d + b"cesu \xed\xa0\x80 cut \xf0\x9f\x98" + d + b"q",
            u().encode() + d + b"ca\x00p" + d + b"q",
            b"\x00" + d + b"\x00" + d + b"\x00",
            u().encode() + d + long_caption.encode() + d + b"q",
            u().encode() + d + b"\xc3\xa9" * 40000 + d + b"q",
            b"  " + u().encode() + b"  " + d + b" cap " + d + b" q ",
            b"url" + d + b"caption" + d + b"query",  # the header again
            u().encode() + d + b"raw U+2028 \xe2\x80\xa8 NEL \xc2\x85 inside" + d + b"q",
            u().encode() + d + b"vertical tab \x0b form feed \x0c" + d + b"q",
            b"http://[::1" + d + b"broken ipv6" + d + b"q",
            b"http://" + "\u00fc".encode() * 70 + b"/x.jpg" + d + b"non-ascii host" + d + b"q",
            b"javascript:alert(1)" + d + b"js" + d + b"q",
            b"\xef\xbb\xbf" + u().encode() + d + b"BOM mid-file" + d + b"q",
            b"#" + u().encode() + d + b"looks like a comment" + d + b"q",
            b"=HYPERLINK(\"" + u().encode() + b"\")" + d + b"formula" + d + b"q",
        ]
        if fmt == "tsv":
            hostile.append(u().encode() + b"," + b"comma-separated in a tsv" + b"," + b"q")
        else:
            hostile.append(u().encode() + b"\t" + b"tab-separated in a csv" + b"\t" + b"q")
    lines = good + hostile + [rng.choice(hostile) for _ in range(min(30, len(urls) // 10))]
    rng.shuffle(lines)
    rows = len(lines)
    # Blank lines: not rows. In CSV/TSV only an empty line is blank (a line of spaces is a record of one
    # field, a row with the wrong field count), in JSONL a line of spaces is blank too.
    blanks = [b"", b" ", b"   "] if fmt == "jsonl" else [b""]
    for _ in range(max(3, len(lines) // 15)):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(blanks))
    if fmt != "jsonl":
        lines.append(u().encode() + d + b'"unterminated quote, last line' + d + b"q")
        rows += 1
        lines.insert(0, b"url" + d + b"caption" + d + b"query" if rng.random() < 0.5 else
                     d.join(b'"%s"' % c for c in (b"url", b"caption", b"query")))
    return lines, rows


def _join(lines: list[bytes], rng: random.Random) -> bytes:
    out = b"\xef\xbb\xbf" if rng.random() < 0.5 else b""
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        out += line + (b"" if last and rng.random() < 0.5 else rng.choice([b"\n", b"\r\n"]))
    return out


def _parquet(path: str, rng: random.Random, urls: list[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    url_col: list[bytes | None] = []
    cap_col: list[bytes | None] = []
    query_col: list[str | None] = []
    for i, url in enumerate(urls):
        url_col.append(url.encode())
        cap_col.append(_caption(rng, i).encode())
        query_col.append(rng.choice(["q", "", "\u00fcber"]))
    hostile = [
        (None, b"null url", "q"), (urls[0].encode(), None, "q"), (None, None, None),
        (urls[0].encode() + b"\xff\xfe", b"invalid utf-8 in url", "q"), (b"\xed\xa0\x80", b"cesu url", "q"),
        (rng.choice(urls).encode(), b"caf\xe9 \xff", "q"), (rng.choice(urls).encode(), b"cut \xf0\x9f\x98", None),
        (rng.choice(urls).encode(), b"nul \x00 inside", "q"), (b"", b"empty url", ""), (b"\x00", b"\x00", "\x00"),
        (rng.choice(urls).encode(), b"L" * 1_500_000, "q"), (b"http://[::1", b"broken ipv6", "q"),
        (b"javascript:alert(1)", b"js", "q"), (rng.choice(urls).encode(), "\u2028 \u0085".encode(), "q"),
    ]
    hostile += [rng.choice(hostile) for _ in range(min(30, len(urls) // 10))]
    rows = list(zip(url_col, cap_col, query_col)) + hostile
    rng.shuffle(rows)
    table = pa.table({"url": pa.array([r[0] for r in rows], pa.binary()),
                      "caption": pa.array([r[1] for r in rows], pa.binary()),
                      "query": pa.array([r[2] for r in rows], pa.string())})
    pq.write_table(table, path, row_group_size=max(1, len(rows) // 4))
    return table.num_rows


def hostile_lists(directory: str, urls: list[str], seed: int,
                  formats: tuple[str, ...] = LIST_FORMATS) -> tuple[dict[str, str], dict[str, int]]:
    """Write `urls` as URL lists in every format (LIST_FORMATS) with hostile lines mixed in.

    Columns url, caption, query. Returns ({format: path}, {format: rows}); rows as defined in the
    module docstring. Deterministic per (urls, seed).
    """
    os.makedirs(directory, exist_ok=True)
    paths, rows = {}, {}
    for fmt in formats:
        rng = random.Random(f"hostile-lists:{seed}:{fmt}")
        path = os.path.join(directory, f"list.{fmt}")
        if fmt == "parquet":
            rows[fmt] = _parquet(path, rng, urls)
        else:
            base = fmt.removesuffix(".gz")
            lines, rows[fmt] = _text_lines(base, rng, urls)
            data = _join(lines, rng)
            if fmt.endswith(".gz"):
                cut = rng.randrange(len(data))
                data = gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0)
            with open(path, "wb") as f:
                f.write(data)
        paths[fmt] = path
    return paths, rows


def count_rows(path: str) -> int:
    """Rows of a list file by the module docstring's definition (a check on the generator itself)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = [line.removesuffix(b"\r") for line in data.split(b"\n")]
    if ".jsonl" in path:
        return sum(1 for line in lines if line.strip(b" "))
    return sum(1 for line in lines if line) - 1  # the header
