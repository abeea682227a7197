"""The demo's generated web and eval sets (the whole demo DAG is `make demo`; tests/test_run.py runs the
same DAG on a tiny config). No Ray: this checks what the demo hands to the pipeline."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.demo.stage import DemoConfig, build_web_content, split_args
from pipelines.evaluate.sets import open_eval_set
from pipelines.demo.synthetic import COLOURS, HELD_OUT, SHAPES, shape_classnames
from pipelines.demo.views import views


def test_eval_sets_carry_every_view_label_space(tmp_path) -> None:
    cfg = DemoConfig(shapes=64, digits=False, planted_duplicates=10, image_px=32, eval_per_class=2)
    content = build_web_content(cfg, str(tmp_path))
    names = shape_classnames()
    held = {f"{c} {s}" for c, s in HELD_OUT}
    for name, want_pairs, n in (("unseen", held, 2 * 2 * 4), ("seen", set(names) - held, 2 * 32)):
        table = pq.read_table(tmp_path / f"shapes_{name}.parquet")
        assert table.num_rows == n
        pairs, shapes, colours = (table.column(c).to_pylist() for c in ("label", "shape", "colour"))
        # The pair label indexes all 36 names (an unseen pair competes with every seen neighbour), and the shape
        # and colour labels are the pair's own two words.
        assert {names[i] for i in pairs} == want_pairs
        assert [names[p] for p in pairs] == [f"{list(COLOURS)[c]} {SHAPES[s]}" for s, c in zip(shapes, colours)]
    # Every view names an existing image set and label column, and its classes cover its labels.
    for view in views():
        if view.images == "digits":
            continue
        labels = pq.read_table(tmp_path / f"shapes_{view.images}.parquet").column(view.label_col).to_pylist()
        assert 0 <= min(labels) and max(labels) < len(view.classnames)
    shape_view = next(v for v in views() if v.name == "shape_unseen")
    assert not any(c in t.format(s) for t in shape_view.templates for s in shape_view.classnames for c in COLOURS)
    digits = open_eval_set(f"imagefolder:{tmp_path}/digits", None)
    assert len(digits.classnames) == 10
    # The web: 64 shapes, 10 planted copies, 15 leaked eval digits; no held-out pair in any training caption.
    assert len(content.images) == 64 + 10 + 15
    assert not any(pair in caption for caption in content.captions for pair in held)


def test_split_args_routes_demo_keys_and_run_keys() -> None:
    demo, run = split_args(["shapes=10", "train.epochs=3", "storage=local", "dedup.dedup.hamming_threshold=2"])
    assert demo == ["shapes=10", "storage=local"] and run == ["train.epochs=3", "dedup.dedup.hamming_threshold=2"]
    with pytest.raises(ValueError, match="storage must be 's3' or 'local'"):
        DemoConfig(storage="gcs")


def test_rerun_keeps_the_url_list_and_port_so_stages_are_reused(tmp_path, capsys) -> None:
    import os
    import socket

    import pyarrow as pa

    from pipelines.demo.stage import _web_server, _write_if_changed
    from pipelines.demo.local_web import WebContent

    path = str(tmp_path / "urls.parquet")
    _write_if_changed(path, pa.table({"url": ["http://127.0.0.1:1/a.jpg"]}))
    os.utime(path, ns=(1, 1))
    _write_if_changed(path, pa.table({"url": ["http://127.0.0.1:1/a.jpg"]}))
    assert os.stat(path).st_mtime_ns == 1  # same bytes: untouched, so the crawl's fingerprint holds
    _write_if_changed(path, pa.table({"url": ["http://127.0.0.1:1/b.jpg"]}))
    assert os.stat(path).st_mtime_ns != 1 and pq.read_table(path).column("url").to_pylist() == [
        "http://127.0.0.1:1/b.jpg"]
    # The preferred port when free; a busy one is said aloud and another port is used.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with _web_server(WebContent(), busy) as web:
            assert not web.base_url.endswith(f":{busy}")
        assert f"web_port {busy} is not free" in capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with _web_server(WebContent(), free) as web:
        assert web.base_url == f"http://127.0.0.1:{free}"


def test_view_jobs_label_each_set_in_its_own_order(tmp_path) -> None:
    """Each view's evaluate job: a Parquet set with its label column and its class-name list; the digits
    ImageFolder with no list, since its labels follow the sorted folder names (a list in DIGIT_NAMES order,
    zero..nine, would name every digit wrongly: the folders sort as eight, five, four, ...)."""
    import json

    import yaml

    from pipelines.demo.stage import _eval_job

    (tmp_path / "eval").mkdir()
    for view in views():
        job = yaml.safe_load(_eval_job(view, str(tmp_path)))
        assert job["name"] == view.name and job["label_col"] == view.label_col
        assert json.loads(open(job["templates"]).read()) == list(view.templates)
        assert job["single_template"] == view.templates[0]
        if view.images == "digits":
            assert job["dataset"].startswith("imagefolder:") and "classnames" not in job
        else:
            assert job["dataset"].endswith(f"shapes_{view.images}.parquet")
            assert json.loads(open(job["classnames"]).read()) == list(view.classnames)
