"""Opt-out rules for the crawler: robots.txt (RFC 9309) and the TDM-Rep `tdm-reservation` header.

No network code: the fetcher downloads /robots.txt (following up to 5 redirects) and hands the status
and body to `rules_for_response`; `RobotsCache` keeps the verdict per origin. Plain Python, thread-safe.

Who does what
-------------
Group selection is ours, rule matching is protego's (>= 0.7). We split the file into groups, pick the
ones addressed to our product token, and hand protego a synthesized single-group file holding only
those groups' allow/disallow lines; protego then does the longest match, Allow-wins-ties, `*`, `$` and
the percent-encoding normalization (its `can_fetch` is the only thing we use, through `Protego.parse`).

Why not let protego pick the group: its `_RuleSet.applies_to` is a substring search that only checks
the character *before* the hit, so a `User-agent: clip-on-ray` (or `clip`) group is taken as ours
when our token is `clip-on-ray-bot` (and then outranks `*`), while `clip-on-ray-bot/1.0` is never
found; it also keeps only the best-scoring agent string rather than merging every group that names
us. RFC 9309 2.2.1 asks for a case-insensitive match of the product token, so we select groups
ourselves (a re-tagging pre-pass over protego's input would have to mirror its lenient line parser
exactly; owning the split is simpler to get right):

- a User-agent value's product token is its leading run of `[A-Za-z0-9_-]`, lower-cased; so
  `clip-on-ray-bot/1.0` and `clip-on-ray-bot (+https://...)` are ours (the version suffix is what site
  owners copy from our User-Agent header; Google's reference parser does the same), while `ray-bot`,
  `clip-on-ray`, `clip-on-ray-bot2` and `*bot` are not;
- every group naming us is merged; the `*` groups (also merged) are used only if none names us;
  neither = no rules apply. A group that names us but has no rules still counts (allow all);
- a group is a run of User-agent lines followed by its Allow / Disallow / Crawl-delay lines; a
  User-agent line after one of those starts a new group. Other lines (Sitemap, unknown fields, junk)
  are ignored and do not split a group; rules before the first User-agent line are ignored;
- lenient like Google's parser: `Disallow /x` without a colon, `User agent`, `useragent`, and the
  common misspellings of `disallow` are read, because they are how site owners meant to opt out.

Fixes over plain protego
------------------------
- `$`: protego adds, for every pattern containing `$`, a second rule with `$` read as a literal
  (`/foo$` also matches `/foo$bar`). We replace every literal dollar (`$` not at the end, `%24`) in
  patterns and URLs by `%1F`, as long as protego's `%24`, so that extra rule can never match and
  precedence lengths are unchanged. Cost: a URL holding a raw 0x1F / `%1F` is read as if it held a
  `$` (no sane URL does).
- Query `/` vs `%2F`: the RFC 2.2.2 table matches `/foo/bar?baz=https://foo.bar` against
  `?baz=https%3A%2F%2Ffoo.bar`; protego keeps `%2F` distinct from `/` everywhere, so we decode `%2F` in
  the query (after the first `?`) of both patterns and URLs. In the path they stay distinct: `/a%2Fb`
  is a different resource from `/a/b`.
- `/robots.txt` is always allowed (RFC 2.5), also when robots.txt was unavailable.
- Kept from protego: `Allow: /dir/index.html` also allows exactly `/dir/` (Google does the same).

Input bytes: UTF-8 (a leading BOM is dropped), invalid sequences replaced; a UTF-16 BOM decodes as
UTF-16 instead of being read as garbage, because a Notepad-saved `Disallow: /` is still an opt-out.
Lines end at CR, LF or CRLF. Parsing never raises, whatever the bytes; see `parse_robots`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from protego import Protego

__all__ = [
    "ALLOW_ALL", "RFC_MIN_PARSE_BYTES", "TDM_RESERVATION_HEADER", "UNAVAILABLE", "RobotsCache",
    "RobotsRules", "parse_robots", "rules_for_response", "tdm_reserved",
]

logger = logging.getLogger(__name__)

#: RFC 9309 2.5: crawlers MUST parse at least this much of a robots.txt; fetch at least this many bytes.
RFC_MIN_PARSE_BYTES = 500 * 1024
#: W3C TDM Reservation Protocol response header.
TDM_RESERVATION_HEADER = "tdm-reservation"

_ALLOW, _DISALLOW, _AGENT, _DELAY = "allow", "disallow", "user-agent", "crawl-delay"
# Field spellings read as directives (lower-case, inner whitespace collapsed): the RFC names plus the
# variants Google's parser and protego accept, since they still express the site owner's intent.
_FIELDS = {
    "user-agent": _AGENT, "useragent": _AGENT, "user agent": _AGENT,
    "allow": _ALLOW,
    "disallow": _DISALLOW, "dissallow": _DISALLOW, "dissalow": _DISALLOW, "disalow": _DISALLOW,
    "diasllow": _DISALLOW, "disallaw": _DISALLOW,
    "crawl-delay": _DELAY, "crawl delay": _DELAY, "crawldelay": _DELAY,
}
_EOL = re.compile(r"\r\n|\r|\n")  # RFC 9309 EOL; str.splitlines would also split on \f, \x85, ...
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_DECIMAL = re.compile(r"\d+(?:\.\d*)?|\.\d+")  # no sign, exponent, inf/nan or "1_0" that float() takes
_SCHEME_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_QUERY_SLASH = re.compile(r"%2[fF]")
_LITERAL_DOLLAR = re.compile(r"\$|%24")
# Stands in for a literal "$" (see module doc). Written encoded: a raw 0x1F would be stripped as
# whitespace (str.isspace) by protego, and 0x1C-0x1E would even split its lines.
_DOLLAR = "%1F"
# Printable ASCII stays as it is; everything else (controls, space, non-ASCII, lone surrogates) is
# percent-encoded up front. Equivalent under protego's normalization, and it keeps our synthesized
# file one directive per line and quote() from raising on surrogates.
_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))
# Any host will do: protego only looks at the path and query of what we hand it.
_BASE = "http://robots.invalid"


def _ascii(text: str) -> str:
    return text if text.isascii() and text.isprintable() and " " not in text else (
        quote(text, safe=_PRINTABLE, errors="surrogatepass"))


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, eq=False)  # eq by identity: the matcher has no useful equality
class RobotsRules:
    """The verdict for one origin. Immutable and safe to share between threads."""

    #: None = no rules apply (no robots.txt, 4xx, or no group for us and no `*` group).
    _matcher: Protego | None = field(default=None, repr=False)
    #: Seconds from our group (or the `*` group if none names us); None = not given or unusable.
    crawl_delay: float | None = None
    #: robots.txt could not be fetched (5xx, 429, unreachable): everything disallowed, retry later.
    unavailable: bool = False

    def allowed(self, url: str) -> bool:
        """May we fetch `url` (a full URL, or a path with its query)?"""
        path_query = _path_and_query(url)
        if path_query.partition("?")[0] == "/robots.txt":
            return True  # RFC 9309 2.5: the robots.txt URI is implicitly allowed
        if self.unavailable:
            return False
        if self._matcher is None:
            return True
        return self._matcher.can_fetch(_BASE + _url_for_protego(path_query), "*")

    def verdict(self, url: str) -> str | None:
        """The fetcher's reject reason for `url`, or None when it may be fetched."""
        if self.unavailable:
            return "robots_unavailable"
        return None if self.allowed(url) else "robots_disallow"


