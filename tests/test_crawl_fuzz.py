"""Fuzz the crawler: "no row, response or image can stop a crawl".

A few seeded hostile web servers (tests/hostile_web.py: odd statuses, redirects to anywhere,
broken headers and framing, broken bodies, resets, trickles, poisoned keep-alive connections, one
robots.txt variant each) and hostile URL lists in every input format (the Parquet list carries the
web fuzz's 2,000+ URLs; each text format, plain and gzipped, gets a crawl of its own).

- The fetcher alone (no Ray) must return a FetchResult for every URL and raise nothing, with no
  `internal_error` (a bug caught only by its safety net), never hand one URL the bytes another sent,
  and never need DNS.
- The real crawl stage must finish and account for every input row: rows_in is the number of rows
  the list holds (hostile_web's definition), rows_in == rows_out + rejected, every rejected row has a
  reason and none is `internal_error`, every kept image decodes and matches its sha256.

Everything is drawn from SEED; each failure message names it. To reproduce one route by hand:
`HostileWeb(SEED + i, robots=ROBOTS[i]).describe(n)` names what /f/<n> of server i sends.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import io
import ipaddress
import socket
import threading
import traceback
import urllib.parse

import pytest
from PIL import Image

from pipelines.core.config import load_config
from pipelines.crawl.stage import CrawlConfig, run
from pipelines.crawl.fetch import FetchConfig, FetchResult, SafeFetcher
from pipelines.core.manifest import Manifest
from pipelines.core.storage import Storage

from .hostile_web import LIST_FORMATS, HostileWeb, count_rows, hostile_lists

# One shared local Ray for the session (tests/conftest.py), started after the S3 server.
pytestmark = pytest.mark.usefixtures("ray_session")

SEED = 20240611
# One server per robots.txt variant (tests/hostile_web.py ROBOTS_VARIANTS); server i is seeded SEED + i.
ROBOTS = ("valid", "bom", "garbage", "hang", "redirect", "404", "empty", "binary", "unicode-digits", "500", "huge")
N_CRAWL_URLS = 1800  # the web fuzz: with the catalogue (~420 cases) over 2,000 hostile URLs
N_FETCH_URLS = 880  # the Ray-free fetcher fuzz
N_LIST_URLS = 60  # good rows per hostile list (plus its hostile lines)


@pytest.fixture(scope="module")
def webs():
    servers = [HostileWeb(SEED + i, robots=variant) for i, variant in enumerate(ROBOTS)]
    for s in servers:
        s.start()
    HostileWeb.link(servers)  # absolute redirects may cross to a sibling server
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()
    # The hostile server itself must be sound, or a failure here could be its own.
    broken = {s.seed: s.errors[:5] for s in servers if s.errors}
    assert not broken, f"the hostile web server failed in its own handlers (seed={SEED}): {broken}"


def spread(servers: list[HostileWeb], count: int, offset: int = 0) -> list[tuple[str, HostileWeb, int | str]]:
    """(url, server, n): route n = offset + i on server i mod len; every 13th URL names the host "localhost"."""
    out = []
    for i in range(count):
        web, n = servers[i % len(servers)], offset + i
        out.append((web.url(n, host="localhost" if i % 13 == 12 else "127.0.0.1"), web, n))
    return out


def catalogue(web: HostileWeb) -> list[tuple[str, HostileWeb, int | str]]:
    """One URL for every case of every route family (/k/<family>/<label>), so each is met at least once."""
    return [(web.base_url + path, web, path) for path in web.catalogue()]


def describe(web: HostileWeb, n: int | str) -> str:
    return web.describe(n) if isinstance(n, int) else web.route(n).kind


def route_of(servers: list[HostileWeb], url: str) -> str:
    """What the hostile server behind `url` answers there (robots variant and route kind), for failure messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        web = next(w for w in servers if w.port == parts.port)
    except (ValueError, StopIteration):
        return "not a hostile-web URL"
    return f"robots={web.robots_variant}, route={web.route(parts.path).kind}"


def sent_image(servers: list[HostileWeb], url: str) -> bytes | None:
    """The exact image a plain "good:" route at `url` sends (not chunked), else None."""
    try:
        parts = urllib.parse.urlsplit(url)
        web = next(w for w in servers if w.port == parts.port)
    except (ValueError, StopIteration):
        return None
    kind = web.route(parts.path).kind
    if not kind.startswith("good:") or kind.startswith("good:chunked"):
        return None
    return web.response_bytes(parts.path).split(b"\r\n\r\n", 1)[1]


# --------------------------------------------------------------------------- the fetcher alone


