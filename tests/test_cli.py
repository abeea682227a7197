"""The command line every command shares (pipelines.core.cli) and what it shows (pipelines.core.console).

In-process calls of each command's main() for help, --print-config and the error paths (no Ray, no server:
ray.init and the demo's servers are made to fail if anything calls them); a few real `python -m ...`
subprocesses, one of which crawls a loopback web so that Ray's output has somewhere to go."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.core import console
from pipelines.core.cli import describe_keys, field_comments, is_user_error, log_file, redact, run_command
from pipelines.core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

# command -> (module with main(), a nested key its --help must list with the comment above that field)
COMMANDS = {
    "crawl": ("pipelines.crawl.stage", "fetch.max_bytes"),
    "filter": ("pipelines.filter.stage", "rules.max_per_query"),
    "dedup": ("pipelines.dedup.stage", "dedup.hamming_threshold"),
    "shard": ("pipelines.shard.stage", "output.row_group_size"),
    "train": ("pipelines.train.stage", "optim.lr"),
    "evaluate": ("pipelines.evaluate.stage", "probe.test_fraction"),
    "run": ("pipelines.run.dag", "train.optim.lr"),
    "demo": ("pipelines.demo.stage", "web_port"),
}
CONFIG_CLASS = {"crawl": "CrawlConfig", "filter": "FilterStageConfig", "dedup": "DedupStageConfig",
                "shard": "ShardConfig", "train": "TrainConfig", "evaluate": "EvalConfig", "run": "RunConfig",
                "demo": "DemoConfig"}


def _main(name: str):
    return importlib.import_module(COMMANDS[name][0]).main


def _config_class(name: str) -> type:
    return getattr(importlib.import_module(COMMANDS[name][0]), CONFIG_CLASS[name])


def _comment(cls: type, key: str) -> str:
    """The field comment of a dotted key, found by walking the nested dataclasses."""
    *sections, leaf = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    return field_comments(cls)[leaf]


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray, the SeaweedFS server and the demo's web server raise if anything starts them."""
    import ray

    from pipelines.demo.local_s3 import LocalS3
    from pipelines.demo.local_web import LocalWebServer

    def refuse(*args, **kwargs):
        raise AssertionError("a --help, --print-config or config error must not start anything")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(LocalS3, "start", refuse)
    monkeypatch.setattr(LocalWebServer, "__init__", refuse)


# ---------------------------------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_every_key_with_type_default_and_comment(name, nothing_starts, capsys) -> None:
    import ray

    was_initialized = ray.is_initialized()
    assert _main(name)(["--help"]) == 0
    out = capsys.readouterr().out
    key = COMMANDS[name][1]
    comment = _comment(_config_class(name), key)
    assert comment and _flat(comment) in _flat(out)
    assert re.search(rf"^    {re.escape(key)}: \S.* = ", out, re.M), out[:3000]  # key: type = default
    assert "--config FILE" in out and "--print-config" in out and "--verbose" in out and "--debug" in out
    assert ray.is_initialized() == was_initialized
    if name == "run":  # the runner's own flags, and no key it sets itself
        assert "--dry-run" in out and "--only" in out
        assert "crawl.output.path:" not in out and "train.storage_path:" not in out and "filter.input:" not in out
    if name == "demo":
        assert "python -m pipelines.run --help" in out  # where the run-config keys it passes on are listed


def test_help_reads_field_comments_from_the_source() -> None:
    from pipelines.crawl.fetch import FetchConfig

    # `#:` comment lines, two of them, directly above the field
    assert field_comments(FetchConfig)["max_bytes"].startswith("Largest body accepted, in bytes; enforced while "
                                                               "streaming, from Content-Length, and on the decoded")


@dataclass
class _Inner:
    # Learning rate.
    lr: float = 0.1
    kind: typing.Literal["a", "b"] = "a"  # trailing comment


@dataclass
class _Item:
    #: Item name.
    name: str


