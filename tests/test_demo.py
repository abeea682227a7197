"""The demo's generated web and eval sets (the whole demo DAG is `make demo`; tests/test_run.py runs the
same DAG on a tiny config). No Ray: this checks what the demo hands to the pipeline."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.demo.stage import DemoConfig, build_web_content, split_args
from pipelines.evaluate.sets import open_eval_set
from pipelines.evaluate.stage import load_classnames
from pipelines.demo.synthetic import HELD_OUT, shape_classnames


def test_eval_sets_score_unseen_pairs_against_every_pair(tmp_path) -> None:
    cfg = DemoConfig(shapes=64, digits=False, planted_duplicates=10, image_px=32, eval_per_class=2)
    content = build_web_content(cfg, str(tmp_path))
    names = load_classnames(str(tmp_path / "shape_classnames.json"))
    assert names == shape_classnames() and len(names) == 36
    held = {f"{c} {s}" for c, s in HELD_OUT}
    for name, want_classes, n in (("shapes_unseen_pairs", held, 2 * 2 * 4), ("shapes_seen_pairs", set(names) - held,
                                                                             2 * 32)):
        es = open_eval_set(f"parquet:{tmp_path}/{name}.parquet", None, classnames=names)
        assert es.classnames == names  # the full label space: an unseen pair competes with all 36 names
        labels = pq.read_table(tmp_path / f"{name}.parquet").column("label").to_pylist()
        assert len(labels) == n and {names[i] for i in labels} == want_classes
    four = load_classnames(str(tmp_path / "shape_classnames_unseen.json"))
    labels = pq.read_table(tmp_path / "shapes_unseen_pairs_4way.parquet").column("label").to_pylist()
    assert set(four) == held and sorted(set(labels)) == [0, 1, 2, 3]
    assert [four[i] for i in labels] == [names[i] for i in
                                         pq.read_table(tmp_path / "shapes_unseen_pairs.parquet").column("label").to_pylist()]
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