def fetch_config() -> FetchConfig:
    return FetchConfig(allow_networks=("127.0.0.1/32",), deadline_s=1.5, max_retries=1, backoff_base_s=0.05,
                       max_retry_after_s=1.0, max_bytes=1_000_000, max_per_host=8, seed=SEED)


class LoopbackResolver:
    """Resolves IP literals and "localhost" only; records (and refuses) any other name, which the hostile
    web promises never to send the crawler to: the fuzz must not query a real DNS server."""

    def __init__(self) -> None:
        self.refused: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        if host == "localhost":
            return ["127.0.0.1"]
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            with self._lock:
                self.refused[host] += 1
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: the fuzz resolves no names") from None


def diagnose(cfg: FetchConfig, targets: list[tuple[str, HostileWeb, int]]) -> str:
    """Fetch each URL on its own and group the exceptions by type, message and the line that raised."""
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)

    def one(target: tuple[str, HostileWeb, int]) -> None:
        url, web, n = target
        try:
            fetcher.fetch(url)
        except Exception as err:  # noqa: BLE001 - collecting them is the point
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
            key = (f"{type(err).__name__}: {str(err)[:80]}", where)
            groups[key].append(f"{url} [robots={web.robots_variant}, route={describe(web, n)}]")

    with SafeFetcher(cfg, resolver=LoopbackResolver()) as fetcher, cf.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, targets))
    lines = [f"{len(urls)} x {err} at {where}, e.g. " + "; ".join(urls[:3])
             for (err, where), urls in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(lines) or "(no URL raised when fetched on its own)"


def test_fetcher_survives_hostile_web(webs) -> None:
    targets = catalogue(webs[0]) + spread(webs, N_FETCH_URLS, offset=100_000)
    urls = [t[0] for t in targets]
    cfg = fetch_config()
    resolver = LoopbackResolver()
    try:
        with SafeFetcher(cfg, resolver=resolver) as fetcher:
            results = fetcher.fetch_many(urls, max_workers=32)
    except Exception as err:  # noqa: BLE001 - report every URL that raises, not just the first
        pytest.fail(f"SafeFetcher.fetch_many raised {type(err).__name__}: {err} (seed={SEED}). Each URL on its "
                    f"own:\n{diagnose(cfg, targets)}")
    assert len(results) == len(urls)
    bad = [(u, r) for u, r in zip(urls, results)
           if not isinstance(r, FetchResult) or r.url != u or not r.reason or (r.ok and r.body is None)]
    assert not bad, f"malformed results (seed={SEED}): {bad[:5]}"
    internal = collections.defaultdict(list)  # bugs caught only by the fetcher's safety net
    for u, r in zip(urls, results):
        if r.reason == "internal_error":
            internal[getattr(r, "detail", "")[:100]].append(f"{u} [{route_of(webs, u)}]")
    assert not internal, f"internal_error results (seed={SEED}):\n" + "\n".join(
        f"{len(v)} x {detail!r}, e.g. " + "; ".join(v[:3])
        for detail, v in sorted(internal.items(), key=lambda kv: -len(kv[1])))
    # Keep-alive: a response left half-read, an extra response or a stale connection must never hand one
    # URL's bytes to another.
    foreign = [f"{u} -> {r.final_url} [{route_of(webs, r.final_url)}]" for u, r in zip(urls, results)
               if r.ok and (sent := sent_image(webs, r.final_url)) is not None and r.body != sent]
    assert not foreign, f"ok results whose body is not what their URL sent (seed={SEED}): {foreign[:5]}"
    assert not resolver.refused, \
        f"the hostile web sent the fetcher to names that need DNS (seed={SEED}): {dict(resolver.refused)}"
    print(f"fetcher fuzz (seed={SEED}):", collections.Counter(r.reason for r in results).most_common())


# --------------------------------------------------------------------------- the crawl stage


def crawl_config(inputs: list[str], out: str, **extra) -> CrawlConfig:
    overrides = [f"input.paths=[{','.join(inputs)}]", "input.query_col=query", f"output.path={out}",
                 "fetch.allow_networks=[127.0.0.1/32]", "fetch.deadline_s=1.5", "fetch.max_bytes=1000000",
                 "fetch.max_retries=1", "fetch.backoff_base_s=0.05", "fetch.max_retry_after_s=1.0",
                 "fetch.max_per_host=8", "image.image_size=48", "rows_per_part=500", "ray.num_cpus=4"]
    return load_config(CrawlConfig, None, overrides + [f"{k}={v}" for k, v in extra.items()])


def crawl(cfg: CrawlConfig, what: str) -> Manifest:
    try:
        return run(cfg)
    except Exception as err:
        raise AssertionError(f"the crawl of {what} raised {type(err).__name__} (seed={SEED}): "
                             f"{str(err)[:3000]}") from err


def check_funnel(m: Manifest, out: str, rows_in: int, what: str, servers: list[HostileWeb]) -> None:
    ctx = f"{what}, seed={SEED}"
    print(f"{what} (seed={SEED}): rows_in={m.rows_in} rows_out={m.rows_out} rejected={m.rejected}")
    assert m.rows_in == rows_in, f"{ctx}: the input holds {rows_in} rows but the manifest says rows_in={m.rows_in}"
    assert m.rows_in == m.rows_out + sum(m.rejected.values()), f"{ctx}: the funnel does not add up"
    st = Storage.from_uri(out)
    rejected_files = [f["path"] for f in m.extra.get("rejected_files", [])]
    rejected = st.read_parquet(rejected_files).to_pylist() if rejected_files else []
    assert len(rejected) == sum(m.rejected.values()), \
        f"{ctx}: {len(rejected)} rejected rows written, the manifest counts {sum(m.rejected.values())}"
    no_reason = [r for r in rejected if not isinstance(r["reason"], str) or not r["reason"].strip()]
    assert not no_reason, f"{ctx}: rejected rows without a reason, e.g. {no_reason[:5]}"
    internal = [r for r in rejected if r["reason"] == "internal_error"]
    assert not internal, (f"{ctx}: {len(internal)} rows were caught only by the safety net (internal_error), e.g.\n"
                          + "\n".join(f"{r['url']!r} [{route_of(servers, r['url'])}]: {r['detail']!r}"[:400]
                                      for r in internal[:10]))
    kept = st.read_parquet(m.file_paths(), columns=["key", "image", "sha256"]) if m.file_paths() else None
    kept_rows = kept.num_rows if kept is not None else 0
    assert kept_rows == m.rows_out, f"{ctx}: {kept_rows} rows in the data files, manifest says {m.rows_out}"
    if kept is None:
        return
    keys = kept.column("key").to_pylist()
    assert len(set(keys)) == len(keys), f"{ctx}: a key was kept twice"
    for key, image, sha in zip(keys, kept.column("image").to_pylist(), kept.column("sha256").to_pylist()):
        assert hashlib.sha256(image).hexdigest() == sha, f"{ctx}: row {key}: sha256 does not match its image"
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{ctx}: row {key}: the kept image does not decode: {err!r}") from err


@pytest.mark.slow
def test_crawl_survives_hostile_web(webs, tmp_path) -> None:
    """Every route case once, then hundreds of random routes on every robots.txt variant: over 2,000 hostile
    URLs, read from the hostile Parquet list (binary columns, invalid UTF-8, nulls)."""
    targets = catalogue(webs[1]) + spread(webs, N_CRAWL_URLS)
    paths, rows = hostile_lists(str(tmp_path / "list"), [url for url, _, _ in targets], SEED, formats=("parquet",))
    out = str(tmp_path / "crawl")
    what = f"{len(targets)} hostile URLs in the hostile parquet list {paths['parquet']}"
    m = crawl(crawl_config([paths["parquet"]], out), what)
    check_funnel(m, out, rows["parquet"], what, webs)
    assert m.rows_out > len(targets) // 4, \
        f"seed={SEED}: only {m.rows_out} images kept: the web was too hostile to prove anything"


TEXT_FORMATS = tuple(f for f in LIST_FORMATS if f != "parquet")  # Parquet: test_crawl_survives_hostile_web


@pytest.fixture(scope="module")
def lists(webs, tmp_path_factory):
    # The good rows point at the servers whose robots.txt lets the crawler in.
    open_webs = [w for w in webs if w.robots_variant in ("valid", "bom", "404", "empty")]
    urls = [url for url, _, _ in spread(open_webs, N_LIST_URLS, offset=200_000)]
    directory = str(tmp_path_factory.mktemp("hostile-lists"))
    paths, rows = hostile_lists(directory, urls, SEED, formats=TEXT_FORMATS)
    for fmt, path in paths.items():  # the generator's own count agrees with the definition
        assert count_rows(path) == rows[fmt], f"{fmt} (seed={SEED})"
    return paths, rows


@pytest.mark.slow
@pytest.mark.parametrize("fmt", TEXT_FORMATS)
def test_crawl_survives_hostile_list(webs, lists, fmt, tmp_path) -> None:
    """Each text format, plain and gzipped: every hostile line is a row, accounted for."""
    paths, rows = lists
    out = str(tmp_path / "crawl")
    what = f"the hostile {fmt} list {paths[fmt]}"
    m = crawl(crawl_config([paths[fmt]], out), what)
    check_funnel(m, out, rows[fmt], what, webs)
