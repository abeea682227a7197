"""SafeFetcher against a real threaded HTTP(S) server on 127.0.0.1 serving images and hostile cases.

Names like "a.test" reach the server through an injected resolver (no DNS leaves the machine);
127.0.0.1/32 is the only allowed private network.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.crawl.fetch import FetchConfig, SafeFetcher, address_allowed, x_robots_opted_out

TOKEN = "testbot"
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"
_FORMATS = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"),
            "gif": ("GIF", "image/gif"), "bmp": ("BMP", "image/bmp")}


def _make_images(n: int = 40) -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        ext = list(_FORMATS)[i % len(_FORMATS)]
        fmt, ctype = _FORMATS[ext]
        pixels = rng.integers(0, 256, (16 + i, 24 + 2 * i, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        out[f"{i}.{ext}"] = (buf.getvalue(), ctype)
    return out


IMAGES = _make_images()


class ServerState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: Counter[tuple[str, str]] = Counter()  # (host name, path without query)
        self.inflight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.starts: list[tuple[str, float]] = []  # (host, monotonic time) of /img/ requests
        self.host_headers: list[str] = []
        self.user_agents: list[str] = []
        self.sni: list[str | None] = []

    def hit(self, host: str, path: str) -> int:
        with self.lock:
            self.hits[(host, path)] += 1
            return self.hits[(host, path)]

    def enter(self, host: str) -> None:
        with self.lock:
            self.inflight[host] += 1
            self.peak[host] = max(self.peak[host], self.inflight[host])

    def leave(self, host: str) -> None:
        with self.lock:
            self.inflight[host] -= 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies are possible: no Content-Length needed
    state: ServerState

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host_header = self.headers.get("Host", "")
        host = host_header.rsplit(":", 1)[0]
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        st = self.state
        with st.lock:
            st.host_headers.append(host_header)
            st.user_agents.append(self.headers.get("User-Agent", ""))
        count = st.hit(host, path)
        try:
            self._route(host, path, params, count)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (cap, deadline)

    def _route(self, host: str, path: str, params: dict[str, list[str]], count: int) -> None:
        if path == "/robots.txt":
            if host.startswith("norobots"):
                return self._send(404, b"no", "text/plain")
            if host.startswith("robots500"):
                return self._send(500, b"oops", "text/plain")
            return self._send(200, ROBOTS_TXT, "text/plain")
        if path.startswith(("/img/", "/private/")):
            return self._image(host, path.rsplit("/", 1)[1], float(params.get("delay", ["0"])[0]))
        if path == "/redirect":
            return self._redirect(params["to"][0])
        if path == "/loop":
            return self._redirect(f"/loop?n={count}")
        if path == "/missing":
            return self._send(404, b"nope", "text/plain")
        if path == "/text":
            return self._send(200, b"<html></html>", "text/html; charset=utf-8")
        if path == "/xrobots":
            return self._image(host, "0.jpg", 0.0, extra=[("X-Robots-Tag", v) for v in params["v"]])
        if path.startswith("/flaky/"):  # 503 once, then the image
            return self._send(503, b"busy", "text/plain") if count == 1 else self._image(host, "1.png", 0.0)
        if path.startswith("/retry-after/"):
            if count == 1:
                return self._send(503, b"busy", "text/plain", extra=[("Retry-After", "1")])
            return self._image(host, "2.webp", 0.0)
        if path == "/retry-after-long":
            return self._send(429, b"slow down", "text/plain", extra=[("Retry-After", "3600")])
        if path.startswith("/reset/"):  # hang up without a response once
            if count == 1:
                self.close_connection = True
                return None
            return self._image(host, "3.gif", 0.0)
        if path == "/big-declared":
            return self._big_declared()
        if path == "/big-stream":
            return self._big_stream()
        if path == "/slow-body":
            return self._slow_body()
        if path == "/slow-headers":
            return self._slow_headers()
        return self._send(404, b"unknown route", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, host: str, name: str, delay: float, extra: list[tuple[str, str]] = ()) -> None:
        with self.state.lock:
            self.state.starts.append((host, time.monotonic()))
        # In-flight is counted strictly inside the client's slot (after its connect, before it
        # gets a byte), so the server's peak can never exceed what the client allowed.
        self.state.enter(host)
        time.sleep(delay)
        self.state.leave(host)
        body, ctype = IMAGES[name]
        self._send(200, body, ctype, extra)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _big_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(50_000_000))
        self.end_headers()
        self.wfile.flush()
        time.sleep(2.0)  # a client that waits for the body would take this long

    def _big_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for _ in range(64):  # 4 MiB, close-delimited
            self.wfile.write(b"\0" * 65536)

    def _slow_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):  # one byte per 50 ms: each read is quick, the whole is not
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.05)

    def _slow_headers(self) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: ")
        for _ in range(1000):
            self.wfile.write(b"a")
            self.wfile.flush()
            time.sleep(0.05)


def _serve(tls: ssl.SSLContext | None = None) -> tuple[ThreadingHTTPServer, ServerState]:
    state = ServerState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.request_queue_size = 128  # a burst of fetch_many connects must not overflow the backlog
    server.daemon_threads = True
    server.server_bind()
    server.server_activate()
    if tls is not None:
        tls.sni_callback = lambda sslobj, name, ctx: state.sni.append(name)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, state


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int, ServerState]]:
    srv, state = _serve()
    yield "127.0.0.1", srv.server_address[1], state
    srv.shutdown()
    srv.server_close()


class FakeDNS:
    """Maps *.test names to 127.0.0.1 (or per-name answers); counts lookups; never touches DNS."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        with self.lock:
            self.calls[host] += 1
            n = self.calls[host]
        if host in self.answers:
            seq = self.answers[host]
            return seq[min(n, len(seq)) - 1]
        if host.endswith(".test"):
            return ["127.0.0.1"]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def make_fetcher(dns: FakeDNS | None = None, **overrides: object) -> SafeFetcher:
    kwargs: dict[str, object] = dict(user_agent_token=TOKEN, allow_networks=["127.0.0.1/32"], deadline_s=5.0,
                                     backoff_base_s=0.02, backoff_max_s=0.1, seed=0)
    kwargs.update(overrides)
    return SafeFetcher(FetchConfig(**kwargs), resolver=dns or FakeDNS())


