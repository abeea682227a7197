"""The crawler's safe HTTP fetcher: one URL in, bytes or a stable reason string out.

Plain Python (no Ray): the crawl stage builds one `SafeFetcher` per worker and calls `fetch_many`
from inside `map_batches`. What must stay true (see docs/ARCHITECTURE.md, "safe by default"):

- only http/https; every hop's host is resolved once here and every resolved address checked
  (private, loopback, link-local, multicast, reserved, unspecified, and IPv6 forms that embed
  such an IPv4 address) unless it lies in `allow_networks`; the socket then goes to a checked
  address only, so a second DNS answer can never swap the target (DNS rebinding);
- redirects are followed by hand, at most `max_redirects`, each hop checked like the first;
- bodies are capped while streaming and each HTTP exchange has a total wall-clock deadline;
- robots.txt (cached per origin, fetched once) and `X-Robots-Tag: noai/noimageai` are obeyed;
- failures come back as `FetchResult.reason`, never as exceptions. Only network/protocol errors
  are converted; a bug in this module still raises.

Written on the stdlib (http.client, ssl, socket) rather than requests/urllib3 because pinning the
socket to a checked IP while keeping Host/SNI, shutting a socket down at a deadline from another
thread, and reading with single recv calls all need the connection object in hand.
"""

from __future__ import annotations

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
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.robotparser
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> IP address strings. Injectable so tests can map names to 127.0.0.1 without DNS.
Resolver = Callable[[str, int], list[str]]

PRODUCT = "clip-on-ray/0.1"

