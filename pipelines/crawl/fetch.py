"""The crawler's safe HTTP fetcher: one URL in, bytes or a stable reason string out.

Plain Python (no Ray): the crawl stage builds one `SafeFetcher` per worker process and calls `fetch`
from many threads. What must stay true (see docs/ARCHITECTURE.md, "safe by default"):

- only http/https; every hop's host is resolved here and every resolved address checked (private,
  loopback, link-local, multicast, reserved, unspecified, and IPv6 forms that embed such an IPv4
  address) unless it lies in `allow_networks`; the socket then goes to a checked address only, so a
  second DNS answer can never swap the target (DNS rebinding). A kept-alive connection is reused only
  for the same host, port and scheme, and it was opened to a checked address;
- redirects are followed by hand, at most `max_redirects`, each hop checked like the first;
- bodies are capped while streaming (also after gzip/deflate decoding), each HTTP exchange has a total
  wall-clock deadline, and with a `ByteBudget` the bodies held by the process at once are bounded;
- robots.txt (RFC 9309, cached per origin with a TTL and an LRU bound, Crawl-delay honoured per host),
  `X-Robots-Tag: noai/noimageai` and TDM-Rep (`tdm-reservation: 1`) are obeyed;
- failures come back as `FetchResult.reason`, never as exceptions: known failures with their own
  reason, anything else (a bug, a library surprise) as `internal_error` with the exception in `detail`.

Written on the stdlib (http.client, ssl, socket) rather than requests/urllib3 because pinning the
socket to a checked IP while keeping Host/SNI, shutting a socket down at a deadline from another
thread, and reading with single recv calls all need the connection object in hand.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import email.utils
import functools
import heapq
import http.client
import ipaddress
import itertools
import random
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.crawl.robots import RobotsCache, RobotsRules, rules_for_response, tdm_reserved

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> IP address strings. Injectable so tests can map names to 127.0.0.1 without DNS.
Resolver = Callable[[str, int], list[str]]

PRODUCT = "clip-on-ray/0.1"

# Every reason fetch() can return; the crawl stage writes them to the _rejected table as they are.
REASONS = frozenset({
    "ok", "bad_url", "bad_scheme", "dns_error", "dns_timeout", "blocked_address",
    "robots_disallow", "robots_unavailable", "x_robots_noai", "tdm_reserved", "bad_content_type", "too_large",
    "deadline", "timeout", "connection_error", "tls_error", "protocol_error", "incomplete_body",
    "bad_content_encoding", "too_many_redirects", "bad_redirect", "http_429", "http_5xx", "host_busy",
    "memory_wait", "internal_error",
})  # plus "http_<code>" for any other non-200 status, e.g. "http_404"
# Failures worth another try later (a recrawl of a committed crawl retries exactly these).
TRANSIENT = frozenset({
    "deadline", "timeout", "connection_error", "incomplete_body", "dns_error", "dns_timeout", "http_429",
    "http_5xx", "robots_unavailable", "host_busy", "memory_wait",
})
# Failures retried at once inside one fetch (with backoff); the rest of TRANSIENT waits for a recrawl.
_RETRY_NOW = frozenset({"timeout", "connection_error", "incomplete_body", "http_429", "http_5xx"})
# Reasons that a deadline cut-off produces as a side effect; reported as "deadline" when it fired.
_CUT_SHORT = frozenset({"timeout", "connection_error", "tls_error", "protocol_error", "incomplete_body"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

DEFAULT_CONTENT_TYPES = (
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/webp", "image/gif",
    "image/bmp", "image/x-ms-bmp",
)
# Types that say nothing about the content (S3 serves uploads as binary/octet-stream by default).
# Browsers sniff such responses in an <img>; so do we: the image decoder reads the magic bytes and
# accepts only its allowed formats.
DEFAULT_SNIFF_CONTENT_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/x-octet-stream",
                               "application/binary", "application/unknown")
# X-Robots-Tag directives that carry a value after a colon: "unavailable_after: <date>" is not a
# user-agent scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # RFC 9309 product-token characters
_HOST_RE = re.compile(r"^[a-z0-9_.-]+$")
# Characters left as they are when a URL path goes on the request line; `%` keeps existing escapes.
_PATH_SAFE = "/?=&;:@!$'()*+,~-._%[]"


@dataclass(frozen=True)
class FetchConfig:
    #: Product token ending the User-Agent; matched against robots.txt groups and scoped
    #: X-Robots-Tag ("mybot: noai"). Letters, digits, "-" and "_" only.
    user_agent_token: str = "clip-on-ray-bot"
    #: Where site owners learn about the crawler and how to opt out; goes in the User-Agent.
    contact_url: str = "https://github.com/clip-on-ray/clip-on-ray#crawler"
    #: Largest body accepted, in bytes; enforced while streaming, from Content-Length, and on the
    #: decoded size of a gzip/deflate body.
    max_bytes: int = 8 * 1024 * 1024
    #: Wall-clock budget of one HTTP exchange: connect + TLS + headers + body. Retries and
    #: redirect hops each get a fresh one; waiting for a per-host slot is not counted. So one
    #: fetch() is bounded by about (max_redirects+1) * (max_retries+1) * deadline_s plus backoffs.
    deadline_s: float = 20.0
    connect_timeout_s: float = 5.0
    #: Longest silence tolerated on one socket read (a shorter, retryable "timeout").
    read_timeout_s: float = 10.0
    #: Budget for one DNS lookup (the system resolver has no timeout of its own).
    dns_timeout_s: float = 5.0
    #: Threads doing DNS lookups; a lookup queued behind busy ones spends its dns_timeout_s
    #: waiting, so keep this near the number of fetching threads.
    dns_workers: int = 32
    #: Seconds a successful DNS answer is reused (0 = look up every time). Failures are not cached.
    dns_cache_s: float = 300.0
    max_redirects: int = 5
    #: Extra attempts after a transient failure (timeout, connection error, 429, 5xx).
    max_retries: int = 2
    #: Backoff before retry n is base * 2**(n-1), capped at backoff_max_s, times a jitter in [0.5, 1).
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    #: A Retry-After longer than this gives up instead of sleeping.
    max_retry_after_s: float = 10.0
    #: Media types accepted (parameters like "; charset" ignored). Empty = anything.
    allowed_content_types: tuple[str, ...] = DEFAULT_CONTENT_TYPES
    #: Media types that say nothing ("" = header missing): accepted, the image decoder decides by
    #: the bytes themselves, as a browser does. Empty = refuse them as bad_content_type.
    sniff_content_types: tuple[str, ...] = DEFAULT_SNIFF_CONTENT_TYPES
    #: CIDRs exempt from the address block list, e.g. ("127.0.0.1/32",) for a test server.
    allow_networks: tuple[str, ...] = ()
    respect_robots_txt: bool = True
    #: robots.txt bytes parsed (RFC 9309 asks for at least 500 KiB); the rest is ignored, not refused.
    robots_max_bytes: int = 512 * 1024
    #: Seconds a fetched robots.txt is trusted (RFC 9309: not more than 24 hours).
    robots_ttl_s: float = 24 * 3600.0
    #: Seconds an unreachable robots.txt (5xx, 429, network error) blocks its origin before the next try.
    robots_unavailable_ttl_s: float = 600.0
    #: Origins whose robots.txt is cached per process (least recently used dropped first).
    robots_cache_size: int = 10_000
    respect_x_robots_tag: bool = True
    #: X-Robots-Tag directives that opt an image out of AI training.
    x_robots_opt_outs: tuple[str, ...] = ("noai", "noimageai")
    #: W3C TDM Reservation Protocol: a `tdm-reservation: 1` response header reserves text and data
    #: mining rights, which we treat as an opt-out.
    respect_tdm_rep: bool = True
    #: Concurrent exchanges per host name, across all threads of this fetcher.
    max_per_host: int = 4
    #: Minimum gap between the starts of two exchanges with the same host; a robots.txt Crawl-delay
    #: for our token raises it for that host.
    min_host_interval_s: float = 0.0
    #: Longest wait for a per-host slot (max_per_host, Crawl-delay). Past it the row is refused as
    #: "host_busy" (transient: a recrawl retries it) instead of holding a thread.
    max_host_wait_s: float = 60.0
    #: Idle kept-alive connections per host (0 = one connection per exchange, "Connection: close").
    keepalive_per_host: int = 4
    #: Seconds an idle kept-alive connection is kept.
    keepalive_idle_s: float = 15.0
    #: Extra CA bundle for https (None = the system store).
    ca_file: str | None = None
    #: Seed for the backoff jitter (None = fresh randomness).
    seed: int | None = None

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen config hashable.
        for name in ("allowed_content_types", "sniff_content_types", "allow_networks", "x_robots_opt_outs"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"FetchConfig.{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not _TOKEN_RE.match(self.user_agent_token):
            raise ValueError(f"FetchConfig.user_agent_token must match {_TOKEN_RE.pattern}, "
                             f"got {self.user_agent_token!r}")
        if not self.contact_url.startswith(("http://", "https://")) or any(c.isspace() for c in self.contact_url):
            raise ValueError(f"FetchConfig.contact_url must be an http(s) URL without spaces, got {self.contact_url!r}")
        for name in ("max_bytes", "robots_max_bytes", "max_per_host", "dns_workers", "robots_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("deadline_s", "connect_timeout_s", "read_timeout_s", "dns_timeout_s", "robots_ttl_s",
                     "robots_unavailable_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_redirects", "max_retries", "backoff_base_s", "backoff_max_s", "max_retry_after_s",
                     "min_host_interval_s", "max_host_wait_s", "keepalive_per_host", "keepalive_idle_s",
                     "dns_cache_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("allowed_content_types", "sniff_content_types"):
            for ctype in getattr(self, name):
                if ctype != ctype.strip().lower() or (ctype and ctype.count("/") != 1):
                    raise ValueError(f"FetchConfig.{name}: {ctype!r} is not a lower-case type/subtype")
        self.networks()  # raises on a bad CIDR

    def networks(self) -> tuple[IPNetwork, ...]:
        out = []
        for cidr in self.allow_networks:
            try:
                out.append(ipaddress.ip_network(cidr))
            except ValueError as err:
                raise ValueError(f"FetchConfig.allow_networks: {cidr!r} is not a CIDR network ({err})") from None
        return tuple(out)

    def user_agent(self) -> str:
        return f"{PRODUCT} (+{self.contact_url}) {self.user_agent_token}"


@dataclass(frozen=True)
class FetchResult:
    url: str
    #: The last URL tried: where a redirect chain ended, or the hop that was refused.
    final_url: str
    ok: bool
    body: bytes | None
    content_type: str | None
    status: int | None
    reason: str
    #: HTTP requests sent for this URL, across retries and redirect hops (robots.txt not counted).
    attempts: int
    elapsed: float
    #: A short note for the rejected table (the exception of an internal_error, the encoding refused...).
    detail: str = ""
    #: Bytes of the fetcher's ByteBudget held for `body`; hand them back with `SafeFetcher.release`.
    reserved: int = 0


class ByteBudget:
    """Bytes of response bodies one process holds at once: reserved before a body is read, released
    by the caller once the body has been used. Bounds a crawler's memory whatever its thread count,
    part size or max_bytes, as long as every reservation fits (capacity >= max_bytes)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ByteBudget capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        if n > self.capacity:
            raise ValueError(f"a reservation of {n} bytes can never fit a budget of {self.capacity}")
        end = time.monotonic() + timeout
        with self._cond:
            while self.in_use + n > self.capacity:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self.in_use = max(0, self.in_use - n)
            self._cond.notify_all()


