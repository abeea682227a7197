"""pipelines.robots: RFC 9309 robots.txt rules, status semantics, the per-origin cache, TDM-Rep.

Pure functions and a fake clock: no network, no sleeps beyond a few ms in the single-flight tests.
Cases marked "robotparser: wrong" are ones urllib.robotparser (what fetch.py uses today) decides
differently; robotparser itself is not tested here.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable

import pytest

from pipelines.crawl.robots import (ALLOW_ALL, UNAVAILABLE, RobotsCache, RobotsRules, parse_robots, rules_for_response, tdm_reserved)

TOKEN = "clip-on-ray-bot"


def _allowed(robots: str | bytes, url: str, token: str = TOKEN) -> bool:
    body = robots.encode() if isinstance(robots, str) else robots
    return parse_robots(body, token).allowed(url)


# --------------------------------------------------------------------------- RFC 9309 examples

# RFC 9309 5.1, verbatim (the "EOF" line is part of the example: an unknown line, ignored).
RFC_5_1 = """\
User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot

EOF
"""

RFC_5_1_CASES = [
    # foobot: only /example/page.html and /example/allowed.gif.
    ("foobot", "/", False),
    ("foobot", "/example/page.html", True),  # robotparser: wrong (first match "Disallow:/" wins)
    ("foobot", "/example/allowed.gif", True),  # robotparser: wrong (first match)
    ("foobot", "/example/other.html", False),
    ("foobot", "/publications/", False),
    ("foobot", "/robots.txt", True),  # RFC 2.5; robotparser: wrong
    # barbot and bazbot share one group: only /example/page.html is off limits, and the `*` rules
    # (no .gif) are not theirs.
    ("barbot", "/example/page.html", False),
    ("bazbot", "/example/page.html", False),
    ("barbot", "/example/", True),
    ("bazbot", "/image.gif", True),
    # quxbot has a group with no rules: everything allowed, `*` group not used.
    ("quxbot", "/example/page.html", True),  # robotparser: wrong (drops the empty group, uses `*`)
    ("quxbot", "/image.gif", True),
    # everyone else gets the `*` group.
    ("otherbot", "/image.gif", False),  # robotparser: wrong (no `*`/`$` support)
    ("otherbot", "/a/b/image.gif", False),  # robotparser: wrong
    ("otherbot", "/image.gif?size=2", True),  # `$`: the URL does not end in .gif
    ("otherbot", "/image.gifs", True),
    ("otherbot", "/example/", False),
    ("otherbot", "/example/page.html", False),
    ("otherbot", "/publications/", True),
    ("otherbot", "/publications/cover.gif", True),  # longest match: Allow /publications/ (14) > *.gif$ (7)
    ("otherbot", "/", True),
]


@pytest.mark.parametrize("token,url,expected", RFC_5_1_CASES)
def test_rfc_5_1_example(token: str, url: str, expected: bool) -> None:
    assert _allowed(RFC_5_1, url, token) is expected


PRECEDENCE_CASES = [
    # RFC 5.2 longest match
    ("allow: /example/page/\ndisallow: /example/page/disallowed.gif", "/example/page/", True),
    ("allow: /example/page/\ndisallow: /example/page/disallowed.gif", "/example/page/disallowed.gif", False),
    # robotparser: wrong on the line above (first match)
    # the order of lines does not matter, only the length of the matching pattern
    ("disallow: /example/page/disallowed.gif\nallow: /example/page/", "/example/page/disallowed.gif", False),
    ("disallow: /\nallow: /a", "/a/b", True),  # robotparser: wrong (first match)
    ("allow: /a\ndisallow: /a/b", "/a/b/c", False),  # robotparser: wrong
    # RFC 2.2.2: equivalent allow and disallow -> allow
    ("disallow: /page\nallow: /page", "/page", True),  # robotparser: wrong (first match)
    ("allow: /page\ndisallow: /page", "/page", True),
    ("disallow: /\nallow: /", "/x", True),  # robotparser: wrong
    # same length, different patterns: allow wins too
    ("disallow: /*.php\nallow: /page*", "/page.php", True),
    # RFC 2.2.3 special characters
    ("disallow: /\nallow: /this/path/exactly$", "/this/path/exactly", True),  # robotparser: wrong
    ("disallow: /\nallow: /this/path/exactly$", "/this/path/exactly/more", False),
    ("disallow: /\nallow: /this/*/exactly", "/this/a/b/exactly", True),  # robotparser: wrong
    ("disallow: /\nallow: /this/*/exactly", "/this/exactly", False),
    ("disallow: /fish*", "/fish.html", False),  # robotparser: wrong (literal "*")
    ("disallow: /fish*", "/Fish.asp", True),  # paths are case-sensitive
    ("disallow: /*.php$", "/folder/filename.php", False),  # robotparser: wrong
    ("disallow: /*.php$", "/filename.php?parameters", True),
    ("disallow: /*.php$", "/filename.php/", True),
    ("disallow: /**x", "/abcx", False),  # robotparser: wrong
    ("disallow: /$", "/", False),  # robotparser: wrong
    ("disallow: /$", "/a", True),
    ("disallow: *", "/anything", False),  # robotparser: wrong
    # a literal "$" is written %24; a final "$" is only the anchor (protego alone would also read it
    # as a literal and let "/foo$" match "/foo$bar")
    ("disallow: /path/foo-%24", "/path/foo-$", False),
    ("disallow: /path/foo-%24", "/path/foo-", True),
    ("disallow: /\nallow: /foo$", "/foo$bar", False),  # protego alone: wrong
    ("disallow: /\nallow: /foo$", "/foo%24bar", False),  # protego alone: wrong
    ("disallow: /a$b", "/a$b/c", False),  # a "$" inside a pattern is literal
    ("disallow: /a$b", "/a%24b", False),
    ("disallow: /a$b", "/ab", True),
    # a literal "*" is written %2A
    ("disallow: /path/file-with-a-%2A.html", "/path/file-with-a-*.html", False),
    ("disallow: /path/file-with-a-%2A.html", "/path/file-with-a-x.html", True),
    # empty values restrict nothing
    ("disallow:", "/x", True),
    ("disallow:\nallow:", "/x", True),
    # robots.txt itself is always allowed (RFC 2.5)
    ("disallow: /", "/robots.txt", True),  # robotparser: wrong
    ("disallow: /", "/robots.txt?x=1", True),  # robotparser: wrong
    ("disallow: /", "/robots.txt/x", False),
    # full URLs and fragments
    ("disallow: /private", "https://example.com/private/x", False),
    ("disallow: /private", "https://example.com:8443/public?q=/private", True),
    ("disallow: /p$", "https://example.com/p#frag", False),  # robotparser: wrong
    ("disallow: /$", "https://example.com", False),  # an empty path is "/"; robotparser: wrong
    ("disallow: /a?", "/a?", False),
    ("disallow: /a?", "/a", True),  # robotparser: wrong
    ("disallow: //double", "//double/slash", False),  # a path, not a network-path reference; robotparser: wrong
]


@pytest.mark.parametrize("rules,url,expected", PRECEDENCE_CASES)
def test_match_precedence_and_special_characters(rules: str, url: str, expected: bool) -> None:
    assert _allowed(f"user-agent: *\n{rules}\n", url) is expected


# RFC 2.2.2 percent-encoding table, each row both ways: a rule spelled one way matches a URL spelled
# the other way.
PERCENT_CASES = [
    ("/foo/bar?baz=quz", "/foo/bar?baz=quz"),
    ("/foo/bar?baz=https://foo.bar", "/foo/bar?baz=https%3A%2F%2Ffoo.bar"),
    ("/foo/bar/\u30c4", "/foo/bar/%E3%83%84"),
    ("/foo/bar/%E3%83%84", "/foo/bar/%E3%83%84"),
    ("/foo/bar/%62%61%7A", "/foo/bar/baz"),
    ("/foo/bar/%e3%83%84", "/foo/bar/%E3%83%84"),  # hex digits are case-insensitive
]


@pytest.mark.parametrize("a,b", PERCENT_CASES + [(b, a) for a, b in PERCENT_CASES])
def test_percent_encoding_equivalence(a: str, b: str) -> None:
    assert not _allowed(f"user-agent: *\ndisallow: {a}$\n", b)


@pytest.mark.parametrize("rule,url", [
    ("/a/b", "/a%2Fb"),  # in the path an encoded "/" is a different resource
    ("/a%2Fb", "/a/b"),
    ("/foo/bar/%E3%83%84", "/foo/bar/%E3%83%85"),
    ("/?a=1", "/?a=12"),
])
def test_percent_encoding_non_equivalence(rule: str, url: str) -> None:
    assert _allowed(f"user-agent: *\ndisallow: {rule}$\n", url)


# --------------------------------------------------------------------------- group selection

GROUP_CASES = [
    # RFC 2.2.1: several groups for us are merged
    ("user-agent: clip-on-ray-bot\ndisallow: /foo\ndisallow: /bar\n\n"
     "user-agent: clip-on-ray-bot\ndisallow: /baz\n", ["/foo", "/bar", "/baz"], ["/qux"]),  # robotparser: wrong
    # merged across an unrelated group in between, and an Allow in one beats a Disallow in another
    ("user-agent: clip-on-ray-bot\ndisallow: /\n\nuser-agent: other\ndisallow: /x\n\n"
     "user-agent: CLIP-ON-RAY-BOT\nallow: /open/\n", ["/closed"], ["/open/a"]),  # robotparser: wrong
    # a group naming us among other agents is ours
    ("user-agent: a\nuser-agent: clip-on-ray-bot\nuser-agent: b\ndisallow: /x\n", ["/x"], ["/y"]),
    # `*` only when no group names us
    ("user-agent: *\ndisallow: /\n\nuser-agent: clip-on-ray-bot\ndisallow: /x\n", ["/x"], ["/y"]),
    ("user-agent: *\ndisallow: /\n\nuser-agent: other-bot\nallow: /\n", ["/y"], []),
    # several `*` groups merge too
    ("user-agent: *\ndisallow: /a\n\nuser-agent: *\ndisallow: /b\n", ["/a", "/b"], ["/c"]),  # robotparser: wrong
    # exact product token only: longer, shorter, prefix, suffix and wildcard names are not us
    ("user-agent: ray-bot\ndisallow: /\n\nuser-agent: *\ndisallow: /star\n", ["/star"], ["/x"]),  # robotparser: wrong
    ("user-agent: clip-on-ray\ndisallow: /\n", [], ["/x"]),  # protego alone and robotparser: wrong
    ("user-agent: clip\ndisallow: /\n", [], ["/x"]),  # protego alone and robotparser: wrong
    ("user-agent: clip-on-ray-bot2\ndisallow: /\n", [], ["/x"]),
    ("user-agent: clip-on-ray-bot-images\ndisallow: /\n", [], ["/x"]),
    ("user-agent: *bot\ndisallow: /\n", [], ["/x"]),
    ("user-agent: bot\ndisallow: /\n", [], ["/x"]),  # robotparser: wrong
    # case-insensitive
    ("User-Agent: Clip-On-Ray-Bot\nDisallow: /x\n", ["/x"], ["/y"]),
    # a version or comment after the token still names us (the User-Agent header form)
    ("user-agent: clip-on-ray-bot/1.0\ndisallow: /x\n", ["/x"], ["/y"]),  # robotparser: wrong
    ("user-agent: clip-on-ray-bot # our crawler\ndisallow: /x\n", ["/x"], ["/y"]),
    # no group for us and no `*` group: nothing applies
    ("user-agent: other\ndisallow: /\n", [], ["/x"]),
    # rules before any user-agent line belong to no group
    ("disallow: /\nuser-agent: *\ndisallow: /x\n", ["/x"], ["/y"]),
    # a group naming us with no rules means allow all, and shadows `*`
    ("user-agent: *\ndisallow: /\nuser-agent: clip-on-ray-bot\n", [], ["/x"]),  # robotparser: wrong
    # agents in a row share the group; sitemap and unknown lines do not split it
    ("user-agent: other\nsitemap: https://e.com/s.xml\nfoo: bar\nuser-agent: clip-on-ray-bot\ndisallow: /x\n",
     ["/x"], ["/y"]),
    # a rule line ends the agent list: the next user-agent starts a new group
    ("user-agent: clip-on-ray-bot\ndisallow: /x\nuser-agent: other\ndisallow: /y\n", ["/x"], ["/y"]),
    ("user-agent: clip-on-ray-bot\ncrawl-delay: 1\nuser-agent: other\ndisallow: /y\n", [], ["/y"]),
    # leniency that keeps an owner's intent: missing colon, spaced field names, misspellings
    ("user-agent clip-on-ray-bot\ndisallow /x\n", ["/x"], ["/y"]),  # robotparser: wrong
    ("user agent: clip-on-ray-bot\ndissallow: /x\n", ["/x"], ["/y"]),  # robotparser: wrong
    ("useragent: *\ndisallow /a:b\n", ["/a:b"], ["/a"]),  # robotparser: wrong
    ("  user-agent :  *  \n\tdisallow\t:\t/x\t\n", ["/x"], ["/y"]),
    # whitespace inside a field name is collapsed, junk lines are skipped
    ("user-agent: *\n:::\n%%%\ndisallow: /x\n", ["/x"], ["/y"]),
]


@pytest.mark.parametrize("robots,disallowed,allowed", GROUP_CASES)
def test_group_selection(robots: str, disallowed: list[str], allowed: list[str]) -> None:
    rules = parse_robots(robots.encode(), TOKEN)
    assert [url for url in disallowed + allowed if not rules.allowed(url)] == disallowed


@pytest.mark.parametrize("token", ["clip-on-ray-bot", "CLIP-ON-RAY-BOT", " clip-on-ray-bot ", "clip-on-ray-bot/0.1"])
def test_our_token_is_normalized(token: str) -> None:
    assert not _allowed("user-agent: Clip-On-Ray-Bot\ndisallow: /\n", "/x", token)


@pytest.mark.parametrize("token", ["", "*", "/"])
def test_an_unusable_token_gets_only_the_star_group(token: str) -> None:
    robots = "user-agent: \ndisallow: /empty\n\nuser-agent: *\ndisallow: /star\n"
    assert not _allowed(robots, "/star", token)
    assert _allowed(robots, "/empty", token)


# --------------------------------------------------------------------------- bytes and lines

DISALLOW_X = b"User-agent: *\nDisallow: /x\n"

ENCODING_CASES = [
    ("utf8_bom", b"\xef\xbb\xbf" + DISALLOW_X, False),  # robotparser (as fetch.py fed it): wrong
    ("utf16_le_bom", "\ufeffUser-agent: *\nDisallow: /x\n".encode("utf-16-le"), False),  # robotparser: wrong
    ("utf16_be_bom", "\ufeffUser-agent: *\nDisallow: /x\n".encode("utf-16-be"), False),  # robotparser: wrong
    ("crlf", DISALLOW_X.replace(b"\n", b"\r\n"), False),
    ("cr_only", DISALLOW_X.replace(b"\n", b"\r"), False),
    ("mixed_eol", b"User-agent: *\r\nDisallow: /y\rDisallow: /x\n", False),
    ("no_final_eol", DISALLOW_X.rstrip(b"\n"), False),
    ("invalid_utf8_elsewhere", b"User-agent: *\n\xff\xfe\xc3(\nDisallow: /x\n", False),
    ("invalid_utf8_in_rule", b"User-agent: *\nDisallow: /x\xff\n", True),  # rule is /x\ufffd
    ("nul_bytes", b"User-agent: *\n\x00\x00\nDisallow: /x\n", False),
    ("nul_in_value", b"User-agent: *\nDisallow: /\x00\n", True),
    ("comment_only", b"# nothing here\n# Disallow: /x\n   # indented\n", True),
    ("comment_after_rule", b"User-agent: * # all\nDisallow: /x # not the rest\n", False),
    ("hash_cuts_pattern", b"User-agent: *\nDisallow: #/x\n", True),
    ("empty", b"", True),
    ("blank_lines", b"\n\n\r\n  \t\n", True),
    ("binary_garbage", bytes(range(256)) * 4, True),
    ("html_soft_404", b"<!doctype html><html><body>Not found</body></html>", True),
    ("form_feed_is_not_eol", b"User-agent: *\nDisallow: /a\x0cb\n", True),  # rule is /a%0Cb
]


@pytest.mark.parametrize("name,body,expected", ENCODING_CASES, ids=[c[0] for c in ENCODING_CASES])
def test_bytes_and_line_endings(name: str, body: bytes, expected: bool) -> None:
    rules = parse_robots(body, TOKEN)
    assert not rules.unavailable
    assert rules.allowed("/x") is expected


def test_very_long_lines_parse_quickly() -> None:
    long_pattern = b"/" + b"a" * 600_000
    body = (b"User-agent: *\nDisallow: " + long_pattern + b"\n" + b"#" * 600_000 + b"\n"
            + b"Disallow: /x\n" * 5000 + b"Allow: /x/" + b"*a" * 20_000 + b"\n")
    start = time.perf_counter()
    rules = parse_robots(body, TOKEN)
    assert not rules.allowed("/x")
    assert not rules.allowed(long_pattern.decode() + "b")
    assert rules.allowed("/y")
    assert rules.allowed("/x/" + "a" * 20_000)
    assert time.perf_counter() - start < 5.0


def test_truncated_body_drops_the_partial_last_line() -> None:
    cut = b"User-agent: *\nDisallow: /private/\nDisallow: /"  # was "Disallow: /public-but-slow"
    assert not parse_robots(cut, TOKEN).allowed("/x")  # untruncated: a complete last line
    rules = parse_robots(cut, TOKEN, truncated=True)
    assert rules.allowed("/x")
    assert not rules.allowed("/private/a")
    # cut right after an EOL: nothing is dropped
    assert not parse_robots(cut + b"x\n", TOKEN, truncated=True).allowed("/x")
    # cut inside a UTF-8 sequence of the last line
    assert parse_robots(b"User-agent: *\nDisallow: /\xe3\x83", TOKEN, truncated=True).allowed("/")


# --------------------------------------------------------------------------- crawl-delay

DELAY_CASES = [
    ("user-agent: *\ncrawl-delay: 5\n", 5.0),
    ("user-agent: *\ncrawl-delay: 0.5\n", 0.5),  # robotparser: wrong (integers only)
    ("user-agent: *\ncrawl-delay: .5\n", 0.5),  # robotparser: wrong (integers only)
    ("user-agent: *\ncrawl-delay: 0\n", 0.0),
    ("user-agent: *\ncrawl-delay: 2 # seconds\n", 2.0),
    ("user-agent: *\nCrawl delay: 3\n", 3.0),  # robotparser: wrong
    ("user-agent: *\ncrawl-delay: -1\n", None),
    ("user-agent: *\ncrawl-delay: soon\n", None),
    ("user-agent: *\ncrawl-delay: nan\n", None),
    ("user-agent: *\ncrawl-delay: inf\n", None),
    ("user-agent: *\ncrawl-delay: 1e3\n", None),
    ("user-agent: *\ncrawl-delay: 1_0\n", None),
    ("user-agent: *\ncrawl-delay: " + "9" * 400 + "\n", None),  # overflows to inf; robotparser: wrong
    ("user-agent: *\ncrawl-delay:\n", None),
    ("user-agent: *\ndisallow: /\n", None),
    # our group's delay; `*` only when no group names us (like the rules)
    ("user-agent: *\ncrawl-delay: 9\n\nuser-agent: clip-on-ray-bot\ncrawl-delay: 2\n", 2.0),
    ("user-agent: *\ncrawl-delay: 9\n\nuser-agent: clip-on-ray-bot\ndisallow: /x\n", None),
    ("user-agent: *\ncrawl-delay: 9\n\nuser-agent: ray-bot\ncrawl-delay: 1\n", 9.0),  # robotparser: wrong
    # merged groups: the longest delay, which honours all of them
    ("user-agent: clip-on-ray-bot\ncrawl-delay: 2\n\nuser-agent: clip-on-ray-bot\ncrawl-delay: 7\n", 7.0),
    # robotparser: wrong on the line above (first group only)
    ("user-agent: clip-on-ray-bot\ncrawl-delay: x\ncrawl-delay: 4\n", 4.0),
    ("crawl-delay: 5\nuser-agent: *\n", None),  # before any group
]


@pytest.mark.parametrize("robots,expected", DELAY_CASES)
def test_crawl_delay(robots: str, expected: float | None) -> None:
    assert parse_robots(robots.encode(), TOKEN).crawl_delay == expected


# --------------------------------------------------------------------------- status semantics

STATUS_CASES = [
    (200, "parsed"), (203, "parsed"), (299, "parsed"),
    (400, "allow"), (401, "allow"), (403, "allow"), (404, "allow"), (410, "allow"), (451, "allow"),
    (429, "unavailable"),
    (500, "unavailable"), (503, "unavailable"), (599, "unavailable"),
    (None, "unavailable"),  # unreachable: DNS, timeout, connection error
    (301, "unavailable"), (308, "unavailable"),  # redirects are followed by the caller; leftovers
    (100, "unavailable"), (0, "unavailable"), (-1, "unavailable"), (600, "unavailable"),
]


@pytest.mark.parametrize("status,expected", STATUS_CASES)
def test_rules_for_response(status: int | None, expected: str) -> None:
    rules = rules_for_response(status, b"User-agent: *\nDisallow: /x\n", TOKEN)
    got = {(False, True, False): "parsed", (False, True, True): "allow", (True, False, False): "unavailable"}
    assert got[(rules.unavailable, rules.allowed("/y"), rules.allowed("/x"))] == expected
    assert rules.allowed("/robots.txt")


def test_rules_for_response_2xx_without_body_is_an_empty_file() -> None:
    assert rules_for_response(200, None, TOKEN).allowed("/x")


def test_rules_for_response_passes_truncation_on() -> None:
    rules = rules_for_response(200, b"User-agent: *\nDisallow: /x\nDisallow: /", TOKEN, truncated=True)
    assert rules.allowed("/y") and not rules.allowed("/x")


def test_verdict_strings_match_the_fetcher_reasons() -> None:
    rules = parse_robots(b"User-agent: *\nDisallow: /x\n", TOKEN)
    assert [rules.verdict("/x"), rules.verdict("/y")] == ["robots_disallow", None]
    assert UNAVAILABLE.verdict("/y") == "robots_unavailable"
    assert ALLOW_ALL.verdict("/y") is None


# --------------------------------------------------------------------------- cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _counting_loader(rules: RobotsRules) -> tuple[list[int], Callable[[], RobotsRules]]:
    calls = [0]

    def load() -> RobotsRules:
        calls[0] += 1
        return rules

    return calls, load


def test_cache_hit_then_24h_ttl_expiry() -> None:
    clock = FakeClock()
    cache = RobotsCache(clock=clock)
    calls, load = _counting_loader(ALLOW_ALL)
    assert cache.get("https://a.test", load) is ALLOW_ALL
    clock.now += 24 * 3600 - 1
    cache.get("https://a.test", load)
    assert calls[0] == 1
    clock.now += 1
    cache.get("https://a.test", load)
    assert calls[0] == 2


def test_cache_unavailable_verdict_expires_sooner() -> None:
    clock = FakeClock()
    cache = RobotsCache(clock=clock, unavailable_ttl_s=600)
    calls, load = _counting_loader(UNAVAILABLE)
    cache.get("https://a.test", load)
    clock.now += 599
    cache.get("https://a.test", load)
    assert calls[0] == 1
    clock.now += 1
    cache.get("https://a.test", load)
    assert calls[0] == 2


def test_cache_lru_eviction() -> None:
    cache = RobotsCache(max_entries=2, clock=FakeClock())
    calls, load = _counting_loader(ALLOW_ALL)
    cache.get("a", load)
    cache.get("b", load)
    cache.get("a", load)  # a is now the most recently used
    cache.get("c", load)  # evicts b
    assert (len(cache), calls[0]) == (2, 3)
    cache.get("a", load)
    cache.get("c", load)
    assert calls[0] == 3
    cache.get("b", load)
    assert calls[0] == 4


def test_cache_origins_are_independent() -> None:
    cache = RobotsCache(clock=FakeClock())
    disallow = parse_robots(b"User-agent: *\nDisallow: /\n", TOKEN)
    assert cache.get("https://a.test", lambda: disallow) is disallow
    assert cache.get("https://b.test", lambda: ALLOW_ALL) is ALLOW_ALL
    assert cache.get("https://a.test", lambda: ALLOW_ALL) is disallow


def _run_threads(n: int, target: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        results[i] = target()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    return results


def test_cache_single_flight() -> None:
    cache = RobotsCache(clock=FakeClock())
    rules = parse_robots(b"User-agent: *\nDisallow: /x\n", TOKEN)
    calls = []

    def slow_load() -> RobotsRules:
        calls.append(threading.get_ident())
        time.sleep(0.05)  # long enough for the other threads to arrive and wait
        return rules

    results = _run_threads(16, lambda: cache.get("https://a.test", slow_load))
    assert len(calls) == 1
    assert all(r is rules for r in results)


def test_cache_many_threads_many_origins_one_load_each() -> None:
    cache = RobotsCache(clock=FakeClock())
    calls: list[str] = []
    lock = threading.Lock()

    def load_for(origin: str) -> Callable[[], RobotsRules]:
        def load() -> RobotsRules:
            with lock:
                calls.append(origin)
            time.sleep(0.001)
            return ALLOW_ALL
        return load

    origins = [f"https://{i}.test" for i in range(40)]
    _run_threads(8, lambda: [cache.get(o, load_for(o)) for o in origins])
    assert sorted(calls) == sorted(origins)


def test_cache_raising_loader_gives_every_waiter_unavailable() -> None:
    clock = FakeClock()
    cache = RobotsCache(clock=clock, unavailable_ttl_s=600)
    calls = []

    def failing_load() -> RobotsRules:
        calls.append(1)
        time.sleep(0.05)
        raise OSError("connection reset")

    results = _run_threads(8, lambda: cache.get("https://a.test", failing_load))
    assert len(calls) == 1
    assert all(r is UNAVAILABLE for r in results)
    # cached with the short TTL, then retried
    assert cache.get("https://a.test", lambda: ALLOW_ALL) is UNAVAILABLE
    clock.now += 600
    assert cache.get("https://a.test", lambda: ALLOW_ALL) is ALLOW_ALL


def test_cache_base_exception_propagates_to_the_loader_only() -> None:
    cache = RobotsCache(clock=FakeClock())

    def interrupted() -> RobotsRules:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get("https://a.test", interrupted)
    assert cache.get("https://a.test", lambda: ALLOW_ALL) is UNAVAILABLE  # nobody left hanging


@pytest.mark.parametrize("kwargs", [{"ttl_s": -1}, {"unavailable_ttl_s": float("nan")}, {"max_entries": 0}])
def test_cache_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RobotsCache(**kwargs)


# --------------------------------------------------------------------------- TDM-Rep

TDM_CASES = [
    (["1"], True),
    ([" 1 "], True),
    (["0"], False),
    ([], False),
    ([""], False),
    (["0", "1"], True),  # an opt-out anywhere wins
    (["0, 1"], True),
    (["1, 0"], True),
    (["true"], False),
    (["yes"], False),
    (["2"], False),
    (["-1"], False),
    (["01"], False),
    (["1;policy"], False),
    (["\x00\ufffd"], False),
    ([None, 5, "1"], True),  # non-strings from a sloppy caller are skipped, never raised on
]


@pytest.mark.parametrize("values,expected", TDM_CASES)
def test_tdm_reserved(values: list[object], expected: bool) -> None:
    assert tdm_reserved(values) is expected  # type: ignore[arg-type]  # non-str on purpose


# --------------------------------------------------------------------------- properties

_FRAGMENTS = [
    b"User-agent:", b"user agent", b" *", b" clip-on-ray-bot", b"CLIP-ON-RAY-BOT/1", b"Disallow:", b"Allow:",
    b"Crawl-delay:", b" 1.5", b" -3", b"/", b"/a", b"*", b"$", b"%", b"%2", b"%24", b"%2F", b"?", b"#",
    b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\xef\xbb\xbf", b"\xff\xfe", b"\xe3\x83", b" ", b"\t",
    b":", b"index.html", b"\x1f", b"\x85", "\u2028".encode(),
]
_URLS = ["/", "/a", "/a$", "/a?b=/", "/index.html", "//a", "*", "", "?", "/%", "/\ud800", "/\x00", "/\u30c4",
         "http://h", "https://h:1/a?b#c", "/robots.txt", "/a b", "/%2F%24%1F"]


def test_parse_never_raises_on_random_input() -> None:
    rng = random.Random(9309)
    for i in range(3000):
        if i % 2:
            body = rng.randbytes(rng.randrange(300))
        else:
            body = b"".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(40)))
        token = rng.choice([TOKEN, "", "*", "x", "\ud800"])
        rules = parse_robots(body, token, truncated=rng.random() < 0.3)
        # the catch-all fallback (UNAVAILABLE) must not be what kept it from raising
        assert not rules.unavailable, body
        for url in rng.sample(_URLS, 4):
            assert isinstance(rules.allowed(url), bool)
        assert rules.allowed("/robots.txt")
        assert rules.crawl_delay is None or rules.crawl_delay >= 0


def _reference_allowed(rules: list[tuple[str, str]], url: str) -> bool:
    """RFC 9309 2.2.2 written out directly: longest matching pattern wins, allow wins ties; only a
    final "$" anchors, any other "$" is a literal."""
    best: tuple[int, bool] | None = None
    for kind, pattern in rules:
        anchored = pattern.endswith("$")
        body = pattern[:-1] if anchored else pattern
        regex = "".join(".*" if c == "*" else re.escape(c) for c in body) + ("$" if anchored else "")
        if re.match(regex, url, re.S):
            # length in octets of the encoded pattern (RFC 2.2.2 encodes the reserved "$" as %24)
            candidate = (len(body.replace("$", "%24")) + anchored, kind == "allow")
            best = candidate if best is None else max(best, candidate)
    return best is None or best[1]


def test_matching_agrees_with_a_reference_implementation() -> None:
    rng = random.Random(2022)
    for _ in range(2000):
        rules = [(rng.choice(["allow", "disallow"]),
                  "/" + "".join(rng.choice("ab/*$") for _ in range(rng.randrange(4))) + rng.choice(["", "$"]))
                 for _ in range(rng.randrange(1, 5))]
        robots = "user-agent: *\n" + "".join(f"{kind}: {pattern}\n" for kind, pattern in rules)
        parsed = parse_robots(robots.encode(), TOKEN)
        for _ in range(5):
            url = "/" + "".join(rng.choice("ab/$") for _ in range(rng.randrange(5)))
            assert parsed.allowed(url) is _reference_allowed(rules, url), (robots, url)