@dataclass
class _Outer:
    # Not attached: a blank line follows.

    steps: int = 3
    # Two lines
    # of comment.
    limit: int | None = None
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Item] = field(default_factory=list)
    secret_path: str = field(default="", metadata={"doc": "from metadata"})


def test_field_comments_and_key_listing() -> None:
    assert field_comments(_Outer) == {"limit": "Two lines of comment.", "secret_path": "from metadata"}
    assert field_comments(_Inner) == {"lr": "Learning rate.", "kind": "trailing comment"}
    text = describe_keys(_Outer, hide=["inner.kind"])
    assert "    steps: int = 3\n" in text and "    limit: int | null = null\n        Two lines of comment." in text
    assert "  [inner] _Inner\n    inner.lr: float = 0.1\n        Learning rate." in text
    assert "inner.kind" not in text
    assert "items[].name: str  (required)\n        Item name." in text


# ---------------------------------------------------------------------------------------------- --print-config


def test_print_config_reloads_to_the_same_config(tmp_path, nothing_starts, capsys) -> None:
    from pipelines.crawl.stage import CrawlConfig
    from pipelines.evaluate.stage import EvalConfig
    from pipelines.run.dag import load_run_config

    cases = [
        ("crawl", ["--config", str(REPO / "configs/crawl.yaml"), "input.paths=[a.parquet]", "fetch.max_bytes=1000",
                   "fetch.allow_networks=[127.0.0.1/32]", "image.image_size=48"],
         lambda p, o: load_config(CrawlConfig, p, o)),
        ("evaluate", ["checkpoint=ck", "dataset=imagefolder:d", "output=out", "probe.c_grid=[1, 10]", "plots=false",
                      "ray.num_cpus=3"], lambda p, o: load_config(EvalConfig, p, o)),
        ("run", ["--config", str(REPO / "configs/run_tiny.yaml"), "crawl.input.paths=[u.parquet]", "train.epochs=2"],
         load_run_config),
    ]
    for name, argv, load in cases:
        assert _main(name)([*argv, "--print-config"]) == 0
        printed = capsys.readouterr().out
        path = tmp_path / f"{name}.yaml"
        path.write_text(printed)
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv if "=" in a]
        assert load(str(path), []) == load(config, overrides), name
    assert "secret" not in printed and "<redacted>" not in printed
    assert redact({"s3": {"secret_access_key": "k", "region": "r"}, "fetch": {"user_agent_token": "bot"}}) == \
        {"s3": {"secret_access_key": "<redacted>", "region": "r"}, "fetch": {"user_agent_token": "bot"}}


