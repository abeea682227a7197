"""The DAG runner as users run it: `ray job submit` against a running cluster, plan-driven reruns,
and a run killed midway that, started again, commits what an uninterrupted run commits.

One local head (`ray start --head` on 127.0.0.1, its own temp dir) serves the whole module. Every
run is a separate driver process on that cluster: a submitted job, or `python -m pipelines.run`
with RAY_ADDRESS set, the way a user reruns from a head node.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.manifest import read_manifest
from pipelines.core.ports import free_ports
from pipelines.core.runtime import local_system_config
from pipelines.core.storage import Storage
from pipelines.demo.local_web import LocalWebServer, WebContent
from pipelines.demo.synthetic import digit_samples, shape_samples
from pipelines.run.dag import STAGES, Selection, load_run_config, plan
from tests.conftest import RAY_CPUS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(2400)  # a whole DAG as a job on a loaded 2-core machine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A loopback web of shapes and digits (with duplicates), its URL list and a held-out digits ImageFolder."""
    work = tmp_path_factory.mktemp("run_data")
    train = shape_samples(60, px=48, seed=3) + digit_samples("train", px=48, seed=3, limit=30)
    images = [s.image for s in train] + [s.image for s in train[:4]]
    captions = [s.caption for s in train] + [s.caption for s in train[:4]]
    queries = [s.label for s in train] + [s.label for s in train[:4]]
    for j, s in enumerate(digit_samples("test", px=48, seed=4, limit=40)):
        d = work / "eval" / "digits" / s.label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{j:04d}.jpg").write_bytes(s.image)
    with LocalWebServer(WebContent(images, captions, queries)) as web:
        urls = work / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(web.url_list()), urls)
        yield {"work": work, "urls": str(urls), "eval": str(work / "eval" / "digits"), "rows": len(images)}


def _args(data, root: str, *extra: str) -> list[str]:
    return ["--config", "configs/run_tiny.yaml", f"crawl.input.paths=[{data['urls']}]", f"root={root}",
            f"evaluate=[{{name: digits, dataset: 'imagefolder:{data['eval']}', templates: simple, overlap: true}}]",
            *extra]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with a dashboard (the job server), with the system settings of a
    local Ray of ours (idle workers kept between stages); stopped at module end."""
    temp = tempfile.mkdtemp(prefix="rh_", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, agent_http, agent_grpc, env_agent, metrics = free_ports(6)
    # Ray 2.60 clusters use token authentication: the head, `ray job` clients and drivers share one token.
    # The dashboard gets 5 minutes to come up instead of Ray's 60 s: beside the other worker's Ray clusters, on a
    # loaded 2-core machine (three xdist workers), the head gave up on it after 64 s.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={RAY_CPUS}",
         # Every agent port explicit: the defaults are fixed numbers (the dashboard agent's 52365), and a Ray
         # started earlier in the same test session (ray.init in the stage tests) already holds them, so this
         # head's agent never comes up and every submission answers "No available agent".
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp}", "--disable-usage-stats", f"--system-config={json.dumps(local_system_config(RAY_CPUS))}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_listeners(proc, {"dashboard": dash, "dashboard agent": agent_http}, log.name, temp)
        yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:  # also when start-up failed: never leave a head behind
        # SIGTERM lets `ray start --block` stop its processes; it takes ~30 s to wait on each of them, and
        # nothing here needs a graceful stop: whatever is left after 5 s is killed with the whole group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's services may sit in sessions of their own: every process of this head names its temp dir.
        for leftover in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(temp in arg for arg in leftover.info["cmdline"] or ()):
                    leftover.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_listeners(proc: subprocess.Popen, ports: dict[str, int], log: str, temp: str) -> None:
    """Ready to submit to, nearly: the dashboard (the job server) and the node's dashboard agent accept
    connections. Its job module or its list of agents may lag for a moment; `_submit` submits again then.
    (Before: a trivial job submitted until it succeeded, 15-20 s at the module's start with two `ray` CLIs.)"""
    deadline = time.time() + 180
    waiting = dict(ports)
    while waiting and time.time() < deadline:
        for name, port in list(waiting.items()):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                del waiting[name]
        assert proc.poll() is None, f"ray start exited: {Path(log).read_text()[-3000:]}"
        time.sleep(0.2)
    if waiting:
        agent_logs = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-1500:]}"
                               for p in Path(temp).glob("session_latest/logs/dashboard_agent*"))
        raise AssertionError(f"the head never listened on {waiting}:\n{Path(log).read_text()[-2000:]}\n{agent_logs}")