@pytest.fixture
def fetcher() -> Iterator[SafeFetcher]:
    with make_fetcher() as f:
        yield f


def url(server: tuple[str, int, ServerState], path: str, host: str | None = None) -> str:
    return f"http://{host or server[0]}:{server[1]}{path}"


# --------------------------------------------------------------------------- happy path


def test_fetches_every_image_format_with_identifying_user_agent(server, fetcher) -> None:
    for name in ["0.jpg", "1.png", "2.webp", "3.gif", "4.bmp"]:
        r = fetcher.fetch(url(server, f"/img/{name}"))
        assert (r.ok, r.reason, r.status, r.attempts) == (True, "ok", 200, 1)
        assert r.body == IMAGES[name][0] and r.content_type == IMAGES[name][1]
    ua = server[2].user_agents[-1]
    assert ua.startswith("clip-on-ray/") and ua.endswith(" " + TOKEN) and "(+https://" in ua


def test_connects_to_checked_ip_with_original_host_header(server) -> None:
    # The name resolves to a safe address first and to the metadata address afterwards (a
    # rebinding attack): exactly one lookup must happen, and its answer is used.
    dns = FakeDNS({"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
    with make_fetcher(dns, respect_robots_txt=False) as f:
        r = f.fetch(url(server, "/img/5.jpg", host="rebind.test"))
    assert r.ok and dns.calls["rebind.test"] == 1
    assert f"rebind.test:{server[1]}" in server[2].host_headers


def test_redirect_followed_and_final_url_reported(server, fetcher) -> None:
    target = url(server, "/img/6.png")
    r = fetcher.fetch(url(server, "/redirect?to=" + urllib.parse.quote(target)))
    assert r.ok and r.final_url == target and r.attempts == 2 and r.body == IMAGES["6.png"][0]


# --------------------------------------------------------------------------- refused before any request


@pytest.mark.parametrize("bad", ["file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://example.com/a.jpg",
                                 "javascript:alert(1)", "gopher://127.0.0.1:70/"])
def test_non_http_schemes_refused(fetcher, bad: str) -> None:
    r = fetcher.fetch(bad)
    assert (r.ok, r.reason, r.attempts) == (False, "bad_scheme", 0)


@pytest.mark.parametrize("bad", ["", "http://", "http://exa mple.com/x.jpg", "http://host:99999/", "http://[::1/"])
def test_malformed_urls_refused(fetcher, bad: str) -> None:
    assert fetcher.fetch(bad).reason == "bad_url"


@pytest.mark.parametrize("addr", [
    "169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.2", "0.0.0.0", "224.0.0.1",
    "100.64.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::ffff:127.0.0.2", "2002:a9fe:a9fe::1", "64:ff9b::a00:1",
])
def test_internal_addresses_blocked(addr: str) -> None:
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    assert not address_allowed(ipaddress.ip_address(addr), allowed)


def test_public_and_explicitly_allowed_addresses_pass() -> None:
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    for addr in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "127.0.0.1", "::ffff:127.0.0.1"]:
        assert address_allowed(ipaddress.ip_address(addr), allowed), addr
    assert not address_allowed(ipaddress.ip_address("127.0.0.1"), [])


@pytest.mark.parametrize("bad", ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/",
                                 "http://10.0.0.1:8080/x.jpg", "http://evil.test/x.jpg"])