def test_demo_print_config_shows_its_keys_and_what_it_passes_on(tmp_path, nothing_starts, capsys) -> None:
    from pipelines.demo.stage import DemoConfig

    assert _main("demo")(["shapes=100", "storage=local", "train.epochs=2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "demo.yaml").write_text(printed)
    assert load_config(DemoConfig, tmp_path / "demo.yaml") == DemoConfig(shapes=100, storage="local")
    assert "#   train.epochs=2" in printed


# ---------------------------------------------------------------------------------------------- errors


def _one_error_line(err: str, name: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pipelines.{name}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("name,argv,guess", [
    ("crawl", ["fetch.max_byte=10"], "fetch.max_bytes"),
    ("crawl", ["max_bytes=10"], "fetch.max_bytes"),  # the right name in the wrong section
    ("evaluate", ["checkpoint=c", "dataset=d", "output=o", "probe.tst_fraction=0.3"], "probe.test_fraction"),
    ("run", ["--config", str(REPO / "configs/run_tiny.yaml"), "train.epoch=3"], "train.epochs"),
    ("demo", ["shapez=10"], "shapes"),
    ("demo", ["train.epoch=3"], "train.epochs"),
])
def test_a_typo_gets_a_did_you_mean_in_one_line(name, argv, guess, nothing_starts, capsys) -> None:
    assert _main(name)(argv) == 2
    line = _one_error_line(capsys.readouterr().err, name)
    assert f"(did you mean {guess}?)" in line


def test_missing_inputs_are_one_line_naming_them(tmp_path, nothing_starts, capsys) -> None:
    out = tmp_path / "out"
    cases = [
        ("crawl", [f"input.paths=[{tmp_path}/nope.parquet]", f"output.path={out}"], f"{tmp_path}/nope.parquet"),
        ("filter", [f"input={tmp_path}/no_crawl", f"output.path={out}"], f"{tmp_path}/no_crawl"),
        ("evaluate", [f"checkpoint={tmp_path}/gone", f"dataset=imagefolder:{tmp_path}", f"output={out}"],
         f"checkpoint {tmp_path}/gone"),
        ("shard", ["--config", f"{tmp_path}/none.yaml"], f"config file {tmp_path}/none.yaml does not exist"),
        ("evaluate", ["dataset=d", "output=o"], "missing required key checkpoint"),
        ("train", ["optim.lr=-1"], "optim.lr must be > 0"),  # a dataclass's own validation
        ("crawl", ["rows_per_part"], "must look like key=value"),
        ("shard", ["--bogus"], "unrecognized arguments: --bogus"),
    ]
    for name, argv, expected in cases:
        assert _main(name)(argv) == 2, name
        assert expected in _one_error_line(capsys.readouterr().err, name)
    assert not out.exists()  # Ray never started: no log file either


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_the_dag_checks_every_stage_before_any_starts(tmp_path, nothing_starts, capsys) -> None:
    """A mistake in the last stage is one line naming it, before the first stage (or Ray) starts."""
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"], "query": ["a"]}), urls)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    for label in "ab":
        (tmp_path / "set" / label).mkdir(parents=True)
        (tmp_path / "set" / label / "0.jpg").write_bytes(_tiny_jpeg())
    root = tmp_path / "root"
    base = ["--config", str(REPO / "configs/run_tiny.yaml"), f"crawl.input.paths=[{urls}]", f"root={root}"]
    job = "evaluate=[{{name: e, dataset: 'imagefolder:{d}', templates: {t}, classnames: {c}}}]"
    cases = [
        (["train.model=vit-b/33"], "train.model"),
        ([job.format(d=tmp_path / "no_set", t="simple", c=names)], f"{tmp_path}/no_set"),
        ([job.format(d=tmp_path / "set", t=tmp_path / "prompts.txt", c=names)], "templates"),
        ([job.format(d=tmp_path / "set", t="simple", c=tmp_path / "classes.txt")], f"{tmp_path}/classes.txt"),
    ]
    for extra, expected in cases:
        assert _main("run")([*base, *extra]) == 2, extra
        assert expected in _one_error_line(capsys.readouterr().err, "run"), extra
    assert not root.exists()


def test_the_dag_checks_storage_credentials_before_any_stage(s3_server, tmp_path, nothing_starts, capsys,
                                                             monkeypatch) -> None:
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"], "query": ["a"]}), urls)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    argv = ["--config", str(REPO / "configs/run_tiny.yaml"), f"crawl.input.paths=[{urls}]",
            f"root={s3_server.uri('validate-run')}", f"s3.endpoint_url={s3_server.endpoint_url}"]
    assert _main("run")(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "run")
    assert "validate-run" in line or s3_server.bucket in line, line


def test_debug_shows_the_traceback(tmp_path, nothing_starts, capsys) -> None:
    argv = [f"input.paths=[{tmp_path}/nope.parquet]", f"output.path={tmp_path}/out", "--debug"]
    assert _main("crawl")(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"FileNotFoundError: URL list {tmp_path}/nope.parquet" in err


def test_unexpected_errors_keep_their_traceback(capsys) -> None:
    from ray.exceptions import RayTaskError

    @dataclass
    class Cfg:
        x: int = 1

    def body(cfg, args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command("thing", Cfg, [], body)
    # A ValueError raised inside a Ray worker is not a config error, although Ray makes it an instance of ValueError.
    from_worker = RayTaskError("f", "traceback", ValueError("bad")).as_instanceof_cause()
    assert isinstance(from_worker, ValueError) and not is_user_error(from_worker)
    assert is_user_error(ValueError("x")) and is_user_error(ConfigError("x")) and is_user_error(FileNotFoundError())


def test_subprocess_typo_and_help_start_nothing(tmp_path) -> None:
    env = {**os.environ, "RAY_ADDRESS": ""}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pipelines.train", "optim.lrr=0.1", "epochs=2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "(did you mean optim.lr?)" in _one_error_line(r.stderr, "train")
    r = subprocess.run([sys.executable, "-m", "pipelines.demo", "--help"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "web_port: int = 18573" in r.stdout and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "pipelines.crawl", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fetch.max_bytes: int = 8388608" in r.stdout and r.stderr == ""
    assert time.time() - t0 < 90  # imports only: no Ray cluster, no SeaweedFS, no web server
    assert list(tmp_path.iterdir()) == []  # and no log file


def test_the_dag_runner_loads_without_torch_or_sklearn() -> None:
    """`python -m pipelines.run --help`, --dry-run and config errors need the stages' configs, not the evaluate
    stage's model code: torch, sklearn and matplotlib load only when a stage that uses them runs."""
    probe = ("import sys, pipelines.run.dag, pipelines.evaluate.jobs; "
             "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    # One definition, importable where it was before the split.
    from pipelines.evaluate.config import EvalConfig, ProbeConfig
    from pipelines.evaluate.jobs import EvalConfig as JobsEvalConfig
    from pipelines.evaluate.linear_probe import ProbeConfig as ProbeFromProbe
    from pipelines.evaluate.stage import EvalConfig as StageEvalConfig

    assert JobsEvalConfig is StageEvalConfig is EvalConfig and ProbeFromProbe is ProbeConfig


# ---------------------------------------------------------------------------------------------- console


def test_log_file_paths() -> None:
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    assert log_file("run", "/data/out", now) == "/data/out/_logs/run-20260102-030405.log"
    assert log_file("train", "s3://b/runs", now) == os.path.abspath("ray-logs/train-20260102-030405.log")


def test_session_routes_ray_output_to_the_log_file(tmp_path, capfd) -> None:
    """Without starting Ray: the `ray` logger, the driver's printer of worker output (a stand-in registered
    under Ray's name), file descriptor 2 and Ray Data's progress bars are redirected, then restored."""
    import ray._private.worker as ray_worker
    import ray.data
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printer = ray_worker.print_to_stdstream
    printed: list[dict] = []
    stand_in = printed.append
    dispatcher.add_handler("ray_print_logs", stand_in)
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    path = tmp_path / "_logs" / "x.log"
    try:
        with console.session("x", str(path), status=False):
            console.attach_ray()
            assert ctx.enable_progress_bars is False
            logging.getLogger("ray").warning("a ray warning")
            dispatcher.emit({"pid": 42, "actor_name": "RayTrainWorker", "is_err": False,
                             "lines": ["[train] step 3/10 epoch 1/1 loss 1.2345 lr 1e-3 ETA 12 s", "hello"]})
            ray_worker.print_to_stdstream({"lines": ["raylet: too many workers"], "pid": "raylet", "is_err": False},
                                          ignore_prefix=False)  # the raylet's warnings come this way
            os.write(2, b"core_worker.cc: a C++ warning\n")
            print("our own output", flush=True)
            time.sleep(0.2)  # the fd-2 reader thread
        dispatcher.emit({"pid": 1, "is_err": False, "lines": ["after the session"]})
    finally:  # only the stand-in: a Ray started by an earlier test keeps its own printer
        with dispatcher._lock:
            dispatcher.handlers = [(n, h) for n, h in dispatcher.handlers if h is not stand_in]
    log = path.read_text()
    assert "a ray warning" in log and "(RayTrainWorker pid=42) hello" in log and "a C++ warning" in log
    assert "(pid=raylet) raylet: too many workers" in log and ray_worker.print_to_stdstream is printer
    out, err = capfd.readouterr()
    head = f"ray logs: {path}\nour own output\n"
    assert out.startswith(head) and err == "", (out, err)
    # After the session only Ray's own printer may print (registered when an earlier test started Ray here).
    assert all("after the session" in line for line in out[len(head):].splitlines()), out
    assert [b["lines"] for b in printed] == [["after the session"]]  # Ray's own printer is back
    assert ctx.enable_progress_bars == bars


def test_status_lines_without_a_terminal(capsys, monkeypatch) -> None:
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.5)
    monkeypatch.setattr(console, "PROGRESS_MAX_S", 0.5)
    with console.session("crawl", None, status=True):
        console.progress(done=1, total=3, rows=10)
        time.sleep(1.6)  # a line every PROGRESS_EVERY_S while it runs
        console._SESSION.status.observe("[train] step 7/20 epoch 1/2 loss 0.5000 lr 1e-3 ETA 65 s")
        console.end()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("crawl: 1/3 parts, 10 rows")
    assert re.fullmatch(r"crawl: step 7/20, 10 rows.*, loss 0\.5000, done in \ds", lines[-1]), lines[-1]


# ---------------------------------------------------------------------------------------------- a real run


@pytest.mark.slow
def _dashboard_version(url: str) -> str | None:
    """The Ray version the dashboard at `url` reports (it may take a few seconds to answer after ray.init). Ray
    2.60 clusters use token authentication: the token `ray get-auth-token` prints (~/.ray/auth_token)."""
    import urllib.request

    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return json.loads(resp.read())["ray_version"]
        except OSError:
            time.sleep(0.5)
    return None


def test_a_stage_run_shows_progress_and_funnel_and_keeps_ray_in_its_log(tmp_path) -> None:
    from pipelines.demo.local_web import LocalWebServer, WebContent
    from pipelines.demo.synthetic import shape_samples

    samples = shape_samples(30, px=32, seed=0)
    with LocalWebServer(WebContent([s.image for s in samples], [s.caption for s in samples])) as web:
        pq.write_table(pa.Table.from_pylist(web.url_list()), tmp_path / "urls.parquet")
        out = tmp_path / "crawl"
        p = subprocess.Popen(
            [sys.executable, "-m", "pipelines.crawl", f"input.paths=[{tmp_path}/urls.parquet]", f"output.path={out}",
             "fetch.allow_networks=[127.0.0.1/32]", "rows_per_part=10", "ray.num_cpus=2", "workers=1",
             "image.image_size=32"],
            # The forwarded output the log must hold ("pid=" below) is the autoscaler's status report, which Ray's log
            # monitor hands to the driver as it does a worker's output: every second here, not every 5 s, since the
            # crawl itself now takes less than that (it failed once, when no report came before the stage ended).
            cwd=REPO, env={**os.environ, "RAY_ADDRESS": "", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines, version = [], None
        for line in p.stdout:  # the dashboard answers while the stage runs
            lines.append(line.rstrip("\n"))
            if line.startswith("ray dashboard: ") and version is None:
                version = _dashboard_version(line.split()[2])
        stderr = p.stderr.read()
        assert p.wait(timeout=300) == 0, "\n".join(lines)[-3000:] + stderr[-3000:]
    r = subprocess.CompletedProcess(p.args, 0, "\n".join(lines) + "\n", stderr)
    logs = list((out / "_logs").glob("crawl-*.log"))
    assert len(logs) == 1
    assert lines[0] == f"ray logs: {logs[0]}" and r.stderr == ""
    assert re.fullmatch(r"ray dashboard: http://127\.0\.0\.1:\d+ \(token: ray get-auth-token\)", lines[1]), lines
    assert version == ray.__version__
    assert any(re.fullmatch(r"crawl: 3/3 parts, 30 rows .*done in (\d+m)?\d+s", ln) for ln in lines), r.stdout
    assert "stage crawl" in r.stdout and len(lines) < 25, r.stdout
    assert not re.search(r"INFO|WARNING|pid=|Dataset|streaming_executor", r.stdout)
    log = logs[0].read_text()
    assert "Started a local Ray instance" in log and "pid=" in log