#: 4xx, or a file without rules for us.
ALLOW_ALL = RobotsRules()
#: 429 / 5xx / unreachable / loader failure: RFC 9309 2.3.1.3-4 says assume complete disallow.
UNAVAILABLE = RobotsRules(unavailable=True)


def _path_and_query(url: str) -> str:
    """"/path?query" of a URL or of a path, without the fragment; a path of "//x" stays a path."""
    url = url.partition("#")[0]
    if not url.startswith("/"):
        scheme_authority = _SCHEME_AUTHORITY.match(url)
        if scheme_authority:
            url = url[scheme_authority.end():]
    url = _ascii(url)
    return url if url.startswith("/") else "/" + url


def _url_for_protego(path_query: str) -> str:
    path, sep, query = path_query.partition("?")
    if sep:
        query = _QUERY_SLASH.sub("/", query)
    return _LITERAL_DOLLAR.sub(_DOLLAR, path + sep + query)


def _pattern_for_protego(pattern: str) -> str:
    """The same rewrites as for URLs, keeping a final "$" as the end anchor."""
    pattern = _ascii(pattern)
    if pattern.endswith("$"):
        return _url_for_protego(pattern[:-1]) + "$"
    return _url_for_protego(pattern)


# --------------------------------------------------------------------------- parsing


