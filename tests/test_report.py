"""The offline HTML run report: structure, escaping, no external references, and a real render.

The render tests run Debian's chromium headless (installed by `make system-deps`; a missing
browser FAILS, it does not skip): a screenshot must show the sample images' colours, and a wrapper
page that loads the report in an iframe counts the images the browser actually decoded.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.core.manifest import FileEntry, Manifest, fingerprint  # noqa: E402
from pipelines.run.report import build_report_html, write_report  # noqa: E402

EVIL = '<script>alert(1)</script> & "quotes"'
# Bright colours that nothing else on the page uses: the screenshot must contain them.
COLOURS = [(255, 0, 0), (0, 220, 0), (0, 0, 255), (255, 0, 255), (255, 230, 0), (0, 230, 230)]
# The shard stage's encode formats (jpg, png, webp): each must embed with its own MIME type.
SAMPLE_FORMATS = ["PNG", "JPEG", "WEBP"]
SAMPLE_SIZES = [(96, 64), (64, 96), (80, 80), (120, 60), (50, 100), (100, 75)]
CHROMIUM_TIMEOUT_S = 120


# ---------------------------------------------------------------- test data


def _image(colour: tuple[int, int, int], size: tuple[int, int], fmt: str) -> bytes:
    """A solid bright image with a white cross, so it is not a single flat colour."""
    a = np.empty((size[1], size[0], 3), dtype=np.uint8)
    a[:] = colour
    a[size[1] // 2 - 2 : size[1] // 2 + 2, :] = 255
    a[:, size[0] // 2 - 2 : size[0] // 2 + 2] = 255
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(a).save(buf, format=fmt, **options)
    return buf.getvalue()


def _plot_png() -> bytes:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["cat", "dog", "car"], [0.8, 0.55, 0.9])
    ax.set_ylim(0, 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _manifest(stage: str, rows_in: int, rejected: dict[str, int], n_files: int) -> dict:
    rows_out = rows_in - sum(rejected.values())
    files = [FileEntry(f"part-{i:05d}.parquet", rows_out // n_files, 1000 + 37 * i) for i in range(n_files)]
    m = Manifest(stage=stage, fingerprint=fingerprint(stage, {"n": rows_in}), files=files, rows_in=rows_in,
                 rows_out=rows_out, rejected=rejected, timings={"read": 1.25, "process": 7.5},
                 config={"api_key": "hidden"}, extra={"reused_parts": 0})
    return dataclasses.asdict(m)


def make_report() -> dict:
    crawl = _manifest("crawl", 1000, {"http_error": 120, "timeout": 30, "too_small": 50}, 2)
    filt = _manifest("filter", 800, {"aspect_ratio": 40, "caption_too_short": 110, "nsfw": 5}, 2)
    samples = []
    for i, (colour, size) in enumerate(zip(COLOURS, SAMPLE_SIZES)):
        samples.append({"image": _image(colour, size, SAMPLE_FORMATS[i % 3]),
                        "caption": EVIL if i == 0 else f"a photo of thing number {i}"})
    history = [{"step": s, "loss": 4.2 * 0.9**s + 0.3, "lr": 1e-3 * min(1.0, (s + 1) / 5), "logit_scale": 14.3 + 0.4 * s,
                "samples_per_s": 250.0 + s, "data_wait_ms": 3.0} for s in range(1, 21)]
    return {
        "title": "tiny run <b>report</b>",
        "created_at": "2026-01-02T03:04:05+00:00",
        "command": "python -m pipelines.run --config configs/run_tiny.yaml --set x='a&b'",
        # A URL in escaped text is fine; only references the browser would fetch are forbidden.
        "config": {"crawl": {"urls": "https://example.com/list.parquet"}, "train": {"steps": 20}},
        "plan": [
            {"stage": "crawl", "action": "reuse", "reason": "committed with the same fingerprint",
             "path": "/data/crawl/0123abcd", "fingerprint": crawl["fingerprint"]},
            {"stage": "filter", "action": "run", "reason": "config changed: filter.min_side", "path": "/data/filter/x",
             "fingerprint": filt["fingerprint"]},
            {"stage": "dedup", "action": "skip", "reason": "--until filter", "path": "", "fingerprint": ""},
        ],
        "stages": {"crawl": crawl, "filter": filt},
        "samples": samples,
        "train": {"summary": {"steps": 20, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
                              "mean_samples_per_s": 260.5, "export": "/data/train/model.pt"},
                  "history": history},
        "eval": {"zeroshot-cifar": {"results": {"top1": 0.4321, "top5": 0.8765, "mean_per_class": 0.41,
                                               "modes": {"single": {"top1": 0.39, "top5": 0.85, "templates": 1},
                                                         "ensemble": {"top1": 0.4321, "top5": 0.8765}},
                                               "n_images": 500},
                                   "plots": {"per_class.png": _plot_png()}}},
    }


# sample thumbnails + funnel + training curves + one eval plot
N_IMAGES = len(COLOURS) + 3


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def _parse(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A nested directory that does not exist yet: write_report creates it.
    path = tmp_path_factory.mktemp("report") / "run" / "report.html"
    assert write_report(make_report(), str(path)) == str(path)
    return path


# ---------------------------------------------------------------- structure


def test_sections_and_content(report_file: Path) -> None:
    text = report_file.read_text(encoding="utf-8")
    for section in ("plan", "stages", "samples", "train", "eval"):
        assert f'<section id="{section}">' in text
    # Only dedup (planned but skipped: no manifest) is not run.
    assert re.findall(r"[\w ]+: not run", text) == ["stage dedup: not run"]
    # The plan, colour-coded by action.
    for action in ("run", "reuse", "skip"):
        assert f'class="action action-{action}"' in text
    # Funnel: every reject reason with count and share of rows_in, sorted by count descending.
    crawl = text[text.index('id="stage-crawl"') : text.index('id="stage-filter"')]
    assert [m for m in re.findall(r"rejected: (\w+)", crawl)] == ["http_error", "too_small", "timeout"]
    assert "120" in crawl and "12.0%" in crawl and "80.0%" in crawl  # 800 of 1000 rows out
    filt = text[text.index('id="stage-filter"') :]
    assert re.findall(r"rejected: (\w+)", filt)[:3] == ["caption_too_short", "aspect_ratio", "nsfw"]
    assert "13.8%" in filt  # 110 / 800
    # Config collapsed as pretty JSON; the manifest's secret stayed redacted.
    assert '<details id="config">' in text and "&quot;steps&quot;: 20" in text
    assert "hidden" not in text
    # Training summary and eval headline metrics (percentages), plot named.
    assert "final_loss" in text and "mean_samples_per_s" in text
    for metric in ("43.21%", "87.65%", "41.00%", "single top1", "39.00%", "ensemble top5"):
        assert metric in text
    assert "<figcaption>per_class.png</figcaption>" in text


def test_user_strings_are_escaped(report_file: Path) -> None:
    text = report_file.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert html.escape(EVIL, quote=True) in text
    assert "<b>report</b>" not in text and "tiny run &lt;b&gt;report&lt;/b&gt;" in text
    assert "a&amp;b" in text


def test_offline_and_every_image_is_a_data_uri(report_file: Path) -> None:
    text = report_file.read_text(encoding="utf-8")
    page = _parse(text)
    forbidden_tags = {"script", "link", "iframe", "object", "embed", "base", "frame"}
    assert not [t for t, _ in page.tags if t in forbidden_tags]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in ("src", "href", "srcset", "poster", "action", "data", "style"):
                assert not re.search(r"https?:|^//|url\(", value.strip(), re.I), (tag, name, value[:80])
    assert not re.search(r"url\(|@import|https?:", page.style, re.I)
    # Outside escaped text (which the parser sees as data), no raw external reference exists.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', text, re.I)
    imgs = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(imgs) == N_IMAGES
    mimes = [re.match(r"data:(image/(png|jpeg|webp));base64,[A-Za-z0-9+/=]+$", a["src"]) for a in imgs]
    assert all(mimes), [a["src"][:40] for a in imgs]
    sample_mimes = [m.group(1) for m in mimes[1 : 1 + len(COLOURS)]]  # after the funnel figure
    assert sample_mimes == ["image/png", "image/jpeg", "image/webp"] * (len(COLOURS) // 3)


def test_missing_sections_render_not_run(tmp_path: Path) -> None:
    text = build_report_html({"title": "empty", "train": None, "eval": None, "stages": {"crawl": None}})
    for what in ("plan", "data stages", "samples", "training", "evaluation"):
        assert f"{what}: not run." in text
    assert "<img" not in text


def test_failed_run_as_the_runner_reports_it() -> None:
    """pipelines.run passes an error, the wall time, "pending" steps and train/evaluate manifests."""
    report = make_report()
    report["error"] = "RuntimeError: dedup worker <3> died"
    report["wall_s"] = 123.4
    report["plan"].append({"stage": "shard", "action": "pending", "reason": "after a failed stage",
                           "path": "", "fingerprint": ""})
    report["stages"]["evaluate"] = _manifest("evaluate", 500, {}, 1)  # rows_out = eval images
    text = build_report_html(report)
    assert '<div class="error" id="error"><b>run failed</b>' in text
    assert "RuntimeError: dedup worker &lt;3&gt; died" in text and "wall time 123.4 s" in text
    assert 'class="action action-pending"' in text
    # evaluate's 500 images are not a step of the data funnel: no table, no bar.
    assert 'id="stage-evaluate"' not in text and "stage shard: not run" in text


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"plan": "crawl,filter"}, "'plan'"),
        ({"plan": [{"stage": "crawl", "action": "maybe"}]}, "'plan'[0]['action']"),
        ({"stages": {"crawl": {"rows_in": "10"}}}, "'stages'['crawl']['rows_in']"),
        ({"samples": [{"image": b"GIF89a....", "caption": "x"}]}, "'samples'[0]['image']"),
        ({"error": ValueError("boom")}, "'error'"),
        ({"samples": [{"image": "not bytes"}]}, "'samples'[0]['image']"),
        ({"train": [1, 2]}, "'train'"),
        ({"eval": {"zs": {"results": {}, "plots": {"p": "x.png"}}}}, "'eval'['zs']['plots']['p']"),
    ],
)
def test_bad_input_names_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        build_report_html({**make_report(), **patch})


def test_wrong_plan_type_raises_value_error_naming_plan() -> None:
    with pytest.raises(ValueError, match="plan"):
        build_report_html({"plan": {"crawl": "run"}})


# ---------------------------------------------------------------- real render in headless chromium


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run `make system-deps` (the tests render the report in it)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
               # Any network fetch the report might attempt fails instead of hanging.
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def test_screenshot_shows_the_sample_images(report_file: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,3000", report_file.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    flat = pixels.reshape(-1, 3).astype(np.int32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    assert len(np.unique(packed)) > 200, "the screenshot is (nearly) blank"
    for colour in COLOURS:
        near = (np.abs(flat - colour).max(axis=1) <= 40).sum()
        assert near > 1000, f"sample colour {colour} not in the screenshot ({near} pixels)"


def test_rendered_dom_holds_every_image(report_file: Path) -> None:
    dom = _chromium("--dump-dom", report_file.as_uri()).stdout
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == N_IMAGES
    assert all(re.search(r'src="data:image/(png|jpeg|webp);base64,', i) for i in imgs)
    assert html.escape(EVIL, quote=False) in dom  # still text after parsing, never an element
    assert "<script" not in dom


# The iframe's load event fires once every (eager) image in it has loaded or failed. naturalWidth
# alone is not proof of decoding (a truncated PNG still reports its header's size), so the page also
# draws each image on a canvas and reads back the pixel a quarter of the way in.
WRAPPER = """<!DOCTYPE html><html><head><title>pending</title></head><body>
<iframe id="r" src="report.html" style="width:1200px;height:3000px"></iframe>
<script>
document.getElementById("r").addEventListener("load", function () {
  var doc = this.contentDocument;
  if (!doc) { document.title = "blocked"; return; }
  document.title = JSON.stringify(Array.prototype.map.call(doc.images, function (i) {
    var px = null;
    try {
      var c = document.createElement("canvas");
      c.width = i.naturalWidth; c.height = i.naturalHeight;
      var g = c.getContext("2d");
      g.drawImage(i, 0, 0);
      px = Array.prototype.slice.call(g.getImageData(i.naturalWidth >> 2, i.naturalHeight >> 2, 1, 1).data);
    } catch (e) { px = String(e); }
    return [i.naturalWidth, i.naturalHeight, px];
  }));
});
</script></body></html>
"""


def test_browser_decodes_every_image(report_file: Path) -> None:
    wrapper = report_file.parent / "decode_check.html"  # same directory: the iframe loads report.html
    wrapper.write_text(WRAPPER, encoding="utf-8")
    dom = _chromium("--allow-file-access-from-files", "--run-all-compositor-stages-before-draw",
                    "--virtual-time-budget=5000", "--dump-dom", wrapper.as_uri()).stdout
    title = html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1))
    assert title not in ("pending", "blocked"), f"the wrapper could not inspect the report: {title}"
    found = json.loads(title)
    assert len(found) == N_IMAGES
    assert all(w > 0 and h > 0 for w, h, _ in found), found
    # The thumbnails (after the funnel figure) decode at their true size and colour.
    thumbs = found[1 : 1 + len(COLOURS)]
    assert [(w, h) for w, h, _ in thumbs] == SAMPLE_SIZES
    for (_, _, px), colour in zip(thumbs, COLOURS):
        assert isinstance(px, list) and px[3] == 255, px
        assert max(abs(a - b) for a, b in zip(px[:3], colour)) <= 12, (px, colour)  # JPEG tolerance