class _Reject(Exception):
    """A fetch failure with its reason; raised internally, always turned into a FetchResult."""

    def __init__(self, reason: str, status: int | None = None, content_type: str | None = None,
                 retry_after: float | None = None, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.status, self.content_type, self.retry_after = reason, status, content_type, retry_after
        self.detail = detail


@dataclass(frozen=True)
class _Target:
    url: str
    tls: bool
    host: str  # lower-case ASCII name or IP literal, no brackets
    port: int
    path: str  # request target: path and query, percent-encoded

    @property
    def origin(self) -> str:
        scheme, default = ("https", 443) if self.tls else ("http", 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}" if self.port == default else f"{scheme}://{host}:{self.port}"

    @property
    def pool_key(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.tls


@dataclass(frozen=True)
class _Spec:
    """What one fetch accepts: images for callers, anything small for robots.txt."""

    max_bytes: int
    content_types: tuple[str, ...]
    sniff_types: tuple[str, ...]
    robots: bool
    x_robots: bool
    #: robots.txt: keep the first max_bytes and stop instead of refusing the body as too_large.
    truncate: bool = False

    @property
    def accept(self) -> str:
        return ", ".join(self.content_types) or "*/*"


@dataclass
class _Response:
    status: int
    redirect: str | None = None
    content_type: str | None = None
    body: bytes | None = None
    reserved: int = 0


# --------------------------------------------------------------------------- URLs and addresses


def _parse_target(url: object) -> _Target:
    if not isinstance(url, str) or not url.strip():
        raise _Reject("bad_url")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:  # bad port, unbalanced IPv6 brackets
        raise _Reject("bad_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Reject("bad_scheme")
    if not host:
        raise _Reject("bad_url")
    tls = scheme == "https"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        # Lone surrogates cannot go on the wire; anything else is percent-encoded as UTF-8.
        request_path = urllib.parse.quote(path, safe=_PATH_SAFE)
    except UnicodeEncodeError:
        raise _Reject("bad_url") from None
    return _Target(url.strip(), tls, _ascii_host(host), port or (443 if tls else 80), request_path)


def _ascii_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _Reject("bad_url") from None
    if not _HOST_RE.match(name) or len(name) > 253:
        raise _Reject("bad_url")
    return name


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address routes to: mapped, 6to4, Teredo client, NAT64."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        out.append(ip.teredo[1])
    if ip in _NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _is_public(ip: IPAddress) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def address_allowed(ip: IPAddress, allowed: Sequence[IPNetwork] = ()) -> bool:
    """True if a crawler may connect to `ip`: public, or inside an explicitly allowed network."""
    forms = [ip, *_embedded_ipv4(ip)]
    if any(f in net for f in forms for net in allowed):
        return True
    return all(_is_public(f) for f in forms)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# --------------------------------------------------------------------------- header rules


def x_robots_opted_out(values: Sequence[str], token: str, opt_outs: Sequence[str]) -> bool:
    """Does any X-Robots-Tag header value opt this crawler out?

    "noai" applies to everyone; "mybot: noai" only if mybot is our token (a scope runs to the end
    of its header line, Google's format); several headers and comma lists are all read.
    """
    token, blocked = token.lower(), {d.lower() for d in opt_outs}
    for value in values:
        scope = None
        for item in value.split(","):
            name, sep, rest = item.partition(":")
            if sep and name.strip().lower() not in _VALUED_DIRECTIVES:
                scope, item = name.strip().lower(), rest
            if item.strip().lower() in blocked and scope in (None, token):
                return True
    return False


def _media_type(header: str | None) -> str:
    """The lower-case type/subtype of a Content-Type header; "" when missing or blank."""
    if not header:
        return ""
    return header.split(";", 1)[0].strip().lower()


def _retry_after(header: str | None) -> float | None:
    """Seconds a Retry-After header asks for; None when absent or unreadable (RFC 9110: delay-seconds
    are ASCII digits; anything else that is not an HTTP date is ignored, as browsers do)."""
    if not header:
        return None
    header = header.strip()
    if header.isascii() and header.isdigit():
        return float(min(int(header[:12]), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _declared_length(resp: http.client.HTTPResponse) -> int | None:
    """Content-Length as http.client understood it: None for chunked or missing or unreadable."""
    return resp.length if isinstance(resp.length, int) and resp.length >= 0 else None


def _status_reason(status: int) -> str:
    if status == 429:
        return "http_429"
    if 500 <= status <= 599:
        return "http_5xx"
    return f"http_{status}" if 100 <= status <= 999 else "protocol_error"


def _error_reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLError):
        return "tls_error"
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, http.client.IncompleteRead):
        return "incomplete_body"
    if isinstance(err, http.client.HTTPException) and not isinstance(err, ConnectionError):
        return "protocol_error"
    return "connection_error"  # resets, refusals, unreachable networks, RemoteDisconnected


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]


# --------------------------------------------------------------------------- deadline and politeness


class _Watchdog:
    """One thread that shuts a socket down when its exchange's deadline passes.

    Per-read timeouts alone cannot bound an exchange: a server trickling one byte per second
    never trips them. A shutdown makes the blocked recv return at once, in any phase (TLS
    handshake, headers, body). The owner must `release` before closing or reusing the socket.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, socket.socket] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            token = next(self._ids)
            self._live[token] = sock
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            if earliest:  # the thread sleeps until the earliest deadline; a later one needs no wake-up
                self._cond.notify()
            return token

    def swap(self, token: int, sock: socket.socket) -> None:
        with self._cond:
            if token in self._live:
                self._live[token] = sock
            elif token in self._fired:
                _shutdown(sock)

    def release(self, token: int | None) -> bool:
        """Stop watching; True if the deadline had already fired."""
        with self._cond:
            self._live.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, token = heapq.heappop(self._heap)
                    sock = self._live.pop(token, None)
                    if sock is not None:
                        self._fired.add(token)
                        _shutdown(sock)
                # Released tokens stay in the heap until their time: drop them in bulk when they pile up.
                if len(self._heap) > 4 * len(self._live) + 1024:
                    self._heap = [(d, t) for d, t in self._heap if t in self._live]
                    heapq.heapify(self._heap)
                self._cond.wait(timeout=self._heap[0][0] - now if self._heap else None)


def _shutdown(sock: socket.socket) -> None:
    try:
        # socket.socket's own method, not SSLSocket.shutdown: that one also drops the SSL object
        # under the feet of the thread reading from it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing left to interrupt


class _HostGate:
    """At most `limit` exchanges in flight per host, starts at least the host's interval apart
    (the configured minimum, raised by a robots.txt Crawl-delay). A caller that would wait longer
    than `max_wait` is refused ("host_busy") rather than holding its thread. Each host has its own
    condition on one shared lock, so a release wakes one waiter of that host, not every thread."""

    class _Host:
        __slots__ = ("active", "waiting", "next_start", "cond")

        def __init__(self, lock: threading.Lock) -> None:
            self.active = self.waiting = 0
            self.next_start = 0.0
            self.cond = threading.Condition(lock)

    def __init__(self, limit: int, interval: float, max_wait: float) -> None:
        self._limit, self._interval, self._max_wait = limit, interval, max_wait
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostGate._Host] = {}
        self._delays: collections.OrderedDict[str, float] = collections.OrderedDict()

    def set_delay(self, host: str, seconds: float) -> None:
        with self._lock:
            self._delays[host] = seconds
            self._delays.move_to_end(host)
            while len(self._delays) > 65536:  # a bound over millions of hosts
                self._delays.popitem(last=False)

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        give_up = time.monotonic() + self._max_wait
        with self._lock:
            state = self._hosts.get(host)
            if state is None:
                state = self._hosts[host] = self._Host(self._lock)
            state.waiting += 1
            try:
                while True:
                    now = time.monotonic()
                    if state.active < self._limit and now >= state.next_start:
                        break
                    if max(now, state.next_start) > give_up:
                        raise _Reject("host_busy", detail=f"no slot for {host} within {self._max_wait:g} s")
                    until = min(give_up, state.next_start) if now < state.next_start else give_up
                    state.cond.wait(timeout=until - now)
            finally:
                state.waiting -= 1
            state.active += 1
            interval = max(self._interval, self._delays.get(host, 0.0))
            if interval:
                state.next_start = now + interval
        try:
            yield
        finally:
            self._release(host, state)

    def _release(self, host: str, state: _HostGate._Host) -> None:
        with self._lock:
            state.active -= 1
            if state.waiting:
                state.cond.notify()
            if len(self._hosts) > 4096:  # keep memory flat over millions of hosts
                now = time.monotonic()
                self._hosts = {h: s for h, s in self._hosts.items()
                               if s.active or s.waiting or s.next_start > now}


class _DnsCache:
    """Successful answers per (host, port) for `ttl` seconds, at most `size` entries (oldest dropped)."""

    def __init__(self, ttl: float, size: int = 65536) -> None:
        self._ttl, self._size = ttl, size
        self._lock = threading.Lock()
        self._answers: collections.OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = \
            collections.OrderedDict()

    def get(self, key: tuple[str, int]) -> list[IPAddress] | None:
        with self._lock:
            hit = self._answers.get(key)
            if hit is None or hit[0] < time.monotonic():
                return None
            return hit[1]

    def put(self, key: tuple[str, int], ips: list[IPAddress]) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            self._answers[key] = (time.monotonic() + self._ttl, ips)
            self._answers.move_to_end(key)
            while len(self._answers) > self._size:
                self._answers.popitem(last=False)


# --------------------------------------------------------------------------- the connection


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to pre-checked addresses that speaks to the URL's host name.

    The Host header and TLS SNI/certificate check use `target.host`; the socket goes only to
    `ips`, which were checked before, so no second DNS lookup happens between check and use.
    It may carry several exchanges (keep-alive); each is armed with its own deadline.
    """

    def __init__(self, target: _Target, ips: Sequence[IPAddress], cfg: FetchConfig, watchdog: _Watchdog,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(target.host, target.port, timeout=cfg.read_timeout_s)
        if target.tls:
            self.default_port = 443  # so the Host header omits :443 like a browser does
        self._ips, self._cfg, self._watchdog, self._tls = ips, cfg, watchdog, tls
        self._deadline = 0.0
        self.watch_token: int | None = None
        # http.client drops self.sock once a response owns the connection; keep our own handle
        # for per-read timeouts, the watchdog and reuse.
        self.live_sock: socket.socket | None = None
        self.idle_since = 0.0

    def arm(self, deadline: float) -> None:
        """Start an exchange: a fresh deadline, watched on the already open socket if there is one."""
        self._deadline = deadline
        if self.live_sock is not None:
            self.watch_token = self._watchdog.watch(self.live_sock, deadline)
            self.before_read()

    def disarm(self) -> bool:
        """End an exchange; True if its deadline fired (the socket is then shut down)."""
        fired = self._watchdog.release(self.watch_token)
        self.watch_token = None
        return fired

    def op_timeout(self) -> float:
        return max(0.001, min(self._cfg.read_timeout_s, self._deadline - time.monotonic()))

    def before_read(self) -> None:
        """Per-read timeout, and an immediate ACK for what arrived: a server with Nagle's algorithm on
        (Python's http.server, many small servers) holds a response body until its headers are ACKed,
        and on a kept-alive connection Linux delays that ACK by up to 40 ms (measured: 203 vs 1,347
        requests/s against such a server). TCP_QUICKACK is reset by the kernel, so it is set per read."""
        sock = self.live_sock
        if sock is None:
            return
        sock.settimeout(self.op_timeout())
        if _QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass  # not TCP (TLS wraps a TCP socket, so this only skips odd cases)

    def connect(self) -> None:
        sock = self._open_socket()
        self.sock = self.live_sock = sock
        self.watch_token = self._watchdog.watch(sock, self._deadline)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
            self.sock = self.live_sock = sock
            self._watchdog.swap(self.watch_token, sock)
            sock.settimeout(self.op_timeout())
            sock.do_handshake()
        self.before_read()

    def close(self) -> None:
        super().close()
        if self.live_sock is not None:
            with contextlib.suppress(OSError):
                self.live_sock.close()
            self.live_sock = None

    def looks_alive(self) -> bool:
        """An idle keep-alive socket must have nothing to read: readable means EOF or stray bytes."""
        sock = self.live_sock
        if sock is None or self.sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _open_socket(self) -> socket.socket:
        last: OSError = TimeoutError("deadline passed before connecting")
        for ip in self._ips:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                timeout = min(self._cfg.connect_timeout_s, remaining)
                sock = socket.create_connection((str(ip), self.port), timeout=timeout)
            except OSError as err:
                last = err
                continue
            sock.settimeout(self.op_timeout())
            return sock
        raise last


class _Pool:
    """Idle kept-alive connections per (host, port, tls): newest first, expired or dead ones dropped."""

    def __init__(self, per_key: int, idle_s: float, total: int = 512) -> None:
        self._per_key, self._idle_s, self._total = per_key, idle_s, total
        self._lock = threading.Lock()
        self._idle: collections.OrderedDict[tuple, list[_PinnedConnection]] = collections.OrderedDict()
        self._count = 0

    def take(self, key: tuple) -> _PinnedConnection | None:
        while True:
            with self._lock:
                stack = self._idle.get(key)
                if not stack:
                    return None
                conn = stack.pop()
                self._count -= 1
                if not stack:
                    del self._idle[key]
            if time.monotonic() - conn.idle_since < self._idle_s and conn.looks_alive():
                return conn
            conn.close()

    def give(self, key: tuple, conn: _PinnedConnection) -> None:
        if self._per_key == 0:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        evicted: list[_PinnedConnection] = []
        with self._lock:
            stack = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(stack) >= self._per_key:
                evicted.append(stack.pop(0))
                self._count -= 1
            stack.append(conn)
            self._count += 1
            while self._count > self._total:
                old_key, old = next(iter(self._idle.items()))
                evicted.append(old.pop(0))
                self._count -= 1
                if not old:
                    del self._idle[old_key]
        for c in evicted:
            c.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for stack in self._idle.values() for c in stack]
            self._idle.clear()
            self._count = 0
        for c in conns:
            c.close()


# --------------------------------------------------------------------------- the fetcher


class SafeFetcher:
    """Thread-safe: share one per process and call fetch() from many threads. close() when done.

    Holds threads, locks, caches and sockets, so it is not picklable: ship the FetchConfig to a Ray
    worker and build the fetcher there (in the actor's __init__), once per process. With a
    `budget`, every ok result holds `result.reserved` bytes of it until `release(result)`.
    """

    def __init__(self, cfg: FetchConfig, resolver: Resolver | None = None, budget: ByteBudget | None = None) -> None:
        self.cfg = cfg
        self._resolver = resolver or system_resolver
        self._networks = cfg.networks()
        self._budget = budget
        if budget is not None and budget.capacity < max(cfg.max_bytes, cfg.robots_max_bytes):
            raise ValueError(f"the fetch memory budget ({budget.capacity} bytes) must hold at least one body of "
                             f"fetch.max_bytes ({cfg.max_bytes})")
        keepalive = cfg.keepalive_per_host > 0
        self._headers = {"User-Agent": cfg.user_agent(), "Connection": "keep-alive" if keepalive else "close"}
        self._watchdog = _Watchdog()
        self._gate = _HostGate(cfg.max_per_host, cfg.min_host_interval_s, cfg.max_host_wait_s)
        self._pool = _Pool(min(cfg.keepalive_per_host, cfg.max_per_host), cfg.keepalive_idle_s)
        self._dns = cf.ThreadPoolExecutor(max_workers=cfg.dns_workers, thread_name_prefix="fetch-dns")
        self._dns_cache = _DnsCache(cfg.dns_cache_s)
        self._robots = RobotsCache(ttl_s=cfg.robots_ttl_s, unavailable_ttl_s=cfg.robots_unavailable_ttl_s,
                                   max_entries=cfg.robots_cache_size)
        self._rng = random.Random(cfg.seed)
        self._rng_lock = threading.Lock()
        self._image_spec = _Spec(cfg.max_bytes, cfg.allowed_content_types, cfg.sniff_content_types,
                                 cfg.respect_robots_txt, cfg.respect_x_robots_tag)
        self._robots_spec = _Spec(cfg.robots_max_bytes, (), (), robots=False, x_robots=False, truncate=True)

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        # Built on first https use: loading the CA store costs ~0.1 s. A race builds it twice, harmlessly.
        return ssl.create_default_context(cafile=self.cfg.ca_file)

    def __enter__(self) -> SafeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._dns.shutdown(wait=False, cancel_futures=True)
        self._pool.close()
        self._watchdog.stop()

    def fetch(self, url: str) -> FetchResult:
        """Never raises: a bug or a library surprise comes back as reason "internal_error"."""
        return self._fetch(url, self._image_spec)

    def release(self, result: FetchResult) -> None:
        """Give back the budget bytes an ok result holds for its body (no-op without a budget)."""
        if self._budget is not None:
            self._budget.release(result.reserved)

    def fetch_many(self, urls: Sequence[str], max_workers: int = 16) -> list[FetchResult]:
        """Results in the order of `urls`. Holds every body at once: for small batches and tests; the
        crawl streams instead (fetch, use, release)."""
        if max_workers < 1:
            raise ValueError(f"fetch_many: max_workers must be >= 1, got {max_workers!r}")
        if not urls:
            return []
        with cf.ThreadPoolExecutor(max_workers=min(max_workers, len(urls)), thread_name_prefix="fetch") as pool:
            results = list(pool.map(self.fetch, urls))
        for r in results:
            self.release(r)
        return results

    def _fetch(self, url: str, spec: _Spec) -> FetchResult:
        start = time.monotonic()
        attempts = [0]  # a cell the retry loop counts into, also when it raises
        current = url
        try:
            for _ in range(self.cfg.max_redirects + 1):
                target = _parse_target(current)
                ips = self._resolve(target)
                if spec.robots:
                    self._check_robots(target)
                resp = self._exchange_with_retries(target, ips, spec, attempts)
                if resp.redirect is None:
                    return FetchResult(url, current, True, resp.body, resp.content_type, resp.status, "ok",
                                       attempts[0], time.monotonic() - start, reserved=resp.reserved)
                try:
                    current = urllib.parse.urljoin(target.url, resp.redirect)
                except ValueError:  # e.g. "http://[::1" - urljoin parses the netloc
                    raise _Reject("bad_redirect", status=resp.status, detail=resp.redirect[:200]) from None
            raise _Reject("too_many_redirects", status=resp.status)
        except _Reject as rej:
            return FetchResult(url, current, False, None, rej.content_type, rej.status, rej.reason,
                               attempts[0], time.monotonic() - start, rej.detail)
        except Exception as err:  # the safety net: a row never stops a crawl
            return FetchResult(url, current if isinstance(current, str) else "", False, None, None, None,
                               "internal_error", attempts[0], time.monotonic() - start, _short(err))

    def _resolve(self, target: _Target) -> list[IPAddress]:
        try:
            ips = [ipaddress.ip_address(target.host)]
        except ValueError:
            ips = self._lookup(target)
        if not ips:
            raise _Reject("dns_error")
        # Every answer must pass: a name that also points inside the network is not crawled.
        if not all(address_allowed(ip, self._networks) for ip in ips):
            raise _Reject("blocked_address")
        return ips

    def _lookup(self, target: _Target) -> list[IPAddress]:
        key = (target.host, target.port)
        cached = self._dns_cache.get(key)
        if cached is not None:
            return cached
        future = self._dns.submit(self._resolver, target.host, target.port)
        try:
            names = future.result(timeout=self.cfg.dns_timeout_s)
        except cf.TimeoutError:
            raise _Reject("dns_timeout") from None
        except (OSError, UnicodeError):  # socket.gaierror is an OSError
            raise _Reject("dns_error") from None
        try:
            ips = [ipaddress.ip_address(name) for name in names]
        except ValueError:
            raise _Reject("dns_error") from None
        self._dns_cache.put(key, ips)
        return ips

    def _exchange_with_retries(self, target: _Target, ips: list[IPAddress], spec: _Spec,
                               attempts: list[int]) -> _Response:
        for attempt in itertools.count(1):
            with self._gate.slot(target.host):
                attempts[0] += 1
                try:
                    return self._exchange(target, ips, spec)
                except _Reject as rej:
                    failure = rej
            if attempt > self.cfg.max_retries or failure.reason not in _RETRY_NOW:
                raise failure
            wait = self._backoff(attempt, failure.retry_after)
            if wait is None:
                raise failure
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        with self._rng_lock:
            delay *= self._rng.uniform(0.5, 1.0)
        if retry_after is None:
            return delay
        if retry_after > self.cfg.max_retry_after_s:
            return None  # the server asks for a longer pause than a crawl thread should hold
        return max(delay, retry_after)

    def _exchange(self, target: _Target, ips: list[IPAddress], spec: _Spec) -> _Response:
        conn = self._pool.take(target.pool_key)
        if conn is not None:
            try:
                return self._exchange_on(conn, target, spec, reused=True)
            except _StaleConnection:
                pass  # the server closed the idle connection before our request: a fresh one, not a retry
        conn = _PinnedConnection(target, ips, self.cfg, self._watchdog, self._tls if target.tls else None)
        return self._exchange_on(conn, target, spec, reused=False)

    def _exchange_on(self, conn: _PinnedConnection, target: _Target, spec: _Spec, reused: bool) -> _Response:
        # The body's worst case is reserved before the request goes out (so no connection sits idle
        # waiting for memory), then shrunk to the declared length and to what arrived.
        state: dict[str, Any] = {"status_seen": False, "reusable": False, "held": self._hold(spec.max_bytes)}
        deadline = time.monotonic() + self.cfg.deadline_s
        conn.arm(deadline)
        response: _Response | None = None
        failure: _Reject | None = None
        try:
            response = self._talk(conn, target, spec, deadline, state)
        except (OSError, http.client.HTTPException) as err:
            if reused and not state["status_seen"] and isinstance(err, (ConnectionError, http.client.BadStatusLine)):
                failure = _StaleConnection()
            else:
                failure = _Reject(_error_reason(err), detail=_short(err))
        except _Reject as rej:
            failure = rej
        except BaseException:
            conn.disarm()
            conn.close()
            self._release_bytes(state["held"])
            raise
        fired = conn.disarm()
        if fired or failure is not None or not state["reusable"]:
            conn.close()
        else:
            self._pool.give(target.pool_key, conn)
        if fired or failure is not None or response is None or response.body is None:
            self._release_bytes(state["held"])  # only a body that is handed out keeps its bytes
            if response is not None:
                response.reserved = 0
        # Once the socket was shut down nothing read after it can be trusted: http.client takes
        # the EOF for the end of the headers or of a close-delimited body and would report success.
        if fired or (failure is not None and failure.reason in _CUT_SHORT and time.monotonic() >= deadline):
            raise _Reject("deadline")
        if failure is not None:
            raise failure
        assert response is not None
        return response

    def _talk(self, conn: _PinnedConnection, target: _Target, spec: _Spec, deadline: float,
              state: dict[str, Any]) -> _Response:
        if conn.live_sock is None:
            conn.connect()
        conn.request("GET", target.path, headers={**self._headers, "Accept": spec.accept})
        resp = conn.getresponse()
        state["status_seen"] = True
        status = resp.status
        if status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location or not location.strip():
                raise _Reject("bad_redirect", status=status)
            return _Response(status, redirect=location.strip())
        if status != 200:
            retry_after = _retry_after(resp.getheader("Retry-After"))
            raise _Reject(_status_reason(status), status=status, retry_after=retry_after)
        ctype = _media_type(resp.getheader("Content-Type"))
        self._check_opt_outs(resp, spec, status, ctype)
        if spec.content_types and ctype not in spec.content_types and ctype not in spec.sniff_types:
            raise _Reject("bad_content_type", status=status, content_type=ctype or None)
        decoder = _body_decoder(resp.getheader("Content-Encoding"), status, ctype)
        declared = _declared_length(resp)
        if declared is not None and declared > spec.max_bytes and not spec.truncate and decoder is None:
            raise _Reject("too_large", status=status, content_type=ctype)  # before reading a byte
        if declared is not None and decoder is None:
            self._shrink(state, declared)
        body = self._read_capped(conn, resp, spec, deadline, status, ctype, decoder)
        self._shrink(state, len(body))
        # read1 never closes a Content-Length response by itself: length 0 means the body is all here.
        done = resp.isclosed() or resp.length == 0
        if done:
            resp.close()  # frees http.client's hold on the connection; the socket stays open
        state["reusable"] = done and not resp.will_close
        return _Response(status, content_type=ctype, body=body, reserved=state["held"])

    def _check_opt_outs(self, resp: http.client.HTTPResponse, spec: _Spec, status: int, ctype: str) -> None:
        if not spec.x_robots:
            return
        if self.cfg.respect_x_robots_tag and x_robots_opted_out(
                resp.headers.get_all("X-Robots-Tag") or [], self.cfg.user_agent_token, self.cfg.x_robots_opt_outs):
            raise _Reject("x_robots_noai", status=status, content_type=ctype)
        if self.cfg.respect_tdm_rep and tdm_reserved(resp.headers.get_all("tdm-reservation") or []):
            raise _Reject("tdm_reserved", status=status, content_type=ctype)

    def _hold(self, n: int) -> int:
        """Reserve n budget bytes for a body, waiting while other bodies are being used; 0 without a budget."""
        if self._budget is None:
            return 0
        # Holders give their bytes back once a body is decoded (milliseconds), so a long wait means the
        # process is overloaded: a transient reason that a recrawl retries, not a hang.
        if not self._budget.acquire(n, timeout=4 * self.cfg.deadline_s):
            raise _Reject("memory_wait", detail=f"no {n} bytes free in the fetch memory budget")
        return n

    def _shrink(self, state: dict[str, Any], n: int) -> None:
        if n < state["held"]:
            self._release_bytes(state["held"] - n)
            state["held"] = n

    def _release_bytes(self, n: int) -> None:
        if self._budget is not None:
            self._budget.release(n)

    def _read_capped(self, conn: _PinnedConnection, resp: http.client.HTTPResponse, spec: _Spec, deadline: float,
                     status: int, ctype: str, decoder: _Decoder | None) -> bytes:
        declared = _declared_length(resp)
        if decoder is None and declared is not None and declared <= spec.max_bytes:
            return self._read_declared(conn, resp, declared, deadline, status, ctype)
        chunks, total = [], 0
        cap = spec.max_bytes
        while True:
            if time.monotonic() >= deadline:
                raise _Reject("deadline", status=status, content_type=ctype)
            conn.before_read()
            # read1 = at most one recv, so the deadline is checked between every arriving chunk
            try:
                raw = resp.read1(65536 if decoder is not None else min(65536, cap + 1 - total))
            except ValueError as err:  # http.client's chunked reader: a chunk size that is not hex
                raise _Reject("protocol_error", status=status, content_type=ctype, detail=_short(err)) from None
            if not raw:
                break
            chunk = decoder.feed(raw, cap + 1 - total) if decoder is not None else raw
            total += len(chunk)
            if total > cap:
                if spec.truncate:
                    chunks.append(chunk[: len(chunk) - (total - cap)])
                    return b"".join(chunks)  # robots.txt: the first max_bytes count, the rest is ignored
                raise _Reject("too_large", status=status, content_type=ctype)
            chunks.append(chunk)
        if resp.length:  # http.client counts down the declared length; bytes still owed = cut off
            raise _Reject("incomplete_body", status=status, content_type=ctype)
        if decoder is not None:
            decoder.finish()
        return b"".join(chunks)

    def _read_declared(self, conn: _PinnedConnection, resp: http.client.HTTPResponse, length: int, deadline: float,
                       status: int, ctype: str) -> bytes:
        """A body of known length read into one buffer of that size: no pile of 64 KiB chunks for the
        allocator to keep around per thread, one copy at the end instead of a join."""
        buf = bytearray(length)
        view = memoryview(buf)
        pos = 0
        while pos < length:
            if time.monotonic() >= deadline:
                raise _Reject("deadline", status=status, content_type=ctype)
            conn.before_read()
            n = resp.readinto(view[pos:pos + 65536])
            if not n:
                raise _Reject("incomplete_body", status=status, content_type=ctype)
            pos += n
        view.release()
        return bytes(buf)

    # ----------------------------------------------------------------------- robots.txt

    def _check_robots(self, target: _Target) -> None:
        rules = self._robots.get(target.origin, lambda: self._load_robots(target))
        if rules.unavailable:
            raise _Reject("robots_unavailable")
        if rules.crawl_delay:
            self._gate.set_delay(target.host, rules.crawl_delay)
        if not rules.allowed(target.url):
            raise _Reject("robots_disallow")

    def _load_robots(self, target: _Target) -> RobotsRules:
        # Same safe path as images (address checks, caps, deadline, redirects); RFC 9309's status
        # rules live in robots.rules_for_response.
        result = self._fetch(target.origin + "/robots.txt", self._robots_spec)
        self.release(result)
        token = self.cfg.user_agent_token
        if result.ok:
            body = result.body or b""
            return rules_for_response(200, body, token, truncated=len(body) >= self.cfg.robots_max_bytes)
        if result.reason in ("blocked_address", "bad_url", "bad_scheme", "too_many_redirects", "bad_redirect"):
            # A redirect we must not follow is not a server error: RFC 9309 2.3.1.2 lets a crawler
            # treat a redirect chain it cannot follow like a missing file (4xx: no rules).
            return rules_for_response(404, None, token)
        if result.reason.startswith("http_") and result.status is not None:
            return rules_for_response(result.status, None, token)  # 4xx: no rules; 429/5xx: unavailable
        return rules_for_response(None, None, token)  # unreachable, cut short, garbled: unavailable


class _StaleConnection(_Reject):
    """A kept-alive connection the server had closed before our request: retried on a new one."""

    def __init__(self) -> None:
        super().__init__("connection_error")


# --------------------------------------------------------------------------- content encodings


class _Decoder:
    """gzip/deflate bodies decoded while streaming, output capped (a small body may inflate hugely)."""

    def __init__(self, wbits: int, status: int, ctype: str) -> None:
        self._z = zlib.decompressobj(wbits)
        self._status, self._ctype = status, ctype

    def feed(self, raw: bytes, room: int) -> bytes:
        try:
            # room+1 at most: enough to tell "over the cap" without inflating a bomb
            out = self._z.decompress(self._z.unconsumed_tail + raw, max(1, room))
        except zlib.error as err:
            raise _Reject("bad_content_encoding", status=self._status, content_type=self._ctype,
                          detail=_short(err)) from None
        return out

    def finish(self) -> None:
        if not self._z.eof:
            raise _Reject("bad_content_encoding", status=self._status, content_type=self._ctype,
                          detail="compressed body ends early")


def _body_decoder(header: str | None, status: int, ctype: str) -> _Decoder | None:
    """We ask for identity bodies (no Accept-Encoding); a server that compresses anyway is decoded as a
    browser would, for gzip and deflate. Any other coding is refused with its name."""
    codings = [c.strip().lower() for c in (header or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip"):
        return _Decoder(16 + zlib.MAX_WBITS, status, ctype)
    if len(codings) == 1 and codings[0] == "deflate":
        return _Decoder(32 + zlib.MAX_WBITS, status, ctype)  # zlib-wrapped as RFC 9110 says (or gzip)
    raise _Reject("bad_content_encoding", status=status, content_type=ctype or None,
                  detail=f"Content-Encoding {header!r}"[:200])