def test_blocked_addresses_never_contacted(bad: str) -> None:
    dns = FakeDNS({"evil.test": [["93.184.216.34", "10.0.0.5"]]})  # one bad answer taints the name
    with make_fetcher(dns) as f:
        r = f.fetch(bad)
    assert (r.reason, r.attempts) == ("blocked_address", 0)


def test_dns_failure_is_a_reason(fetcher) -> None:
    r = fetcher.fetch("http://no-such-host.invalid/x.jpg")
    assert (r.ok, r.reason) == (False, "dns_error")


@pytest.mark.parametrize("to", ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.2:{port}/img/0.jpg",
                                "http://[::ffff:127.0.0.2]:{port}/img/0.jpg"])
def test_redirect_to_internal_address_blocked(server, fetcher, to: str) -> None:
    target = to.format(port=server[1])
    r = fetcher.fetch(url(server, "/redirect?to=" + urllib.parse.quote(target)))
    assert (r.ok, r.reason, r.final_url, r.attempts) == (False, "blocked_address", target, 1)


def test_redirect_to_file_scheme_refused(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/redirect?to=" + urllib.parse.quote("file:///etc/passwd")))
    assert (r.reason, r.final_url) == ("bad_scheme", "file:///etc/passwd")


def test_redirect_loop_stops(server) -> None:
    with make_fetcher(max_redirects=3) as f:
        r = f.fetch(url(server, "/loop"))
    assert (r.reason, r.attempts) == ("too_many_redirects", 4)


# --------------------------------------------------------------------------- caps and deadline


def test_declared_oversize_body_refused_without_reading(server) -> None:
    with make_fetcher(max_bytes=100_000) as f:
        r = f.fetch(url(server, "/big-declared"))
    assert r.reason == "too_large" and r.elapsed < 0.5  # the server would stall the body for 2 s


def test_undeclared_oversize_body_aborted_while_streaming(server) -> None:
    with make_fetcher(max_bytes=100_000) as f:
        r = f.fetch(url(server, "/big-stream"))
    assert (r.reason, r.body, r.attempts) == ("too_large", None, 1)


def test_slow_trickle_body_hits_total_deadline(server) -> None:
    # Each byte arrives well within read_timeout_s; only a total deadline stops this.
    with make_fetcher(deadline_s=1.0, read_timeout_s=5.0) as f:
        r = f.fetch(url(server, "/slow-body"))
    assert (r.reason, r.attempts) == ("deadline", 1)
    assert 0.9 <= r.elapsed < 1.8


def test_slow_trickle_headers_hit_total_deadline(server) -> None:
    with make_fetcher(deadline_s=1.0, read_timeout_s=5.0) as f:
        r = f.fetch(url(server, "/slow-headers"))
    assert (r.reason, r.attempts) == ("deadline", 1)
    assert 0.9 <= r.elapsed < 1.8


def test_wrong_content_type_refused(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/text"))
    assert (r.reason, r.content_type, r.status) == ("bad_content_type", "text/html", 200)


# --------------------------------------------------------------------------- opt-outs


@pytest.mark.parametrize(("values", "reason"), [
    (["noai"], "x_robots_noai"),
    (["noimageai"], "x_robots_noai"),
    (["noindex, NoAI"], "x_robots_noai"),
    ([f"{TOKEN}: noai"], "x_robots_noai"),
    (["otherbot: noai"], "ok"),
    (["otherbot: noindex", f"{TOKEN}: nofollow, noimageai"], "x_robots_noai"),
    (["noindex", "nofollow"], "ok"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], "ok"),
])
def test_x_robots_tag(server, fetcher, values: list[str], reason: str) -> None:
    query = urllib.parse.urlencode([("v", v) for v in values])
    assert fetcher.fetch(url(server, "/xrobots?" + query)).reason == reason


def test_x_robots_scope_runs_to_end_of_header() -> None:
    assert x_robots_opted_out([f"otherbot: noindex, {TOKEN}: noai"], TOKEN, ["noai"])
    assert not x_robots_opted_out([f"{TOKEN}: noindex, otherbot: noai"], TOKEN, ["noai"])
    assert not x_robots_opted_out(["noai"], TOKEN, [])


def test_robots_txt_disallow(server) -> None:
    with make_fetcher() as f:
        r = f.fetch(url(server, "/private/7.webp", host="disallow.test"))
        ok = f.fetch(url(server, "/img/7.webp", host="disallow.test"))
    assert r.reason == "robots_disallow" and ok.ok
    hits = server[2].hits
    assert hits[("disallow.test", "/private/7.webp")] == 0 and hits[("disallow.test", "/robots.txt")] == 1


def test_robots_txt_404_allows_all_and_5xx_disallows_all(server) -> None:
    with make_fetcher(max_retries=1) as f:
        assert f.fetch(url(server, "/private/8.gif", host="norobots.test")).ok
        assert f.fetch(url(server, "/img/8.gif", host="robots500.test")).reason == "robots_unavailable"
    assert server[2].hits[("robots500.test", "/robots.txt")] == 2  # a 5xx robots.txt is retried too


# --------------------------------------------------------------------------- retries


def test_503_then_success_is_retried(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/flaky/a"))
    assert (r.ok, r.attempts, r.body) == (True, 2, IMAGES["1.png"][0])


def test_404_is_not_retried(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/missing", host="m404.test"))
    assert (r.ok, r.reason, r.status, r.attempts) == (False, "http_404", 404, 1)
    assert server[2].hits[("m404.test", "/missing")] == 1


def test_connection_dropped_once_is_retried(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/reset/a"))
    assert (r.ok, r.attempts) == (True, 2)


def test_retry_after_is_honoured(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/retry-after/a"))
    assert (r.ok, r.attempts) == (True, 2) and r.elapsed >= 0.95


def test_long_retry_after_gives_up(server, fetcher) -> None:
    r = fetcher.fetch(url(server, "/retry-after-long", host="ra.test"))
    assert (r.reason, r.status, r.attempts) == ("http_429", 429, 1)


def test_retries_stop_at_max(server) -> None:
    with make_fetcher(max_retries=2, respect_robots_txt=False) as f:
        r = f.fetch("http://127.0.0.1:1/x.jpg")  # nothing listens on port 1: refused each time
    assert (r.reason, r.attempts) == ("connection_error", 3)


# --------------------------------------------------------------------------- concurrency


def test_fetch_many_order_robots_once_and_per_host_limit(server) -> None:
    hosts = ["c1.test", "c2.test", "c3.test"]
    names = list(IMAGES)
    urls = [url(server, f"/img/{names[i % len(names)]}?delay=0.01", host=hosts[i % 3]) for i in range(210)]
    with make_fetcher(max_per_host=2) as f:
        t0 = time.monotonic()
        results = f.fetch_many(urls, max_workers=16)
        took = time.monotonic() - t0
    assert [r.url for r in results] == urls
    assert all(r.ok for r in results), Counter(r.reason for r in results)
    assert [r.body for r in results] == [IMAGES[names[i % len(names)]][0] for i in range(210)]
    st = server[2]
    for h in hosts:
        assert st.hits[(h, "/robots.txt")] == 1
        assert st.peak[h] == 2, dict(st.peak)  # reached, never exceeded
    assert took < 15, took


def test_min_host_interval_spaces_request_starts(server) -> None:
    urls = [url(server, f"/img/{i}.jpg", host="spaced.test") for i in (0, 5, 10, 15)]
    with make_fetcher(max_per_host=4, min_host_interval_s=0.2) as f:
        assert all(r.ok for r in f.fetch_many(urls, max_workers=4))
    starts = sorted(t for h, t in server[2].starts if h == "spaced.test")
    assert len(starts) == 4
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.15


# --------------------------------------------------------------------------- https


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_uses_sni_and_verifies_the_original_name(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "tls.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv, state = _serve(ctx)
    port = srv.server_address[1]
    try:
        with make_fetcher(ca_file=str(cert)) as f:
            good = f.fetch(f"https://tls.test:{port}/img/9.bmp")
            robots_wrong_name = f.fetch(f"https://other.test:{port}/img/9.bmp")
        with make_fetcher(ca_file=str(cert), respect_robots_txt=False) as f:
            wrong_name = f.fetch(f"https://other.test:{port}/img/9.bmp")
    finally:
        srv.shutdown()
        srv.server_close()
    assert good.ok and good.body == IMAGES["9.bmp"][0]
    assert "tls.test" in state.sni and f"tls.test:{port}" in state.host_headers
    # The certificate is for tls.test only: connecting to the same IP as other.test must fail,
    # first for its robots.txt (unreachable = disallow all), then for the image itself.
    assert robots_wrong_name.reason == "robots_unavailable"
    assert (wrong_name.reason, wrong_name.attempts) == ("tls_error", 1)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"allow_networks": ["127.0.0.1/33"]}, "allow_networks"),
    ({"allow_networks": "127.0.0.1/32"}, "allow_networks"),
    ({"user_agent_token": "my bot"}, "user_agent_token"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"allowed_content_types": ["Image/JPEG"]}, "allowed_content_types"),
    ({"contact_url": "mailto:x@y"}, "contact_url"),
])
def test_config_validation_names_the_field(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FetchConfig(**kwargs)


def test_config_from_yaml_lists_is_hashable() -> None:
    cfg = FetchConfig(allow_networks=["127.0.0.1/32"], allowed_content_types=["image/png"])
    assert cfg.allow_networks == ("127.0.0.1/32",) and hash(cfg) == hash(FetchConfig(**{
        "allow_networks": ("127.0.0.1/32",), "allowed_content_types": ("image/png",)}))


def test_fetch_many_rejects_bad_worker_count(fetcher) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        fetcher.fetch_many(["http://a.test/"], max_workers=0)


# --------------------------------------------------------------------------- keep-alive, budgets, encodings


class KeepAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with Content-Length: connections stay open between requests unless a route closes them."""

    protocol_version = "HTTP/1.1"
    state: ServerState
    connections: Counter

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.connections["opened"] += 1

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        self.state.hit("ka", path)
        extra: list[tuple[str, str]] = [(k[2:], v[0]) for k, v in params.items() if k.startswith("h_")]
        if path == "/robots.txt":
            body = params.get("robots", [""])[0].encode() or b"User-agent: *\nDisallow: /private/\n"
            return self._reply(200, body, "text/plain")
        if path.startswith("/img/"):
            body, ctype = IMAGES[path.rsplit("/", 1)[1]]
            if params.get("ctype"):
                ctype = params["ctype"][0]
            if params.get("gzip"):
                import gzip as gz

                body = gz.compress(body) if params["gzip"][0] != "broken" else b"\x1f\x8b\x08\x00garbage"
                extra.append(("Content-Encoding", "gzip"))
            return self._reply(200, body, ctype, extra)
        if path == "/bomb.gz":  # 20 MB of zeros in ~20 KB of gzip
            import gzip as gz

            return self._reply(200, gz.compress(b"\0" * 20_000_000), "image/png", [("Content-Encoding", "gzip")])
        if path == "/chunked-bad":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"zz\r\nhello\r\n0\r\n\r\n")
            self.close_connection = True
            return None
        return self._reply(404, b"no", "text/plain")

    def _reply(self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def ka_server() -> Iterator[tuple[str, int, ServerState, Counter]]:
    state, connections = ServerState(), Counter()
    handler = type("KA", (KeepAliveHandler,), {"state": state, "connections": connections})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield "127.0.0.1", srv.server_address[1], state, connections
    srv.shutdown()
    srv.server_close()


def test_connections_are_kept_alive_and_reused(ka_server) -> None:
    urls = [url(ka_server, f"/img/{name}") for name in list(IMAGES)[:20]]
    with make_fetcher(max_per_host=2) as f:
        results = [f.fetch(u) for u in urls]  # one thread: every exchange can reuse the one connection
    assert all(r.ok for r in results)
    assert ka_server[3]["opened"] == 1, ka_server[3]  # robots.txt and 20 images over one connection


def test_keepalive_off_opens_one_connection_per_exchange(ka_server) -> None:
    with make_fetcher(keepalive_per_host=0) as f:
        assert all(f.fetch(url(ka_server, f"/img/{n}")).ok for n in list(IMAGES)[:5])
    assert ka_server[3]["opened"] == 6  # robots.txt + 5 images


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(ka_server) -> None:
    with make_fetcher(max_retries=0) as f:
        assert f.fetch(url(ka_server, "/img/0.jpg")).ok
        for conn in [c for stack in f._pool._idle.values() for c in stack]:  # the server hangs up meanwhile
            socket.socket.shutdown(conn.live_sock, socket.SHUT_RDWR)
        again = f.fetch(url(ka_server, "/img/1.png"))
    assert again.ok and again.attempts == 1


def test_byte_budget_bounds_bodies_held_and_is_given_back(ka_server) -> None:
    from pipelines.crawl.fetch import ByteBudget

    budget = ByteBudget(600_000)
    names = list(IMAGES)
    with SafeFetcher(FetchConfig(user_agent_token=TOKEN, allow_networks=("127.0.0.1/32",), max_bytes=500_000,
                                 deadline_s=0.25), resolver=FakeDNS(), budget=budget) as f:
        held = [f.fetch(url(ka_server, f"/img/{n}")) for n in names[:10]]
        assert all(r.ok and r.reserved == len(r.body) for r in held)  # declared length reserved, no more
        assert budget.in_use == sum(len(r.body) for r in held) <= budget.capacity
        for r in held:
            f.release(r)
        assert budget.in_use == 0
        # A body's worst case is reserved before its request goes out; when that cannot be met within
        # a few deadlines the row gets a transient reason, not a hang.
        budget.acquire(budget.capacity, timeout=0)
        waited = f.fetch(url(ka_server, f"/img/{names[11]}"))
        budget.release(budget.capacity)
    assert waited.reason == "memory_wait"
    with pytest.raises(ValueError, match="max_bytes"):
        SafeFetcher(FetchConfig(max_bytes=1_000_000), budget=ByteBudget(10))


def test_gzip_bodies_are_decoded_and_capped(ka_server) -> None:
    with make_fetcher(max_bytes=1_000_000) as f:
        ok = f.fetch(url(ka_server, "/img/0.jpg?gzip=1"))
        broken = f.fetch(url(ka_server, "/img/1.png?gzip=broken"))
        bomb = f.fetch(url(ka_server, "/bomb.gz"))
    assert ok.ok and ok.body == IMAGES["0.jpg"][0]
    assert broken.reason == "bad_content_encoding"
    assert bomb.reason == "too_large"  # 20 MB of zeros never inflated past the 1 MB cap


def test_unknown_content_encoding_is_refused_with_its_name(ka_server) -> None:
    with make_fetcher() as f:
        r = f.fetch(url(ka_server, "/img/0.jpg?h_Content-Encoding=br"))
    assert r.reason == "bad_content_encoding" and "br" in r.detail


@pytest.mark.parametrize(("ctype", "reason"), [
    ("application/octet-stream", "ok"), ("binary/octet-stream", "ok"), ("", "ok"),
    ("text/html", "bad_content_type"), ("IMAGE/JPEG; charset=binary", "ok"),
])
def test_generic_content_types_are_sniffed_like_a_browser(ka_server, ctype: str, reason: str) -> None:
    with make_fetcher() as f:
        r = f.fetch(url(ka_server, "/img/0.jpg?ctype=" + urllib.parse.quote(ctype)))
    assert r.reason == reason


@pytest.mark.parametrize(("value", "reason"), [("1", "tdm_reserved"), ("0", "ok"), ("garbage", "ok")])
def test_tdm_reservation_header_is_an_opt_out(ka_server, value: str, reason: str) -> None:
    with make_fetcher() as f:
        assert f.fetch(url(ka_server, "/img/0.jpg?h_tdm-reservation=" + value)).reason == reason
    with make_fetcher(respect_tdm_rep=False) as f:
        assert f.fetch(url(ka_server, "/img/0.jpg?h_tdm-reservation=1")).ok


def test_broken_chunked_encoding_is_a_reason_not_an_exception(ka_server) -> None:
    with make_fetcher() as f:
        # http.client reports a chunk size that is not hex as a cut-off body
        assert f.fetch(url(ka_server, "/chunked-bad")).reason in ("incomplete_body", "protocol_error")


def test_crawl_delay_spaces_one_hosts_requests_and_busy_hosts_are_refused(tmp_path: Path) -> None:
    class DelayHandler(KeepAliveHandler):
        def do_GET(self) -> None:
            if self.path == "/robots.txt":
                return self._reply(200, f"User-agent: {TOKEN}\nCrawl-delay: 0.3\n".encode(), "text/plain")
            with self.state.lock:
                self.state.starts.append(("d", time.monotonic()))
            return KeepAliveHandler.do_GET(self)

    state = ServerState()
    handler = type("D", (DelayHandler,), {"state": state, "connections": Counter()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    port = srv.server_address[1]
    try:
        urls = [f"http://delay.test:{port}/img/{n}" for n in list(IMAGES)[:4]]
        with make_fetcher() as f:
            results = f.fetch_many(urls, max_workers=4)
        with make_fetcher(max_host_wait_s=0.1) as f:
            busy = f.fetch_many(urls, max_workers=4)
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(r.ok for r in results)
    starts = sorted(t for _, t in state.starts)[:4]
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.25
    assert Counter(r.reason for r in busy)["host_busy"] >= 2  # 0.3 s apart but only 0.1 s of patience


def test_robots_txt_over_the_cap_is_truncated_and_parsed(ka_server) -> None:
    big = "User-agent: *\nDisallow: /private/\n" + "# padding\n" * 20000  # ~200 KB
    with make_fetcher(robots_max_bytes=1024) as f:
        base = url(ka_server, "")
        # ?robots= changes only what /robots.txt returns; the origin (and cache) is the same host
        f._robots.get(f"http://127.0.0.1:{ka_server[1]}", lambda: f._load_robots(
            __import__("pipelines.crawl.fetch", fromlist=["_parse_target"])._parse_target(
                base + "/robots.txt?robots=" + urllib.parse.quote(big))))
        assert f.fetch(url(ka_server, "/private/0.jpg")).reason == "robots_disallow"
        assert f.fetch(url(ka_server, "/img/0.jpg")).ok


def test_a_failing_resolver_becomes_internal_error_not_an_exception() -> None:
    def broken(host: str, port: int) -> list[str]:
        raise RuntimeError("resolver bug")

    with SafeFetcher(FetchConfig(allow_networks=("127.0.0.1/32",)), resolver=broken) as f:
        r = f.fetch("http://broken.test/x.jpg")
    assert (r.ok, r.reason) == (False, "internal_error") and "RuntimeError: resolver bug" in r.detail


@pytest.mark.parametrize("location", ["http://[::1", "http://a:99999/", "http://exa mple.com/", "http://a:b@c:xyz/"])
def test_unparseable_redirect_targets_are_reasons(server, fetcher, location: str) -> None:
    r = fetcher.fetch(url(server, "/redirect?to=" + urllib.parse.quote(location)))
    assert r.reason in ("bad_redirect", "bad_url"), r


@pytest.mark.parametrize("value", ["²", "1e400", "-5", "Wed, 99 Foo 2024", "99999999999999999999999"])
def test_odd_retry_after_values_never_raise(value: str) -> None:
    from pipelines.crawl.fetch import _retry_after

    got = _retry_after(value)
    assert got is None or got >= 0
