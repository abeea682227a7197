"""A loopback web server of image-caption pairs, with the hostile cases a crawler meets on the web.

Used by the demo (the embedded "web") and the tests. Binds 127.0.0.1 only. Images live in memory
under `/img/<n>.<ext>`; the hostile routes are fixed paths (see HOSTILE). `url_list()` returns the
rows of a URL list pointing at it.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb if decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * (width // 8 + 1) * 64, 9)  # a few rows' worth; the rest is missing
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _jpeg(colour=(200, 50, 50), size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


# path -> the reason the crawl must give when it meets it (the tests check each one).
HOSTILE = {
    "/hostile/redirect-metadata.jpg": "blocked_address",
    "/hostile/redirect-loopback.jpg": "blocked_address",
    "/hostile/too-big.jpg": "too_large",
    "/hostile/slow.jpg": "deadline",
    "/hostile/bomb.png": "decompression_bomb",
    "/hostile/wrong-type.jpg": "bad_content_type",
    "/hostile/corrupt.jpg": "undecodable",
    "/hostile/truncated.jpg": "truncated",
    "/hostile/empty.jpg": "empty_body",
    "/hostile/noai.jpg": "x_robots_noai",
    "/private/secret.jpg": "robots_disallow",
    "/hostile/missing.jpg": "http_404",
}


@dataclass
class WebContent:
    images: list[bytes] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    # Bytes the too-big route sends (must exceed the crawler's cap in the test config).
    big_bytes: int = 3 * 1024 * 1024
    slow_seconds: float = 4.0
    # Delay before serving each /img/ response (makes a crawl slow enough to kill midway in tests).
    image_delay_s: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: "LocalWebServer._Server"
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as production servers set it: with Nagle on, a kept-alive connection stalls each
    # response body behind the client's delayed ACK of the headers (40 ms on Linux), which would
    # measure the socket options of this test server, not the crawler.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the crawler hung up on purpose (too-big route, deadline): not a server error

    def do_GET(self) -> None:  # noqa: N802
        web = self.server.owner
        path = self.path.split("?")[0]
        web.hits[path] += 1
        c = web.content
        if path == "/robots.txt":
            return self._send(200, b"User-agent: *\nDisallow: /private/\n", "text/plain")
        if path.startswith("/img/"):
            if c.image_delay_s:
                time.sleep(c.image_delay_s)
            try:
                n = int(path.split("/")[2].split(".")[0])
                body = c.images[n]
            except (ValueError, IndexError):
                return self._send(404, b"no such image", "text/plain")
            return self._send(200, body, "image/png" if body[:4] == b"\x89PNG" else "image/jpeg")
        port = self.server.server_address[1]
        if path == "/hostile/redirect-metadata.jpg":
            return self._send(302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})
        if path == "/hostile/redirect-loopback.jpg":
            return self._send(302, b"", "text/plain", {"Location": f"http://127.0.0.2:{port}/img/0.jpg"})
        if path == "/hostile/too-big.jpg":
            return self._send(200, b"\xff\xd8" + b"\0" * c.big_bytes)
        if path == "/hostile/slow.jpg":
            body = _jpeg()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            end = time.time() + c.slow_seconds
            for i in range(0, len(body), 16):  # a trickle: each read succeeds, the whole never finishes in time
                if time.time() > end:
                    break
                try:
                    self.wfile.write(body[i:i + 16])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.25)
            return
        if path == "/hostile/bomb.png":
            return self._send(200, png_bomb(), "image/png")
        if path == "/hostile/wrong-type.jpg":
            return self._send(200, b"<html><body>not an image</body></html>", "text/html")
        if path == "/hostile/corrupt.jpg":
            return self._send(200, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
        if path == "/hostile/truncated.jpg":
            return self._send(200, _jpeg(size=(64, 64))[:300])
        if path == "/hostile/empty.jpg":
            return self._send(200, b"")
        if path == "/hostile/noai.jpg":
            return self._send(200, _jpeg(), headers={"X-Robots-Tag": "noai"})
        if path == "/private/secret.jpg":
            return self._send(200, _jpeg())
        return self._send(404, b"not found", "text/plain")

    do_HEAD = do_GET


class LocalWebServer:
    """`with LocalWebServer(content) as web: web.base_url` -> http://127.0.0.1:PORT"""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: "LocalWebServer"

        def handle_error(self, request, client_address) -> None:
            # A crawler that hangs up mid-response (the hostile routes provoke it) is routine here: logged, not
            # printed as a traceback on the terminal (socketserver's default).
            logging.getLogger(__name__).debug("request from %s failed", client_address, exc_info=True)

    def __init__(self, content: WebContent, port: int = 0) -> None:
        self.content = content
        self.hits: Counter = Counter()
        self._httpd = self._Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "LocalWebServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def url_list(self, hostile: bool = False) -> list[dict]:
        """Rows for a URL list: every image, and with hostile=True each hostile case plus file:// and data:."""
        c = self.content
        rows = []
        for i, (img, cap) in enumerate(zip(c.images, c.captions)):
            ext = "png" if img[:4] == b"\x89PNG" else "jpg"
            rows.append({"url": f"{self.base_url}/img/{i}.{ext}", "caption": cap,
                         "query": c.queries[i] if i < len(c.queries) else ""})
        if hostile:
            for path in HOSTILE:
                rows.append({"url": f"{self.base_url}{path}", "caption": f"hostile case {path}", "query": "hostile"})
            rows.append({"url": "file:///etc/passwd", "caption": "a local file", "query": "hostile"})
            rows.append({"url": "data:image/png;base64,iVBORw0KGgo=", "caption": "an inline image", "query": "hostile"})
        return rows
