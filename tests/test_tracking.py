"""Training metrics where people look (pipelines/train/tracking.py): metrics.jsonl and TensorBoard events reach
the run directory on S3 while the run goes (not only at its end), and a resumed run continues one history in
TensorBoard, MLflow (a file store, offline) and W&B (offline mode). The same sinks inside a real Ray Train run
with a crash and a resume are checked in tests/test_train.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time

import pytest

from pipelines.core.config import ConfigError, load_config
from pipelines.train.config import MetricsConfig, MlflowConfig, TrainConfig, WandbConfig, run_dir
from pipelines.train.tracking import MetricSinks, run_key
from tests.metric_readers import download, tensorboard_scalars, wandb_history, wandb_logs


def _record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "world_size": 2}


CONFIG = {"model": "tiny-vit", "optim": {"lr": 0.002}}


def _first_attempt(cfg: TrainConfig, ready, go_on) -> None:
    sinks = MetricSinks(cfg, history=[], config_dict=CONFIG)
    history = []
    for step, loss in ((1, 4.0), (2, 3.5)):
        history.append(_record(step, loss))
        sinks.log(step, history[-1], history)
    sinks.flush(history)  # checkpoint 2
    ready.set()
    go_on.wait(120)
    history.append(_record(3, 3.2))
    sinks.log(3, history[-1], history)
    sinks.flush(history)  # an upload_every flush between checkpoints
    time.sleep(1.0)  # W&B's service writes what it was sent
    os._exit(9)


@pytest.fixture
def sink_config(s3_server, s3_storage, tmp_path, monkeypatch) -> TrainConfig:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the test's own MlflowClient (the sinks set it)
    return TrainConfig(storage_path=s3_storage.uri(""), s3=s3_server.s3_options(), run_name="r1", metrics=MetricsConfig(
        mlflow=MlflowConfig(tracking_uri=f"file://{tmp_path}/mlruns", experiment="tests"),
        wandb=WandbConfig(project="tests", mode="offline", dir=str(tmp_path / "wandb"))))


def test_metrics_reach_s3_while_running_and_a_resume_continues_one_history(sink_config, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = sink_config
    store = run_dir(cfg)
    # The first attempt: a worker process that checkpoints at step 2, flushes again at step 3 and is killed.
    ctx = multiprocessing.get_context("spawn")
    ready, go_on = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_first_attempt, args=(cfg, ready, go_on))
    worker.start()
    assert ready.wait(120), "the first attempt never flushed"
    # While it runs, step 1-2 are in the run directory on S3 (metrics.jsonl and TensorBoard) ...
    assert [json.loads(x)["step"] for x in store.read_bytes("metrics.jsonl").decode().splitlines()] == [1, 2]
    assert tensorboard_scalars(download(store, "tensorboard", tmp_path / "tb_live")) == {1: 4.0, 2: 3.5}
    go_on.set()
    worker.join(120)
    assert worker.exitcode == 9  # died without closing anything
    live = tensorboard_scalars(download(store, "tensorboard", tmp_path / "tb_live3"))
    assert live == {1: 4.0, 2: 3.5, 3: pytest.approx(3.2)}  # ... and step 3 after the upload_every flush
    # The rerun resumes from checkpoint 2 and redoes step 3 differently.
    history = [_record(1, 4.0), _record(2, 3.5)]  # the checkpoint's history
    second = MetricSinks(cfg, history=list(history), config_dict=CONFIG)
    for step, loss in ((3, 3.0), (4, 2.9)):
        history.append(_record(step, loss))
        second.log(step, history[-1], history)
    second.close(history)
    assert second.errors == {}
    assert [json.loads(x) for x in store.read_bytes("metrics.jsonl").decode().splitlines()] == history
    tb = tensorboard_scalars(download(store, "tensorboard", tmp_path / "tb_end"))
    assert tb == {1: 4.0, 2: 3.5, 3: 3.0, 4: pytest.approx(2.9)}  # step 3 of the dead attempt purged
    assert len([p for p in store.list("tensorboard") if "tfevents" in p]) == 2  # one event file per attempt

    # MLflow: one run for the run directory, params from the config, metrics as sent at each flush.
    client = MlflowClient(cfg.metrics.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["clip.run_dir"] == store.uri("") and runs[0].data.params["optim.lr"] == "0.002"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    # MLflow has no purge: the dead attempt's step 3 stays beside the resumed one's.
    assert losses == [(1, 4.0), (2, 3.5), (3, 3.0), (3, pytest.approx(3.2)), (4, 2.9)]

    # W&B offline: both attempts are the same run (id from the run directory). The killed attempt's service
    # wrote nothing; the resumed attempt sent the checkpoint's steps again, so its run holds steps 1-4.
    runs_dirs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs_dirs) == 2 and all(d.name.endswith(run_key(store.uri(""))) for d in runs_dirs)
    run_id, steps = wandb_history(runs_dirs[-1])
    assert run_id == run_key(store.uri(""))
    assert {s: v["train/loss"] for s, v in steps.items()} == {1: 4.0, 2: 3.5, 3: 3.0, 4: pytest.approx(2.9)}


def test_a_tracker_that_fails_mid_run_does_not_stop_training(sink_config, tmp_path) -> None:
    cfg = sink_config
    sinks = MetricSinks(cfg, history=[], config_dict={})
    history = [_record(1, 4.0)]
    sinks.log(1, history[-1], history)
    shutil.rmtree(tmp_path / "mlruns")  # the tracking store goes away under the run
    history.append(_record(2, 3.0))
    sinks.log(2, history[-1], history)
    sinks.flush(history)
    sinks.close(history)
    assert set(sinks.errors) == {"mlflow"}
    # The run directory and the other sinks are complete.
    assert len(run_dir(cfg).read_bytes("metrics.jsonl").decode().splitlines()) == 2
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    offline = runs[0]
    steps = sorted(wandb_history(offline)[1])
    # Failed once in a full suite run (steps == []), not reproduced since: the run's own logs say what W&B did.
    assert steps == [1, 2], wandb_logs(offline)


def test_a_tracker_that_cannot_open_its_run_does_not_stop_training(sink_config, tmp_path, capsys) -> None:
    """MLflow's file store rewrites a run's meta.yaml in place at each status change; a worker killed during that
    write (seen in the live-elastic test's teardown) leaves it empty, and from then on every search of the
    experiment raises. The next attempt's sinks report it and train on with the run directory and W&B."""
    from mlflow.tracking import MlflowClient

    cfg = sink_config
    client = MlflowClient(cfg.metrics.mlflow.tracking_uri)
    run = client.create_run(client.create_experiment("tests"))
    (tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id / "meta.yaml").write_text("")
    sinks = MetricSinks(cfg, history=[], config_dict={})
    assert set(sinks.errors) == {"mlflow"} and "mlflow" not in sinks.trackers
    assert "[train] metrics to mlflow failed" in capsys.readouterr().out
    history = [_record(1, 4.0)]
    sinks.log(1, history[-1], history)
    sinks.close(history)
    assert set(sinks.errors) == {"mlflow"}
    assert len(run_dir(cfg).read_bytes("metrics.jsonl").decode().splitlines()) == 1
    (offline,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert sorted(wandb_history(offline)[1]) == [1], wandb_logs(offline)


def test_metrics_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="metrics.upload_every"):
        load_config(TrainConfig, None, ["metrics.upload_every=-1"])
    with pytest.raises(ConfigError, match="metrics.wandb.mode"):
        load_config(TrainConfig, None, ["metrics.wandb.mode=sometimes"])
    cfg = load_config(TrainConfig, None, ["metrics.mlflow.tracking_uri=http://127.0.0.1:5000", "metrics.upload_every=10"])
    assert cfg.metrics.mlflow.tracking_uri == "http://127.0.0.1:5000" and cfg.metrics.upload_every == 10


def _resumed_attempt(cfg: TrainConfig, out) -> None:
    try:
        sinks = MetricSinks(cfg, history=[_record(1, 4.0)], config_dict=CONFIG)
        sinks.log(2, _record(2, 3.0), [_record(1, 4.0), _record(2, 3.0)])
        sinks.close([_record(1, 4.0), _record(2, 3.0)])
        out.put(sinks.errors)
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put({"init": f"{type(err).__name__}: {err}"})


def _process_that_started_ray(cfg: TrainConfig, out) -> None:
    """A fresh process that used W&B (its service token goes into os.environ) and holds the dead attempt's run
    open, then starts a "Ray worker" with its environment."""
    import wandb

    held = wandb.init(project="tests", mode="offline", dir=cfg.metrics.wandb.dir, id=run_key(run_dir(cfg).uri("")),
                      resume="allow", settings=wandb.Settings(console="off", silent=True))
    if not os.environ.get("WANDB_SERVICE"):
        out.put({"setup": "wandb set no WANDB_SERVICE: this test no longer sets up the shared service"})
        return
    worker = multiprocessing.get_context("spawn").Process(target=_resumed_attempt, args=(cfg, out))
    worker.start()
    worker.join(120)
    held.finish()


def test_a_resumed_rank_0_does_not_join_a_w_and_b_service_holding_the_dead_attempts_run(tmp_path) -> None:
    """Ray workers inherit the environment of the process that started Ray. When that process used W&B, its
    WANDB_SERVICE names its wandb-core service; a rank 0 that died left its run open there, and the next
    attempt's init of the same run id failed with "run ID ... is in use", ending the run (seen in the
    live-elastic test). Each rank 0 now starts a service of its own."""
    cfg = TrainConfig(storage_path=str(tmp_path / "runs"), run_name="r1", metrics=MetricsConfig(
        tensorboard=False, wandb=WandbConfig(project="tests", mode="offline", dir=str(tmp_path / "wandb"))))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    parent = ctx.Process(target=_process_that_started_ray, args=(cfg, out))
    parent.start()
    errors = out.get(timeout=180)
    parent.join(60)
    assert errors == {}
    runs_dirs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert any(sorted(wandb_history(d)[1]) == [1, 2] for d in runs_dirs), runs_dirs