@dataclass
class _Group:
    agents: set[str] = field(default_factory=set)
    rules: list[tuple[str, str]] = field(default_factory=list)  # (allow|disallow, pattern)
    delays: list[float] = field(default_factory=list)


def parse_robots(body: bytes, product_token: str, *, truncated: bool = False) -> RobotsRules:
    """Rules of a robots.txt body for `product_token` (e.g. "clip-on-ray-bot").

    `truncated=True` says the caller cut the body at its size cap: the last, partial line is dropped so
    that a rule cut short (`Disallow: /private` read as `Disallow: /`, `Allow: /a/b` as `Allow: /`)
    cannot change what it covers. Without it the last line counts even with no EOL after it (many
    files end that way).

    Never raises: should something still go wrong (a bug here or in protego), the answer is
    UNAVAILABLE, i.e. disallow and retry later, never a silent allow.
    """
    try:
        return _parse(body, product_token, truncated)
    except Exception:
        logger.exception("robots.txt parse failed; treating it as unavailable")
        return UNAVAILABLE


def _parse(body: bytes, product_token: str, truncated: bool) -> RobotsRules:
    lines = _EOL.split(_decode(bytes(body)))
    if truncated:
        lines.pop()  # split() always yields a last element: the partial line, or "" after an EOL
    groups = _groups(lines)
    token = _product_token(product_token)
    chosen = [g for g in groups if token and token in g.agents] or [g for g in groups if "*" in g.agents]
    delays = [d for g in chosen for d in g.delays]
    # Several delays for us (merged groups): the longest is the one that honours all of them.
    crawl_delay = max(delays) if delays else None
    rules = [rule for g in chosen for rule in g.rules]
    if not rules:
        return RobotsRules(None, crawl_delay)
    return RobotsRules(_matcher(rules), crawl_delay)


def _decode(body: bytes) -> str:
    if body.startswith((b"\xff\xfe", b"\xfe\xff")):
        return body.decode("utf-16", errors="replace")  # the codec reads and drops the BOM
    return body.decode("utf-8-sig", errors="replace")


def _groups(lines: list[str]) -> list[_Group]:
    groups: list[_Group] = []
    current: _Group | None = None
    reading_agents = False  # True right after a User-agent line: another one joins the same group
    for line in lines:
        directive = _directive(line.partition("#")[0])
        if directive is None:
            continue
        kind, value = directive
        if kind == _AGENT:
            if current is None or not reading_agents:
                current = _Group()
                groups.append(current)
            current.agents.add(_agent_token(value))
            reading_agents = True
        elif current is not None:  # rules before any User-agent line belong to nobody
            reading_agents = False
            _add_rule(current, kind, value)
    return groups


def _directive(line: str) -> tuple[str, str] | None:
    """(kind, value) of a known directive line, else None. Comments are already cut off."""
    name, sep, value = line.partition(":")
    if sep:
        kind = _FIELDS.get(" ".join(name.lower().split()))
        if kind:
            return kind, value.strip()
    # No colon ("Disallow /x"), or the first colon sits in the value ("Disallow /a:b").
    words = line.split()
    for n in (2, 1):
        kind = _FIELDS.get(" ".join(words[:n]).lower()) if len(words) >= n else None
        if kind:
            return kind, " ".join(words[n:])
    return None


def _add_rule(group: _Group, kind: str, value: str) -> None:
    if kind == _DELAY:
        delay = _delay(value)
        if delay is not None:
            group.delays.append(delay)
    elif value:  # "Disallow:" with nothing = no restriction (RFC 9309 2.2.2), so it adds no rule
        group.rules.append((kind, value))


def _delay(value: str) -> float | None:
    if not _DECIMAL.fullmatch(value):
        return None
    delay = float(value)
    return delay if math.isfinite(delay) else None


def _agent_token(value: str) -> str:
    value = value.strip()
    return "*" if value == "*" else _product_token(value)


def _product_token(value: str) -> str:
    """Leading run of product-token characters, lower-cased: "Clip-On-Ray-Bot/1.0" -> "clip-on-ray-bot"."""
    match = _TOKEN.match(value.strip())
    return match.group().lower() if match else ""


def _matcher(rules: list[tuple[str, str]]) -> Protego:
    # One group, addressed to "*", so protego's own group selection has nothing left to decide.
    text = "user-agent: *\n" + "".join(f"{kind}: {_pattern_for_protego(value)}\n" for kind, value in rules)
    matcher = Protego.parse(text)
    # protego builds its prefix index on the first query; do it now, before the object is shared
    # between threads, instead of relying on the order of two attribute writes in a race.
    matcher.can_fetch(_BASE + "/", "*")
    return matcher


