"""Where rank 0's per-step metrics go: metrics.jsonl and TensorBoard events in the run directory, and
optionally MLflow and W&B (config: TrainConfig.metrics).

The run directory is the record: metrics.jsonl (the whole history, one JSON object per step) and the
TensorBoard event files reach it at every checkpoint, every `metrics.upload_every` steps and at the end,
so a run on object storage shows its curves while it trains and keeps them when a node dies. A resumed
run continues the same history: metrics.jsonl is rewritten from the checkpoint's history, TensorBoard
drops the events past the resume step (`purge_step`), MLflow continues the run tagged with the run
directory (it has no purge: a step that a dead attempt sent and the resumed one redid has both values),
W&B the run whose id is derived from it (it keeps the first value it got for a step). A tracker that lost
steps of a dead attempt (a W&B offline run killed before its service wrote them; MLflow metrics sent after
the last checkpoint) gets the checkpoint's history again from its own last step on.

A tracking server that fails mid-run does not stop training: the error is printed once per sink and
counted in the run summary (`metrics_errors`); one that cannot be reached at start fails the run at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

from pipelines.core.storage import Storage
from pipelines.train.config import MetricsConfig, MlflowConfig, TrainConfig, WandbConfig, run_dir

#: The MLflow tag (and W&B id seed) that identifies a run directory across resumes.
RUN_TAG = "clip.run_dir"


def run_key(run_uri: str) -> str:
    """A stable id of a run directory: the W&B run id, and the MLflow tag searched on resume."""
    return hashlib.sha256(run_uri.encode()).hexdigest()[:16]


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted string params (MLflow params are flat strings, at most 6,000 chars)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v)[:6000] if not isinstance(v, str) else v[:6000]
    return out


def validate(m: MetricsConfig) -> None:
    """Config errors found before any stage runs: a sink that is asked for but not installed."""
    import importlib.util

    for key, module, on in (("metrics.mlflow.tracking_uri", "mlflow", m.mlflow.tracking_uri),
                            ("metrics.wandb.project", "wandb", m.wandb.project)):
        if on and importlib.util.find_spec(module) is None:
            raise ValueError(f"train.{key} is set but {module} is not installed: pip install 'clip-on-ray[tracking]'")


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("databricks", "sqlite", "postgresql",
                                                                             "mysql", "mssql"))


class _Mlflow:
    """One MLflow run per run directory; metrics are sent in batches (one request per flush, not per step)."""

    def __init__(self, c: MlflowConfig, run_uri: str, run_name: str, params: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        if _is_file_store(c.tracking_uri):
            # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set, and an env var set on the
            # driver does not reach Ray workers on other nodes: a file URI in the config is that opt-in.
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = MlflowClient(c.tracking_uri)
        exp = self.client.get_experiment_by_name(c.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(c.experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}.key` = '{run_key(run_uri)}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=run_name,
                                         tags={RUN_TAG: run_uri, f"{RUN_TAG}.key": run_key(run_uri)})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.pending: list = []

    def backfill(self, history: list[dict[str, Any]]) -> None:
        """Steps of `history` this run does not have yet (by its `loss` metric) are sent again."""
        have = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        for h in history:
            if h["step"] not in have:
                self.log(h["step"], h)
        self.flush()

    def log(self, step: int, record: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in record.items() if k != "step"]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1,000 metrics per batch
            self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])

    def close(self, ok: bool) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _Wandb:
    def __init__(self, c: WandbConfig, run_uri: str, run_name: str, params: dict[str, Any]) -> None:
        import wandb

        if c.dir:
            os.makedirs(c.dir, exist_ok=True)
        # WANDB_SERVICE names the wandb-core service of the process that set it, and Ray workers inherit the
        # environment of the process that started Ray. A rank 0 that died left its run open in such a shared
        # service, and the next attempt's init of the same run id failed with "run ID ... is in use", ending
        # a resized run (seen in the live-elastic test). Each rank 0 runs a service of its own; one it
        # started itself in this process is kept (wandb holds it, whatever the variable says).
        os.environ.pop("WANDB_SERVICE", None)
        self.run = wandb.init(project=c.project, entity=c.entity or None, mode=c.mode, dir=c.dir or None,
                              id=run_key(run_uri), resume="allow", name=run_name, config=params,
                              settings=wandb.Settings(console="off", silent=True))

    def backfill(self, history: list[dict[str, Any]]) -> None:
        """Steps after the last one W&B has for this run (0 in offline mode) are sent again."""
        for h in history:
            if h["step"] > self.run.step:
                self.log(h["step"], h)

    def log(self, step: int, record: dict[str, float]) -> None:
        # W&B drops steps at or below the last one it has (a resume repeats the steps after its checkpoint):
        # the first attempt's values stay.
        self.run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def flush(self) -> None:
        pass  # W&B's own service process sends as it goes

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MetricSinks:
    """Rank 0's metric outputs. `log` every step; `flush` at checkpoints (copies to the run directory);
    `close` at the end."""

    def __init__(self, cfg: TrainConfig, history: list[dict[str, Any]], config_dict: dict[str, Any],
                 storage: Storage | None = None) -> None:
        """`history`: the metrics of the checkpoint this run resumes from ([] for a new run); `storage`: the run
        directory, when the caller has it open already (default: run_dir(cfg))."""
        resumed_at = history[-1]["step"] if history else 0
        self.storage = storage if storage is not None else run_dir(cfg)
        self.every = cfg.metrics.upload_every
        self.remote = self.storage.uri("").startswith("s3://")
        self.errors: dict[str, str] = {}
        self.uploaded: dict[str, int] = {}
        self.tb_dir: str | None = None
        self.writer = None
        if cfg.metrics.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = tempfile.mkdtemp(prefix="tb_") if self.remote else self.storage.fs_path("tensorboard")
            # A resumed run redoes the steps after its checkpoint: TensorBoard drops the older attempt's events
            # from purge_step on, so each step has one value.
            self.writer = SummaryWriter(log_dir=self.tb_dir, purge_step=resumed_at + 1 if resumed_at else None)
        uri = self.storage.uri("")
        self.trackers: dict[str, Any] = {}
        # A tracker that cannot open its run is reported like any other sink failure, and training goes on without
        # it: an MLflow file store whose run meta.yaml a killed worker left empty (MLflow rewrites it in place
        # at every status change) makes every search of the experiment raise.
        if cfg.metrics.mlflow.tracking_uri:
            self._guard("mlflow", self._open, "mlflow",
                        lambda: _Mlflow(cfg.metrics.mlflow, uri, cfg.run_name, flat_params(config_dict)))
        if cfg.metrics.wandb.project:
            self._guard("wandb", self._open, "wandb", lambda: _Wandb(cfg.metrics.wandb, uri, cfg.run_name, config_dict))
        if history:
            for name, t in self.trackers.items():
                self._guard(name, t.backfill, history)

    def _open(self, name: str, make) -> None:
        self.trackers[name] = make()

    def _guard(self, name: str, fn, *args, retry: bool = False) -> None:
        """Call a sink; its first failure is printed and recorded. A tracker that failed is not called again;
        the run directory (`retry`) is tried again at the next flush, and must succeed at close."""
        if name in self.errors and not retry:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a metrics server must not end a training run
            if name not in self.errors:
                print(f"[train] metrics to {name} failed: {type(err).__name__}: {err} (training goes on"
                      f"{', will retry' if retry else ''})", flush=True)
            self.errors[name] = f"{type(err).__name__}: {err}"[:500]

    def log(self, step: int, record: dict[str, float], history: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, step)
        for name, t in self.trackers.items():
            self._guard(name, t.log, step, record)
        if self.every and step % self.every == 0:
            self.flush(history)

    def flush(self, history: list[dict[str, Any]]) -> None:
        """metrics.jsonl and the TensorBoard events into the run directory; pending tracker batches out."""
        self._guard("run directory", self._write_run_dir, history, retry=True)
        for name, t in self.trackers.items():
            self._guard(name, t.flush)

    def _write_run_dir(self, history: list[dict[str, Any]]) -> None:
        self.storage.write_bytes("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
        if self.writer is None:
            return
        self.writer.flush()
        if not self.remote:
            return
        for root, _, files in os.walk(self.tb_dir):
            for name in files:
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                if self.uploaded.get(path) != size:  # event files only grow: copy the ones that did
                    with open(path, "rb") as f:
                        self.storage.write_bytes(f"tensorboard/{os.path.relpath(path, self.tb_dir)}", f.read())
                    self.uploaded[path] = size

    def close(self, history: list[dict[str, Any]], ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
        self._write_run_dir(history)  # metrics.jsonl is a committed output: a failure here fails the run
        self.errors.pop("run directory", None)
        for name, t in self.trackers.items():
            self._guard(name, t.close, ok)
        if self.remote and self.tb_dir:
            shutil.rmtree(self.tb_dir, ignore_errors=True)

    def abort(self, history: list[dict[str, Any]]) -> None:
        """The loop raised: what the sinks have so far goes out, trackers mark the run failed (a rerun of the
        same run_name resumes and reopens them)."""
        if self.writer is not None:
            self._guard("tensorboard", self.writer.close)
        self._guard("run directory", self._write_run_dir, history, retry=True)
        for name, t in self.trackers.items():
            self._guard(name, t.close, False)