# Every reason fetch() can return; the crawl stage writes them to the _rejected table as they are.
REASONS = frozenset({
    "ok", "bad_url", "bad_scheme", "dns_error", "dns_timeout", "blocked_address",
    "robots_disallow", "robots_unavailable", "x_robots_noai", "bad_content_type", "too_large",
    "deadline", "timeout", "connection_error", "tls_error", "protocol_error", "incomplete_body",
    "too_many_redirects", "bad_redirect", "http_429", "http_5xx",
})  # plus "http_<code>" for any other non-200 status, e.g. "http_404"
_RETRYABLE = frozenset({"timeout", "connection_error", "incomplete_body", "http_429", "http_5xx"})
# Reasons that a deadline cut-off produces as a side effect; reported as "deadline" when it fired.
_CUT_SHORT = frozenset({"timeout", "connection_error", "tls_error", "protocol_error", "incomplete_body"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

DEFAULT_CONTENT_TYPES = (
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/gif",
    "image/bmp", "image/x-ms-bmp",
)
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
    #: Largest body accepted, in bytes; enforced while streaming and from Content-Length.
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
    #: CIDRs exempt from the address block list, e.g. ("127.0.0.1/32",) for a test server.
    allow_networks: tuple[str, ...] = ()
    respect_robots_txt: bool = True
    robots_max_bytes: int = 512 * 1024
    respect_x_robots_tag: bool = True
    #: X-Robots-Tag directives that opt an image out of AI training.
    x_robots_opt_outs: tuple[str, ...] = ("noai", "noimageai")
    #: Concurrent exchanges per host name, across all threads of this fetcher.
    max_per_host: int = 4
    #: Minimum gap between the starts of two exchanges with the same host.
    min_host_interval_s: float = 0.0
    #: Extra CA bundle for https (None = the system store).
    ca_file: str | None = None
    #: Seed for the backoff jitter (None = fresh randomness).
    seed: int | None = None

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen config hashable.
        for name in ("allowed_content_types", "allow_networks", "x_robots_opt_outs"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"FetchConfig.{name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not _TOKEN_RE.match(self.user_agent_token):
            raise ValueError(f"FetchConfig.user_agent_token must match {_TOKEN_RE.pattern}, "
                             f"got {self.user_agent_token!r}")
        if not self.contact_url.startswith(("http://", "https://")) or any(c.isspace() for c in self.contact_url):
            raise ValueError(f"FetchConfig.contact_url must be an http(s) URL without spaces, got {self.contact_url!r}")
        for name in ("max_bytes", "robots_max_bytes", "max_per_host", "dns_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("deadline_s", "connect_timeout_s", "read_timeout_s", "dns_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_redirects", "max_retries", "backoff_base_s", "backoff_max_s",
                     "max_retry_after_s", "min_host_interval_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for ctype in self.allowed_content_types:
            if ctype != ctype.strip().lower() or ctype.count("/") != 1:
                raise ValueError(f"FetchConfig.allowed_content_types: {ctype!r} is not a lower-case type/subtype")
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


class _Reject(Exception):
    """A fetch failure with its reason; raised internally, always turned into a FetchResult."""

    def __init__(self, reason: str, status: int | None = None, content_type: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.status, self.content_type, self.retry_after = reason, status, content_type, retry_after


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


@dataclass(frozen=True)
class _Spec:
    """What one fetch accepts: images for callers, anything small for robots.txt."""

    max_bytes: int
    content_types: tuple[str, ...]
    robots: bool
    x_robots: bool

    @property
    def accept(self) -> str:
        return ", ".join(self.content_types) or "*/*"


@dataclass(frozen=True)
class _Response:
    status: int
    redirect: str | None = None
    content_type: str | None = None
    body: bytes | None = None


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
    return _Target(url.strip(), tls, _ascii_host(host), port or (443 if tls else 80),
                   urllib.parse.quote(path, safe=_PATH_SAFE))


def _ascii_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _Reject("bad_url") from None
    if not _HOST_RE.match(name):
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


def _media_type(header: str | None) -> str | None:
    if not header:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def _retry_after(header: str | None) -> float | None:
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_reason(status: int) -> str:
    if status == 429:
        return "http_429"
    if 500 <= status <= 599:
        return "http_5xx"
    return f"http_{status}"


def _error_reason(err: OSError | http.client.HTTPException) -> str:
    if isinstance(err, ssl.SSLError):
        return "tls_error"
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, http.client.IncompleteRead):
        return "incomplete_body"
    if isinstance(err, http.client.HTTPException) and not isinstance(err, ConnectionError):
        return "protocol_error"
    return "connection_error"  # resets, refusals, unreachable networks, RemoteDisconnected


# --------------------------------------------------------------------------- deadline and politeness


class _Watchdog:
    """One thread that shuts a socket down when its exchange's deadline passes.

    Per-read timeouts alone cannot bound an exchange: a server trickling one byte per second
    never trips them. A shutdown makes the blocked recv return at once, in any phase (TLS
    handshake, headers, body). The owner must `release` before closing the socket.
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
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
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
                self._cond.wait(timeout=self._heap[0][0] - now if self._heap else None)


def _shutdown(sock: socket.socket) -> None:
    try:
        # socket.socket's own method, not SSLSocket.shutdown: that one also drops the SSL object
        # under the feet of the thread reading from it.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing left to interrupt


class _HostGate:
    """At most `limit` exchanges in flight per host, starts at least `interval` apart."""

    def __init__(self, limit: int, interval: float) -> None:
        self._limit, self._interval = limit, interval
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._next_start: dict[str, float] = {}

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        with self._cond:
            while True:
                now = time.monotonic()
                active, not_before = self._active.get(host, 0), self._next_start.get(host, 0.0)
                if active < self._limit and now >= not_before:
                    break
                self._cond.wait(timeout=not_before - now if now < not_before else None)
            self._active[host] = active + 1
            if self._interval:
                self._next_start[host] = now + self._interval
        try:
            yield
        finally:
            self._release(host)

    def _release(self, host: str) -> None:
        with self._cond:
            left = self._active.pop(host) - 1
            if left:
                self._active[host] = left
            if len(self._next_start) > 4096:  # keep memory flat over millions of hosts
                now = time.monotonic()
                self._next_start = {h: t for h, t in self._next_start.items() if t > now}
            self._cond.notify_all()


# --------------------------------------------------------------------------- the connection


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to pre-checked addresses that speaks to the URL's host name.

    The Host header and TLS SNI/certificate check use `target.host`; the socket goes only to
    `ips`, which were checked before, so no second DNS lookup happens between check and use.
    """

    def __init__(self, target: _Target, ips: Sequence[IPAddress], cfg: FetchConfig, deadline: float,
                 watchdog: _Watchdog, tls: ssl.SSLContext | None) -> None:
        super().__init__(target.host, target.port, timeout=cfg.read_timeout_s)
        if target.tls:
            self.default_port = 443  # so the Host header omits :443 like a browser does
        self._ips, self._cfg, self._deadline, self._watchdog, self._tls = ips, cfg, deadline, watchdog, tls
        self.watch_token: int | None = None
        # http.client drops self.sock once the response owns the connection; keep our own handle
        # for per-read timeouts.
        self.live_sock: socket.socket | None = None

    def op_timeout(self) -> float:
        return max(0.001, min(self._cfg.read_timeout_s, self._deadline - time.monotonic()))

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


# --------------------------------------------------------------------------- the fetcher


class SafeFetcher:
    """Thread-safe: share one per process and call fetch() from many threads. close() when done.

    Holds threads, locks and caches, so it is not picklable: ship the FetchConfig to a Ray worker
    and build the fetcher there (in the actor's __init__), once per process.
    """

    def __init__(self, cfg: FetchConfig, resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        self._resolver = resolver or system_resolver
        self._networks = cfg.networks()
        self._headers = {
            "User-Agent": cfg.user_agent(),
            "Connection": "close",  # one exchange per connection: the deadline and slot cover it all
        }
        self._watchdog = _Watchdog()
        self._gate = _HostGate(cfg.max_per_host, cfg.min_host_interval_s)
        self._dns = cf.ThreadPoolExecutor(max_workers=cfg.dns_workers, thread_name_prefix="fetch-dns")
        self._robots: dict[str, cf.Future[_RobotsRules]] = {}
        self._robots_lock = threading.Lock()
        self._rng = random.Random(cfg.seed)
        self._image_spec = _Spec(cfg.max_bytes, cfg.allowed_content_types, cfg.respect_robots_txt,
                                 cfg.respect_x_robots_tag)
        self._robots_spec = _Spec(cfg.robots_max_bytes, (), robots=False, x_robots=False)

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
        self._watchdog.stop()

    def fetch(self, url: str) -> FetchResult:
        return self._fetch(url, self._image_spec)

    def fetch_many(self, urls: Sequence[str], max_workers: int = 16) -> list[FetchResult]:
        """Results in the order of `urls`."""
        if max_workers < 1:
            raise ValueError(f"fetch_many: max_workers must be >= 1, got {max_workers!r}")
        if not urls:
            return []
        with cf.ThreadPoolExecutor(max_workers=min(max_workers, len(urls)), thread_name_prefix="fetch") as pool:
            return list(pool.map(self.fetch, urls))

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
                                       attempts[0], time.monotonic() - start)
                current = urllib.parse.urljoin(target.url, resp.redirect)
            raise _Reject("too_many_redirects", status=resp.status)
        except _Reject as rej:
            return FetchResult(url, current, False, None, rej.content_type, rej.status, rej.reason,
                               attempts[0], time.monotonic() - start)

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
        future = self._dns.submit(self._resolver, target.host, target.port)
        try:
            names = future.result(timeout=self.cfg.dns_timeout_s)
        except cf.TimeoutError:
            raise _Reject("dns_timeout") from None
        except (OSError, UnicodeError):  # socket.gaierror is an OSError
            raise _Reject("dns_error") from None
        try:
            return [ipaddress.ip_address(name) for name in names]
        except ValueError:
            raise _Reject("dns_error") from None

    def _exchange_with_retries(self, target: _Target, ips: list[IPAddress], spec: _Spec,
                               attempts: list[int]) -> _Response:
        for attempt in itertools.count(1):
            attempts[0] += 1
            with self._gate.slot(target.host):
                try:
                    return self._exchange(target, ips, spec)
                except _Reject as rej:
                    failure = rej
            if attempt > self.cfg.max_retries or failure.reason not in _RETRYABLE:
                raise failure
            wait = self._backoff(attempt, failure.retry_after)
            if wait is None:
                raise failure
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        delay *= self._rng.uniform(0.5, 1.0)
        if retry_after is None:
            return delay
        if retry_after > self.cfg.max_retry_after_s:
            return None  # the server asks for a longer pause than a crawl thread should hold
        return max(delay, retry_after)

    def _exchange(self, target: _Target, ips: list[IPAddress], spec: _Spec) -> _Response:
        deadline = time.monotonic() + self.cfg.deadline_s
        conn = _PinnedConnection(target, ips, self.cfg, deadline, self._watchdog, self._tls if target.tls else None)
        response: _Response | None = None
        failure: _Reject | None = None
        try:
            response = self._talk(conn, target, spec, deadline)
        except (OSError, http.client.HTTPException) as err:
            failure = _Reject(_error_reason(err))
        except _Reject as rej:
            failure = rej
        finally:
            fired = self._watchdog.release(conn.watch_token)
            conn.close()
        # Once the socket was shut down nothing read after it can be trusted: http.client takes
        # the EOF for the end of the headers or of a close-delimited body and would report success.
        if fired or (failure is not None and failure.reason in _CUT_SHORT and time.monotonic() >= deadline):
            raise _Reject("deadline")
        if failure is not None:
            raise failure
        assert response is not None
        return response

    def _talk(self, conn: _PinnedConnection, target: _Target, spec: _Spec, deadline: float) -> _Response:
        conn.connect()
        conn.request("GET", target.path, headers={**self._headers, "Accept": spec.accept})
        resp = conn.getresponse()
        status = resp.status
        if status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise _Reject("bad_redirect", status=status)
            return _Response(status, redirect=location.strip())
        if status != 200:
            retry_after = _retry_after(resp.getheader("Retry-After"))
            raise _Reject(_status_reason(status), status=status, retry_after=retry_after)
        ctype = _media_type(resp.getheader("Content-Type"))
        if spec.x_robots and x_robots_opted_out(resp.headers.get_all("X-Robots-Tag") or [],
                                                 self.cfg.user_agent_token, self.cfg.x_robots_opt_outs):
            raise _Reject("x_robots_noai", status=status, content_type=ctype)
        if spec.content_types and ctype not in spec.content_types:
            raise _Reject("bad_content_type", status=status, content_type=ctype)
        if resp.length is not None and resp.length > spec.max_bytes:
            raise _Reject("too_large", status=status, content_type=ctype)  # before reading a byte
        body = self._read_capped(conn, resp, spec.max_bytes, deadline, status, ctype)
        return _Response(status, content_type=ctype, body=body)

    def _read_capped(self, conn: _PinnedConnection, resp: http.client.HTTPResponse, max_bytes: int,
                     deadline: float, status: int, ctype: str | None) -> bytes:
        chunks, total = [], 0
        while True:
            if time.monotonic() >= deadline:
                raise _Reject("deadline", status=status, content_type=ctype)
            if conn.live_sock is not None:
                conn.live_sock.settimeout(conn.op_timeout())
            # read1 = at most one recv, so the deadline is checked between every arriving chunk
            chunk = resp.read1(min(65536, max_bytes + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise _Reject("too_large", status=status, content_type=ctype)
            chunks.append(chunk)
        if resp.length:  # http.client counts down the declared length; bytes still owed = cut off
            raise _Reject("incomplete_body", status=status, content_type=ctype)
        return b"".join(chunks)

    # ----------------------------------------------------------------------- robots.txt

    def _check_robots(self, target: _Target) -> None:
        key = target.origin
        with self._robots_lock:
            future = self._robots.get(key)
            owner = future is None
            if owner:
                future = self._robots[key] = cf.Future()
        if owner:
            # Exactly one thread fetches; the rest wait on the future, also if the fetch raises.
            try:
                future.set_result(self._load_robots(target))
            except BaseException as err:
                future.set_exception(err)
                raise
        verdict = future.result().verdict(self.cfg.user_agent_token, target.url)
        if verdict is not None:
            raise _Reject(verdict)

    def _load_robots(self, target: _Target) -> _RobotsRules:
        # Same safe path as images (address checks, caps, deadline, redirects), per RFC 9309:
        # 4xx = no rules; 5xx or unreachable = assume everything is disallowed.
        result = self._fetch(target.origin + "/robots.txt", self._robots_spec)
        if result.ok and result.body is not None:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(result.body.decode("utf-8", errors="replace").splitlines())
            return _RobotsRules(parser)
        if result.status is not None and 400 <= result.status <= 499 and result.status != 429:
            return _RobotsRules(None)
        return _RobotsRules(None, unavailable=True)


@dataclass(frozen=True)
class _RobotsRules:
    parser: urllib.robotparser.RobotFileParser | None  # None = no rules (robots.txt was a 4xx)
    unavailable: bool = False

    def verdict(self, token: str, url: str) -> str | None:
        if self.unavailable:
            return "robots_unavailable"
        if self.parser is None or self.parser.can_fetch(token, url):  # can_fetch only reads: thread-safe
            return None
        return "robots_disallow"