# --------------------------------------------------------------------------- status semantics


def rules_for_response(status: int | None, body: bytes | None, product_token: str, *,
                       truncated: bool = False) -> RobotsRules:
    """RFC 9309 2.3.1 for the final response of a /robots.txt fetch (redirects already followed).

    status None = unreachable (DNS failure, timeout, connection error). 2xx: parse the body;
    4xx except 429: no usable robots.txt, so no rules; 429, 5xx, unreachable, and anything else
    (a 3xx left over after the redirect limit, 1xx, nonsense): unavailable, disallow all for now.
    """
    if status is not None and 200 <= status <= 299:
        return parse_robots(body or b"", product_token, truncated=truncated)
    if status is not None and 400 <= status <= 499 and status != 429:
        return ALLOW_ALL
    return UNAVAILABLE


# --------------------------------------------------------------------------- cache


@dataclass
class _Entry:
    rules: RobotsRules
    expires: float


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    rules: RobotsRules = UNAVAILABLE


class RobotsCache:
    """Per-process robots verdicts by origin: TTL-bounded, LRU-bounded, one load per origin at a time.

    `ttl_s` (24 h, RFC 9309 2.4) applies to parsed files and 4xx; `unavailable_ttl_s` (10 min) to the
    unavailable verdict, so an origin whose robots.txt was down is retried soon. `clock` is injectable
    (monotonic seconds). `load` must be bounded in time (the fetcher's deadline does that): callers for
    the same origin wait for it. It must not call `get` for the same origin (that would deadlock).
    """

    def __init__(self, *, ttl_s: float = 24 * 3600.0, unavailable_ttl_s: float = 600.0,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if not (ttl_s >= 0 and unavailable_ttl_s >= 0):
            raise ValueError(f"RobotsCache: TTLs must be >= 0, got {ttl_s!r}, {unavailable_ttl_s!r}")
        if max_entries < 1:
            raise ValueError(f"RobotsCache: max_entries must be >= 1, got {max_entries!r}")
        self._ttl_s = ttl_s
        self._unavailable_ttl_s = unavailable_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, origin: str, load: Callable[[], RobotsRules]) -> RobotsRules:
        """Cached rules for `origin`, else the result of `load()`; never raises for a failing `load`."""
        with self._lock:
            cached = self._lookup(origin)
            if cached is not None:
                return cached
            flight = self._flights.get(origin)
            owner = flight is None
            if flight is None:
                flight = self._flights[origin] = _Flight()
        if not owner:
            flight.done.wait()
            return flight.rules
        return self._load(origin, flight, load)

    def _lookup(self, origin: str) -> RobotsRules | None:
        entry = self._entries.get(origin)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[origin]
            return None
        self._entries.move_to_end(origin)
        return entry.rules

    def _load(self, origin: str, flight: _Flight, load: Callable[[], RobotsRules]) -> RobotsRules:
        # flight.rules starts as UNAVAILABLE: if load raises (even a BaseException that we let
        # through), the waiters released by `finally` get that, and the short TTL retries it soon.
        try:
            flight.rules = load()
        except Exception:
            logger.warning("robots.txt load for %s failed; unavailable for now", origin, exc_info=True)
        finally:
            with self._lock:
                self._store(origin, flight.rules)
                del self._flights[origin]
            flight.done.set()
        return flight.rules

    def _store(self, origin: str, rules: RobotsRules) -> None:
        ttl = self._unavailable_ttl_s if rules.unavailable else self._ttl_s
        self._entries[origin] = _Entry(rules, self._clock() + ttl)
        self._entries.move_to_end(origin)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------- TDM-Rep


def tdm_reserved(header_values: Sequence[str]) -> bool:
    """Does a `tdm-reservation` response header reserve text-and-data-mining rights (opt out)?

    W3C TDMRep: "1" = reserved, "0" = not reserved. Every header line and comma-separated item is
    read; any "1" wins over a "0" (the opt-out is what must not be missed). Anything else (garbage,
    "true", "2", empty) is not a reservation. Never raises.
    """
    for value in header_values:
        if not isinstance(value, str):
            continue
        if any(item.strip() == "1" for item in value.split(",")):
            return True
    return False