# What `ray job submit` prints once the job server has created the job: a submission without it created nothing
# (the job server not up yet, or still knowing no agent: "No available agent to submit job, please try again
# later.") and is safe to repeat.
SUBMITTED = "submitted successfully"


def _submit(head, args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """`ray job submit` of the DAG, submitted again while the head is not ready to create the job."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", "-m", "pipelines.run", *args]
    deadline = time.time() + 180
    while True:
        r = subprocess.run(cmd, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or SUBMITTED in r.stdout + r.stderr or time.time() > deadline:
            return r
        time.sleep(1)


def _driver(head, args: list[str], **kw) -> subprocess.Popen:
    """`python -m pipelines.run` as a driver on the running cluster (as from a head node's shell)."""
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    return subprocess.Popen([sys.executable, "-m", "pipelines.run", *args], cwd=REPO, env=env,
                            start_new_session=True, text=True, **kw)


def _committed(root: str) -> dict[str, dict]:
    """stage -> {dir, fingerprint, manifest, files} for the stage directories of the latest finished run
    (root/_last_run.json) that hold a manifest. Older outputs (other fingerprints) stay beside them."""
    dirs = json.loads(Path(root, "_last_run.json").read_text())["dirs"]
    out = {}
    for stage, path in dirs.items():
        m = read_manifest(Storage.from_uri(path), "")
        if m is not None:
            out[stage] = {"dir": path.rsplit("/", 1)[-1], "fingerprint": m.fingerprint, "manifest": m,
                          "files": [(f.path, f.rows, f.bytes) for f in m.files]}
    return out


@pytest.fixture(scope="module")
def submitted(head, data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("submitted") / "root")
    t0 = time.time()
    r = _submit(head, _args(data, root))
    return {"root": root, "proc": r, "wall_s": time.time() - t0}


def test_job_submit_runs_the_whole_dag(submitted, data):
    r = submitted["proc"]
    assert r.returncode == 0, f"job failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert "succeeded" in (r.stdout + r.stderr).lower()
    # The driver's output streams back: the plan, each stage's funnel, the summary.
    assert "plan:" in r.stdout and "stage crawl" in r.stdout and "run finished" in r.stdout
    done = _committed(submitted["root"])
    assert set(done) == set(STAGES)
    crawl = done["crawl"]["manifest"]
    assert crawl.rows_in == data["rows"] and crawl.rows_out == data["rows"]
    dedup = done["dedup"]["manifest"]
    assert dedup.rejected.get("exact_dup_image") == 4  # the four planted byte copies
    curate = done["curate"]["manifest"]  # every synthetic caption matches the demo metadata; t keeps them all
    assert curate.rows_out == dedup.rows_out and curate.extra["entry_counts"]["before"]["entries_matched"] > 0
    assert done["shard"]["manifest"].rows_out == curate.rows_out
    train = done["train"]["manifest"]
    assert train.extra["summary"]["steps"] == 4 and any(p.startswith("export/") for p, _, _ in done["train"]["files"])
    results = json.loads(Path(submitted["root"], "evaluate", done["evaluate"]["dir"], "digits", "results.json").read_text())
    assert results["n"] == 40 and 0.0 <= results["top1"] <= 1.0 and "overlap" in results
    # Each output sits under its own fingerprint.
    for stage, d in done.items():
        assert d["dir"] == d["fingerprint"][:16]
    report = Path(submitted["root"], "report.html").read_text()
    assert "<img" in report and "digits" in report


def test_job_submit_broken_config_fails_with_a_clear_message(head, data, tmp_path):
    r = _submit(head, _args(data, str(tmp_path / "root"), "train.bogus_key=1"), timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "failed" in out.lower()
    assert "unknown key train.bogus_key" in out


def test_plan_reuses_and_reruns_by_fingerprint(submitted, data, head):
    root = submitted["root"]
    cfg = load_run_config("configs/run_tiny.yaml", _args(data, root)[2:])
    assert [s.action for s in plan(cfg, Selection())] == ["reuse"] * 7
    # A shard setting changed: upstream reused, shard runs in a new directory, downstream waits on it.
    changed = load_run_config("configs/run_tiny.yaml", _args(data, root, "shard.seed=7")[2:])
    steps = {s.stage: s for s in plan(changed, Selection())}
    assert [steps[s].action for s in STAGES] == ["reuse", "reuse", "reuse", "reuse", "run", "pending", "pending"]
    assert "config or input changed" in steps["shard"].reason
    # --only train cannot run on shards this config has not made.
    with pytest.raises(ValueError, match="shard is needed by a selected stage but is not committed"):
        plan(changed, Selection(only=("train",)))
    # --from dedup recomputes dedup and everything after; --force filter recomputes filter only.
    assert [s.action for s in plan(cfg, Selection(from_="dedup"))] == ["reuse", "reuse", "run"] + ["pending"] * 4
    assert [s.action for s in plan(cfg, Selection(force=("filter",)))] == ["reuse", "run"] + ["pending"] * 5
    # --only evaluate: every stage before it must be committed (they locate its input), none runs.
    assert [s.action for s in plan(cfg, Selection(only=("evaluate",)))] == ["reuse"] * 7
    assert [s.action for s in plan(cfg, Selection(only=("crawl",)))] == ["reuse"] + ["skip"] * 6
    with pytest.raises(ValueError, match="unknown stage"):
        Selection(only=("sharding",))
    # The CLI prints the same plan and does nothing with --dry-run.
    before = _committed(root)
    p = _driver(head, _args(data, root, "shard.seed=7", "--dry-run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "shard     run" in out and "pending" in out
    assert _committed(root) == before


def _training_started(train_dir: Path) -> bool:
    """The forced train has written into its output directory and not committed it. The directory can vanish
    between two looks: `--force` removes the old output before the new run writes there."""
    try:
        return any(train_dir.iterdir()) and not (train_dir / "_manifest.json").exists()
    except FileNotFoundError:
        return False


def test_forced_and_killed_run_resumes_to_the_same_committed_outputs(submitted, data, head, tmp_path):
    """One driver forces dedup and train (`--force dedup,train`) and is SIGKILLed once training has started:
    dedup ran again and committed the same files, so curate and shard, downstream of it, were reused. The
    rerun (no --force) sees the interrupted train, finishes it and ends with the stages and files of the
    uninterrupted run. (Data stages killed midway are covered by their own kill-and-rerun tests.)"""
    root = submitted["root"]
    before = _committed(root)
    train_dir = Path(root, "train", before["train"]["dir"])
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        p = _driver(head, _args(data, root, "--force", "dedup,train"), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if _training_started(train_dir):
                break
            time.sleep(0.2)
        assert p.poll() is None, f"the run ended before it could be killed in training:\n{log.read_text()[-5000:]}"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    killed = _committed(root)
    # dedup ran again (a new manifest) and committed the same files; so curate and shard were reused.
    out = log.read_text()
    assert "== dedup: forced" in out and "== curate: reused" in out and "== shard: reused" in out, out[-5000:]
    assert killed["dedup"]["manifest"].created_at > before["dedup"]["manifest"].created_at
    assert {s: killed[s]["files"] for s in STAGES[:5]} == {s: before[s]["files"] for s in STAGES[:5]}
    assert "train" not in killed
    cfg = load_run_config("configs/run_tiny.yaml", _args(data, root)[2:])
    steps = {s.stage: s for s in plan(cfg, Selection())}
    assert [steps[s].action for s in STAGES] == ["reuse"] * 5 + ["run", "pending"]
    assert "interrupted" in steps["train"].reason
    rerun = _driver(head, _args(data, root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = rerun.communicate(timeout=1200)
    assert rerun.returncode == 0, out[-5000:]
    after = _committed(root)
    assert set(after) == set(STAGES)
    assert all(after[s]["dir"] == before[s]["dir"] for s in STAGES[:6])
    for stage in ("crawl", "filter", "dedup", "curate", "shard"):
        assert after[stage]["files"] == before[stage]["files"], stage
    assert after["train"]["manifest"].extra["summary"]["steps"] == 4
    for stage in ("train", "evaluate"):
        assert [p for p, _, _ in after[stage]["files"]] == [p for p, _, _ in before[stage]["files"]], stage
    # Evaluation follows the weights: reused only if the retrained model is bit-identical.
    same = after["train"]["manifest"].extra["model_sha256"] == before["train"]["manifest"].extra["model_sha256"]
    assert ("== evaluate: reused" in out) == same
    assert (after["evaluate"]["dir"] == before["evaluate"]["dir"]) == same


def test_config_errors_name_the_key(data, tmp_path):
    with pytest.raises(ValueError, match="dedup.output.path .* is set by the runner"):
        load_run_config("configs/run_tiny.yaml", _args(data, str(tmp_path), "dedup.output.path=/elsewhere")[2:])
    with pytest.raises(ValueError, match="unknown key dedup.dedup.hamming"):
        load_run_config("configs/run_tiny.yaml", _args(data, str(tmp_path), "dedup.dedup.hamming=3")[2:])
    with pytest.raises(ValueError, match="evaluate job names must be unique"):
        load_run_config("configs/run_tiny.yaml", _args(data, str(tmp_path))[2:-1] + [
            "evaluate=[{name: a, dataset: 'imagefolder:x'}, {name: a, dataset: 'imagefolder:y'}]"])


def test_run_config_takes_exactly_one_source(tmp_path, capsys):
    """crawl.input.paths or ingest.input: both or neither is an error naming both keys. A crawl run's stages
    are STAGES as before; an ingest run's start with ingest, filter reads it, and a selection naming crawl is
    a one-line error before any work. (No Ray, no fixture of this module.)"""
    from pipelines.core.cli import dump_yaml
    from pipelines.core.config import ConfigError
    from pipelines.run.dag import main, printable_config, stages, wire

    with pytest.raises(ConfigError, match=r"^crawl\.input\.paths and ingest\.input are both set in .*: a run starts "
                                          r"from one source; unset the other \(e\.g\. crawl=null\)$"):
        load_run_config("configs/run_tiny.yaml", ["crawl.input.paths=[u.parquet]", f"ingest.input={tmp_path}"])
    for neither in (["crawl=null"], ["crawl.input.paths=[]"], ["crawl=null", "ingest.input="]):
        with pytest.raises(ConfigError, match=r"^no data source in .*: set crawl\.input\.paths \(URL lists to "
                                              r"crawl\) or ingest\.input \(an img2dataset download to ingest\)$"):
            load_run_config("configs/run_tiny.yaml", neither)
    crawl = load_run_config("configs/run_tiny.yaml", ["crawl.input.paths=[u.parquet]"])
    assert stages(crawl) == STAGES and crawl.ingest is None
    args = ["crawl=null", f"ingest.input={tmp_path}", "ingest.query_column=query", f"root={tmp_path / 'root'}"]
    ingest = load_run_config("configs/run_tiny.yaml", args)
    assert stages(ingest) == ("ingest", *STAGES[1:]) and ingest.crawl is None
    assert ingest.ingest.query_column == "query" and ingest.filter.rules.max_per_query == 1000
    assert wire(ingest, "filter", {"ingest": "IN"}).input == "IN"
    printed = tmp_path / "printed.yaml"
    printed.write_text(dump_yaml(printable_config(ingest)))
    assert load_run_config(str(printed)) == ingest and "crawl" not in printed.read_text()
    assert Selection(from_="filter").of(ingest).forced("shard") and not Selection(from_="filter").of(ingest).forced("ingest")
    with pytest.raises(ValueError, match="^stage crawl is not in this run: its source is ingest \\(ingest.input is set\\)"):
        Selection(only=("crawl",)).of(ingest)
    for flags, message in ((["--only", "crawl"], "stage crawl is not in this run"),
                           (["--force", "filter,crawl"], "stage crawl is not in this run"),
                           (["--from", "sharding"], "unknown stage 'sharding': stages are crawl or ingest")):
        assert main(["--config", "configs/run_tiny.yaml", *args, *flags, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_evaluate_fingerprint_follows_template_and_classname_files(tmp_path):
    """Prompt and class-name files count by content: an edit of the same size still re-evaluates."""
    from pipelines.core.manifest import Manifest, write_manifest
    from pipelines.run.dag import stage_fingerprint

    train_dir = tmp_path / "train"
    write_manifest(Storage.from_uri(str(train_dir)), "",
                   Manifest(stage="train", fingerprint="1" * 64, files=[], rows_in=1, rows_out=1,
                            extra={"model_sha256": "ab" * 32}))
    templates, names = tmp_path / "t.txt", tmp_path / "names.txt"
    templates.write_text("a photo of a {}.\n")
    names.write_text("cat\ndog\n")
    job = f"evaluate=[{{name: e, dataset: 'imagefolder:x', templates: '{templates}', classnames: '{names}'}}]"
    cfg = load_run_config("configs/run_tiny.yaml", [f"root={tmp_path / 'root'}", job])
    dirs = {"train": str(train_dir)}
    before = stage_fingerprint(cfg, "evaluate", dirs)
    assert stage_fingerprint(cfg, "evaluate", dirs) == before
    templates.write_text("a photo of b {}.\n")  # same size
    after_templates = stage_fingerprint(cfg, "evaluate", dirs)
    assert after_templates != before
    names.write_text("cat\nhog\n")
    assert stage_fingerprint(cfg, "evaluate", dirs) not in (before, after_templates)
