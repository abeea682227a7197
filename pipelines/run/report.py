"""One-file offline HTML run report: plan, per-stage funnels, sample images, training, evaluation.

The file is self-contained: inline <style>, images as base64 data: URIs, no script, no external
CSS/JS/font/URL, so it can be mailed, attached to a ticket or opened on an air-gapped machine.

`build_report_html(report)` returns the HTML text; `write_report(report, path)` writes it to a
local file (creating directories) and returns the path. The `report` dict:

    title       str                     page title (default "CLIP run report")
    created_at  str                     ISO timestamp of the run
    command     str                     the command line that started the run
    config      dict                    the resolved run config, shown collapsed as pretty JSON
    error       str | None              why the run failed, shown as a banner at the top
    wall_s      number | None           the run's wall-clock seconds
    plan        list of dict            one row per stage, in run order:
                  stage: str, action: "run" | "reuse" | "skip" | "pending", reason: str,
                  path: str, fingerprint: str  ("pending": a failed run never reached it)
    stages      {stage: manifest dict}  stages that ran or were reused; a stage missing here
                                        is shown as not run. The data pipeline section and its
                                        funnel figure leave out "train" and "evaluate" (they
                                        have their own sections). A manifest dict (as in
                                        pipelines.manifest.Manifest, extra keys ignored):
                  rows_in: int, rows_out: int, rejected: {reason: count},
                  timings: {name: seconds}, files: [{path, rows, bytes}], fingerprint: str,
                  extra: dict
    samples     list of dict            up to MAX_SAMPLES thumbnails:
                  image: bytes (PNG, JPEG or WebP file bytes), caption: str
    train       dict | None             summary: dict (steps, first_loss, final_loss,
                                        mean_samples_per_s, export, ...),
                                        history: [{step, loss, lr, logit_scale, samples_per_s, ...}]
    eval        dict | None             {eval_name: {"results": dict, "plots": {name: PNG bytes}}};
                                        results holds top1/top5 fractions and possibly
                                        "single_template"/"ensemble" sub-dicts with the same keys

Every key is optional; a missing or None section renders as a short "not run" note. A value of
the wrong type raises ValueError naming the field (e.g. "report['plan'] must be a list").
Every user-supplied string is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.core.manifest import human_bytes

import matplotlib

matplotlib.use("Agg")  # headless; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402

MAX_SAMPLES = 48
PLAN_ACTIONS = ("run", "reuse", "skip", "pending")
# Stages with their own report sections, not part of the data funnel.
NON_DATA_STAGES = ("train", "evaluate")
# Stage order of the pipeline (one source: crawl or ingest); stages outside this list follow in the order given.
STAGE_ORDER = ("crawl", "ingest", "filter", "dedup", "curate", "shard", "train", "evaluate")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1150px;padding:0 16px;color:#1d2330;background:#fff;line-height:1.4}
h1{margin-bottom:4px}h2{border-bottom:2px solid #d8dde6;padding-bottom:4px;margin-top:36px}
h3{margin:20px 0 6px}.meta{color:#555;font-size:14px}.meta code{word-break:break-all}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #d8dde6;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.fp,td.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.action{font-weight:600;border-radius:4px;padding:1px 8px;display:inline-block}
.action-run{background:#d7f5dd;color:#11602a}.action-reuse{background:#dbe8ff;color:#1d4d9e}
.action-skip{background:#eceef2;color:#555}.action-pending{background:#fff1c9;color:#7a5a00}
.error{background:#fde2e1;border:1px solid #e0a1a0;color:#8a1c1a;padding:10px 14px;border-radius:6px;
white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.notrun{color:#777;font-style:italic;margin:6px 0 14px}
details{margin:8px 0}pre{background:#f6f8fa;border:1px solid #d8dde6;padding:10px;overflow:auto;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
figure{margin:0}.grid figure{border:1px solid #d8dde6;border-radius:6px;padding:6px;background:#fafbfc}
.grid img{width:100%;height:130px;object-fit:contain;background:#fff;display:block}
figcaption{font-size:12px;color:#333;margin-top:4px;word-wrap:break-word;overflow-wrap:anywhere}
.plot img{max-width:100%;border:1px solid #d8dde6}.plot{margin:10px 0 20px}
"""


# ---------------------------------------------------------------- validation


def _check(value: Any, types: type | tuple[type, ...], field: str, what: str) -> None:
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        raise ValueError(f"report field {field} must be {what}, got {type(value).__name__}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _validate(report: Any) -> None:
    _check(report, Mapping, "report", "a dict")
    for key in ("title", "created_at", "command", "error"):
        if report.get(key) is not None:
            _check(report[key], str, f"'{key}'", "a str")
    if report.get("config") is not None:
        _check(report["config"], Mapping, "'config'", "a dict")
    if report.get("wall_s") is not None:
        _check(report["wall_s"], (int, float), "'wall_s'", "a number")

    plan = report.get("plan")
    if plan is not None:
        _check(plan, list, "'plan'", "a list of dicts")
        for i, row in enumerate(plan):
            _check(row, Mapping, f"'plan'[{i}]", "a dict")
            action = row.get("action")
            if action not in PLAN_ACTIONS:
                raise ValueError(f"report field 'plan'[{i}]['action'] must be one of {PLAN_ACTIONS}, got {action!r}")
            for key in ("stage", "reason", "path", "fingerprint"):
                if row.get(key) is not None:
                    _check(row[key], str, f"'plan'[{i}][{key!r}]", "a str")

    stages = report.get("stages")
    if stages is not None:
        _check(stages, Mapping, "'stages'", "a dict of stage name -> manifest dict")
        for name, m in stages.items():
            if m is None:
                continue
            f = f"'stages'[{name!r}]"
            _check(m, Mapping, f, "a manifest dict")
            for key in ("rows_in", "rows_out"):
                _check(m.get(key, 0), int, f"{f}[{key!r}]", "an int")
            for key in ("rejected", "timings", "extra"):
                if m.get(key) is not None:
                    _check(m[key], Mapping, f"{f}[{key!r}]", "a dict")
            for reason, n in (m.get("rejected") or {}).items():
                _check(n, int, f"{f}['rejected'][{reason!r}]", "an int")
            for name_, secs in (m.get("timings") or {}).items():
                _check(secs, (int, float), f"{f}['timings'][{name_!r}]", "a number")
            if m.get("files") is not None:
                _check(m["files"], list, f"{f}['files']", "a list")
                for j, entry in enumerate(m["files"]):
                    _check(entry, Mapping, f"{f}['files'][{j}]", "a dict with path, rows, bytes")

    samples = report.get("samples")
    if samples is not None:
        _check(samples, list, "'samples'", "a list of {image, caption} dicts")
        for i, s in enumerate(samples):
            _check(s, Mapping, f"'samples'[{i}]", "a dict")
            _check(s.get("image"), (bytes, bytearray), f"'samples'[{i}]['image']", "bytes")
            _image_mime(bytes(s["image"]), f"'samples'[{i}]['image']")
            if s.get("caption") is not None:
                _check(s["caption"], str, f"'samples'[{i}]['caption']", "a str")

    train = report.get("train")
    if train is not None:
        _check(train, Mapping, "'train'", "a dict with summary and history")
        if train.get("summary") is not None:
            _check(train["summary"], Mapping, "'train'['summary']", "a dict")
        if train.get("history") is not None:
            _check(train["history"], list, "'train'['history']", "a list of dicts")
            for i, row in enumerate(train["history"]):
                _check(row, Mapping, f"'train'['history'][{i}]", "a dict")

    ev = report.get("eval")
    if ev is not None:
        _check(ev, Mapping, "'eval'", "a dict of eval name -> {results, plots}")
        for name, entry in ev.items():
            f = f"'eval'[{name!r}]"
            _check(entry, Mapping, f, "a dict with results and plots")
            if entry.get("results") is not None:
                _check(entry["results"], Mapping, f"{f}['results']", "a dict")
            if entry.get("plots") is not None:
                _check(entry["plots"], Mapping, f"{f}['plots']", "a dict of name -> PNG bytes")
                for pname, png in entry["plots"].items():
                    _check(png, (bytes, bytearray), f"{f}['plots'][{pname!r}]", "bytes")
                    _image_mime(bytes(png), f"{f}['plots'][{pname!r}]")


# ---------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _image_mime(data: bytes, field: str = "image") -> str:
    """The MIME type from the magic bytes (the shard stage may encode jpg, png or webp)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError(f"report field {field} is not a PNG, JPEG or WebP image (first bytes {data[:12]!r})")


def _img(data: bytes, alt: str) -> str:
    data = bytes(data)
    uri = f"data:{_image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" alt="{_e(alt)}" loading="eager">'


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{_e(_num(value))}</td>'
    if isinstance(value, (Mapping, list, tuple)):
        return f"<td><code>{_e(json.dumps(value, sort_keys=True, default=str))}</code></td>"
    return f"<td>{_e(value)}</td>"


def _not_run(what: str) -> str:
    return f'<p class="notrun">{_e(what)}: not run.</p>'


def _ordered_stages(report: Mapping[str, Any]) -> list[str]:
    """Stages in plan order; stages only in `stages` follow in pipeline order, then as given."""
    names = [row["stage"] for row in report.get("plan") or [] if row.get("stage")]
    rest = [n for n in report.get("stages") or {} if n not in names]
    rest.sort(key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))  # stable
    return list(dict.fromkeys(names + rest))


# ---------------------------------------------------------------- sections


def _header(report: Mapping[str, Any]) -> str:
    title = report.get("title") or "CLIP run report"
    parts = [f"<h1>{_e(title)}</h1>", '<div class="meta">']
    created = f"created {_e(report.get('created_at') or 'unknown')}"
    if report.get("wall_s") is not None:
        created += f", wall time {float(report['wall_s']):,.1f} s"
    parts.append(f"<div>{created}</div>")
    if report.get("command"):
        parts.append(f"<div>command <code>{_e(report['command'])}</code></div>")
    parts.append("</div>")
    if report.get("error"):
        parts.append(f'<div class="error" id="error"><b>run failed</b>\n{_e(report["error"])}</div>')
    config = report.get("config")
    if config is None:
        parts.append('<p class="notrun">no config recorded.</p>')
    else:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        parts.append(f'<details id="config"><summary>resolved config</summary><pre>{_e(text)}</pre></details>')
    return "\n".join(parts)


def _plan(report: Mapping[str, Any]) -> str:
    out = ['<section id="plan"><h2>Plan</h2>']
    plan = report.get("plan")
    if not plan:
        out.append(_not_run("plan"))
    else:
        out.append("<table><tr><th>stage</th><th>action</th><th>reason</th><th>path</th><th>fingerprint</th></tr>")
        for row in plan:
            action = row["action"]
            fp = str(row.get("fingerprint") or "")
            out.append(
                f"<tr><td>{_e(row.get('stage', ''))}</td>"
                f'<td><span class="action action-{action}">{_e(action)}</span></td>'
                f"<td>{_e(row.get('reason', ''))}</td>"
                f'<td class="path">{_e(row.get("path", ""))}</td>'
                f'<td class="fp" title="{_e(fp)}">{_e(fp[:12])}</td></tr>'
            )
        out.append("</table>")
    out.append("</section>")
    return "\n".join(out)


def funnel_png(stages: Mapping[str, Any], order: Sequence[str]) -> bytes | None:
    """Bar chart of rows out per stage (with rows in of the first stage as the leftmost bar)."""
    ran = [n for n in order if stages.get(n)]
    if not ran:
        return None
    labels = [f"{ran[0]} in"] + ran
    values = [int(stages[ran[0]].get("rows_in", 0))] + [int(stages[n].get("rows_out", 0)) for n in ran]
    fig, ax = plt.subplots(figsize=(min(3 + 1.3 * len(labels), 12), 3.6))
    colors = ["#9aa5b8"] + ["#3b7dd8"] * len(ran)
    bars = ax.bar(range(len(labels)), values, color=colors)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("rows")
    ax.set_title("rows out per stage")
    ax.margins(y=0.15)
    fig.tight_layout()
    return _fig_png(fig)


def entry_counts_png(dist: Mapping[str, Any]) -> bytes | None:
    """Curate's counts per metadata entry, log-log: entries ranked by their count before balancing, with
    each entry's count before and after, and t. MetaCLIP's picture: the head flattened at t, the tail kept."""
    curve = [p for p in dist.get("curve") or [] if isinstance(p, (list, tuple)) and len(p) == 3]
    if not curve:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ranks = [p[0] for p in curve]
    ax.loglog(ranks, [max(p[1], 0.8) for p in curve], marker=".", color="#9aa5b8", label="before")
    ax.loglog(ranks, [max(p[2], 0.8) for p in curve], marker=".", color="#3b7dd8", label="after")
    if _is_number(dist.get("t")):
        ax.axhline(float(dist["t"]), color="#c0392b", linestyle="--", linewidth=1, label=f"t = {_num(dist['t'])}")
    ax.set_xlabel("entry rank (by count before balancing)")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title("curate: pairs per metadata entry")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _fig_png(fig)


def _stage_table(name: str, m: Mapping[str, Any]) -> str:
    rows_in, rows_out = int(m.get("rows_in", 0)), int(m.get("rows_out", 0))
    rejected = m.get("rejected") or {}

    def share(n: int) -> str:
        return f"{100 * n / rows_in:.1f}%" if rows_in else "-"

    out = [f'<h3 id="stage-{_e(name)}">{_e(name)}</h3>']
    fp = str(m.get("fingerprint") or "")
    if fp:
        out.append(f'<div class="meta">fingerprint <code title="{_e(fp)}">{_e(fp[:12])}</code></div>')
    out.append('<table class="funnel"><tr><th></th><th>rows</th><th>share of rows in</th></tr>')
    out.append(f'<tr><th>rows in</th><td class="num">{rows_in:,}</td><td class="num">{share(rows_in)}</td></tr>')
    out.append(f'<tr><th>rows out</th><td class="num">{rows_out:,}</td><td class="num">{share(rows_out)}</td></tr>')
    for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(
            f'<tr><td>rejected: {_e(reason)}</td><td class="num">{n:,}</td><td class="num">{share(n)}</td></tr>'
        )
    out.append("</table>")
    files = m.get("files") or []
    timings = m.get("timings") or {}
    facts = [f"{len(files)} files, {human_bytes(sum(int(f.get('bytes', 0)) for f in files))}"]
    if timings:
        facts.append("timings " + ", ".join(f"{_e(k)} {float(v):.2f} s" for k, v in timings.items()))
    out.append(f'<div class="meta">{"; ".join(facts)}</div>')
    dist = (m.get("extra") or {}).get("entry_counts")
    png = entry_counts_png(dist) if isinstance(dist, Mapping) else None
    if png is not None:
        at_cap = dist.get("entries_at_cap", 0)
        out.append(f'<figure class="plot">{_img(png, "entry counts")}<figcaption>pairs per metadata entry, before '
                   f'and after balancing ({_e(_num(at_cap))} entries over t)</figcaption></figure>')
    extra = m.get("extra")
    if extra:
        text = json.dumps(extra, indent=2, sort_keys=True, default=str)
        out.append(f"<details><summary>extra</summary><pre>{_e(text)}</pre></details>")
    return "\n".join(out)


def _stages(report: Mapping[str, Any]) -> str:
    out = ['<section id="stages"><h2>Data pipeline</h2>']
    stages = report.get("stages") or {}
    # train and evaluate have their own sections; their rows (e.g. eval images) are no funnel step.
    order = [n for n in _ordered_stages(report) if n not in NON_DATA_STAGES]
    png = funnel_png(stages, order)
    if png is None:
        out.append(_not_run("data stages"))
    else:
        out.append(f'<figure class="plot">{_img(png, "funnel")}<figcaption>funnel: rows out per stage</figcaption></figure>')
    for name in order:
        m = stages.get(name)
        out.append(_stage_table(name, m) if m else f"<h3>{_e(name)}</h3>" + _not_run(f"stage {name}"))
    out.append("</section>")
    return "\n".join(out)


def _samples(report: Mapping[str, Any]) -> str:
    out = ['<section id="samples"><h2>Samples</h2>']
    samples = (report.get("samples") or [])[:MAX_SAMPLES]
    if not samples:
        out.append(_not_run("samples"))
    else:
        out.append('<div class="grid">')
        for i, s in enumerate(samples):
            caption = s.get("caption") or ""
            out.append(f"<figure>{_img(s['image'], f'sample {i}')}<figcaption>{_e(caption)}</figcaption></figure>")
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def training_png(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Subplots of loss, lr and logit_scale against step (only the series present)."""
    keys = [k for k in ("loss", "lr", "logit_scale") if any(_is_number(r.get(k)) for r in history)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(history) if _is_number(r.get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_png(fig)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _train(report: Mapping[str, Any]) -> str:
    out = ['<section id="train"><h2>Training</h2>']
    train = report.get("train")
    if not train:
        out.append(_not_run("training"))
    else:
        summary = train.get("summary") or {}
        if summary:
            out.append("<table>")
            out.extend(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in summary.items())
            out.append("</table>")
        png = training_png(train.get("history") or [])
        if png is None:
            out.append('<p class="notrun">no training history recorded.</p>')
        else:
            out.append(f'<figure class="plot">{_img(png, "training curves")}<figcaption>training curves</figcaption></figure>')
    out.append("</section>")
    return "\n".join(out)


_PERCENT_KEYS = ("top1", "top5", "mean_per_class")  # accuracy fractions, shown as percentages


def _headline(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value): top1/top5 (and mean_per_class) as percentages, other float-valued
    top-level keys as numbers, then the same for sub-dicts holding top1/top5: "single_template",
    "ensemble", or the evaluator's "modes": {"single": ..., "ensemble": ...}."""
    rows: list[tuple[str, str]] = []

    def add(prefix: str, d: Mapping[str, Any]) -> None:
        for key in _PERCENT_KEYS:
            if _is_number(d.get(key)):
                rows.append((prefix + key, f"{100 * d[key]:.2f}%"))
        for key, v in d.items():
            if key not in _PERCENT_KEYS and isinstance(v, float):
                rows.append((prefix + key, _num(v)))

    def has_top(v: Any) -> bool:
        return isinstance(v, Mapping) and any(_is_number(v.get(k)) for k in ("top1", "top5"))

    add("", results)
    for key, v in results.items():
        if has_top(v):
            add(f"{key} ", v)
        elif isinstance(v, Mapping):
            for sub, w in v.items():
                if has_top(w):
                    add(f"{sub} " if key == "modes" else f"{key} {sub} ", w)
    return rows


def _eval(report: Mapping[str, Any]) -> str:
    out = ['<section id="eval"><h2>Evaluation</h2>']
    ev = report.get("eval")
    if not ev:
        out.append(_not_run("evaluation"))
    for name, entry in (ev or {}).items():
        out.append(f"<h3>{_e(name)}</h3>")
        rows = _headline(entry.get("results") or {})
        if rows:
            out.append("<table><tr><th>metric</th><th>value</th></tr>")
            out.extend(f'<tr><td>{_e(k)}</td><td class="num">{_e(v)}</td></tr>' for k, v in rows)
            out.append("</table>")
        else:
            out.append('<p class="notrun">no headline metrics.</p>')
        for pname, png in (entry.get("plots") or {}).items():
            out.append(f'<figure class="plot">{_img(png, pname)}<figcaption>{_e(pname)}</figcaption></figure>')
    out.append("</section>")
    return "\n".join(out)


# ---------------------------------------------------------------- API


def build_report_html(report: Mapping[str, Any]) -> str:
    """The whole report as one self-contained HTML document (see the module docstring)."""
    _validate(report)
    title = report.get("title") or "CLIP run report"
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = "\n".join([_header(report), _plan(report), _stages(report), _samples(report), _train(report), _eval(report)])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f'<footer class="meta"><p>report generated {_e(generated)}</p></footer>\n</body>\n</html>\n'
    )


def write_report(report: Mapping[str, Any], path: str) -> str:
    """Render and write the report to a local file (parent directories created); returns path."""
    text = build_report_html(report)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
