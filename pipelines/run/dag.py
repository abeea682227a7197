"""The whole DAG from one config: crawl -> filter -> dedup -> shard -> train -> evaluate.

    python -m pipelines.run --config configs/run_tiny.yaml [key=value ...]
        [--only STAGE[,STAGE]] [--from STAGE] [--force STAGE[,STAGE]] [--dry-run]

Every stage's output lives under `<root>/<stage>/<fingerprint[:16]>`, where the fingerprint is the
one the stage itself commits under: its result-shaping settings plus its inputs' manifests (for the
crawl, the URL lists' paths and sizes). So a rerun finds finished work by looking, not by
remembering: a stage whose directory holds a manifest with its fingerprint is reused; a config
change lands in a new directory (the old one stays, so switching back is free); a stage killed
midway resumes from its committed parts, because the rerun computes the same directory.

Before any work the runner prints the plan (which stages run, which are reused, and why). A stage
downstream of one that runs cannot know its fingerprint yet (that needs the new input manifest),
so the plan shows it as pending and the decision is made when its input has committed.

Selection:
  --only A[,B]  run just these stages; the stages they read must already be committed.
  --from A      recompute A and every stage after it; stages before A must already be committed.
  --force A[,B] recompute these stages even if committed (their directory is cleared first).
                A stage after a forced one is redone only if the forced stage's output changed.
  --dry-run     print the plan and exit.

At the end (and when a stage fails) the run writes `<root>/report.html`, one offline HTML file: the
plan, each stage's funnel, sample images with captions, training curves and evaluation results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pipelines.core import console
from pipelines.core.cli import run_command
from pipelines.core.config import ConfigError, build_config, load_raw, to_dict
from pipelines.crawl.stage import CrawlConfig
from pipelines.dedup.stage import DedupStageConfig
from pipelines.evaluate.stage import TASKS
from pipelines.filter.stage import FilterStageConfig
from pipelines.core.manifest import Manifest, fingerprint, read_manifest, write_manifest
from pipelines.shard.stage import ShardConfig
from pipelines.core.parts import OutputConfig
from pipelines.core.runtime import RayConfig
from pipelines.core.storage import S3Options, Storage
from pipelines.train.stage import TrainConfig

STAGES = ("crawl", "filter", "dedup", "shard", "train", "evaluate")
DATA_STAGES = STAGES[:4]


@dataclass
class EvalJob:
    # Names the job's output folder and its section in the report.
    name: str
    # imagefolder:DIR or parquet:PATH (see pipelines.evaluate).
    dataset: str
    task: str = "zeroshot"
    classnames: str | None = None
    # "openai-imagenet" (the paper's 80), "simple", or a JSON/text file of templates.
    templates: str = "openai-imagenet"
    # Paper section 5: split the eval set into Clean / Overlap against this run's training shards.
    overlap: bool = False
    overlap_hamming: int = 8
    probe_train: str | None = None
    batch_size: int = 64
    workers: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ValueError(f"evaluate job name {self.name!r} must be letters, digits, '_', '.', '-'")
        if not self.dataset:
            raise ValueError(f"evaluate job {self.name}: dataset must be given")
        if self.task not in TASKS:
            raise ValueError(f"evaluate job {self.name}: task must be one of {list(TASKS)}, got {self.task!r}")


@dataclass
class ReportConfig:
    # Also write the report to this local file ("" = only <root>/report.html).
    path: str = ""
    # Sample images (with captions) from the training shards shown in the report.
    samples: int = 24


@dataclass
class RunConfig:
    # The stages' settings, as in their own configs. The runner sets what wires them together
    # (each stage's input, output path, S3 options and Ray settings); setting those here is an error.
    crawl: CrawlConfig
    # Where every stage's output goes: a local directory or s3://bucket/prefix.
    root: str = "out/run"
    # Connection settings for root and for the stages' S3 inputs (credentials from the AWS env/profile).
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)
    filter: FilterStageConfig = field(default_factory=FilterStageConfig)
    dedup: DedupStageConfig = field(default_factory=DedupStageConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: list[EvalJob] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root must be a local directory or s3:// prefix")
        names = [j.name for j in self.evaluate]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate job names must be unique, got {names}")


# Keys the runner sets in each stage section (see wire()); a config that sets them is an error.
WIRED_KEYS = {
    "crawl": ("output.path", "output.s3", "ray"),
    "filter": ("input", "input_s3", "output.path", "output.s3", "ray"),
    "dedup": ("input", "input_s3", "output.path", "output.s3", "ray"),
    "shard": ("input", "input_s3", "output.path", "output.s3", "ray"),
    "train": ("data.manifest", "data.s3", "storage_path", "run_name", "s3", "ray"),
}


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """RunConfig from YAML + overrides. Wired keys are refused, then filled with placeholders so that
    each stage section validates as that stage's own config (errors name e.g. `dedup.dedup.partitions`)."""
    data, source = load_raw(path, overrides)
    for stage, keys in WIRED_KEYS.items():
        section = data.get(stage) or {}
        for key in keys:
            node = section
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigError(f"{stage}.{key} in {source} is set by the runner (stage outputs go under "
                                  "root/<stage>/<fingerprint>; S3 and Ray settings come from the top-level s3 "
                                  "and ray sections): remove it")
    for stage in ("filter", "dedup", "shard"):
        if not isinstance(data.get(stage, {}), dict):
            raise ConfigError(f"{stage} in {source} must be a mapping")
        data.setdefault(stage, {})["input"] = f"<{STAGES[STAGES.index(stage) - 1]} output, set by the runner>"
    return build_config(RunConfig, data, source)


# ---------------------------------------------------------------------------------------------
# Wiring: each stage's config with its input, output, S3 and Ray settings filled in.


def stage_dir(cfg: RunConfig, stage: str, fp: str) -> str:
    return f"{cfg.root.rstrip('/')}/{stage}/{fp[:16]}"


def _output(cfg: RunConfig, section: OutputConfig, path: str) -> OutputConfig:
    return dataclasses.replace(section, path=path, s3=cfg.s3)


def wire(cfg: RunConfig, stage: str, dirs: dict[str, str], fp: str | None = None) -> Any:
    """The stage's own config, reading its upstream's directory; `fp` (when known) names its output."""
    out = stage_dir(cfg, stage, fp) if fp else ""
    if stage == "crawl":
        return dataclasses.replace(cfg.crawl, output=_output(cfg, cfg.crawl.output, out), ray=cfg.ray)
    if stage in ("filter", "dedup", "shard"):
        section = getattr(cfg, stage)
        upstream = STAGES[STAGES.index(stage) - 1]
        return dataclasses.replace(section, input=dirs[upstream], input_s3=cfg.s3,
                                   output=_output(cfg, section.output, out), ray=cfg.ray)
    if stage == "train":
        data = dataclasses.replace(cfg.train.data, manifest=dirs["shard"], s3=cfg.s3)
        return dataclasses.replace(cfg.train, data=data, s3=cfg.s3, ray=cfg.ray,
                                   storage_path=f"{cfg.root.rstrip('/')}/train",
                                   run_name=fp[:16] if fp else TrainConfig.run_name)
    raise KeyError(stage)


def _job_fingerprint(job: EvalJob) -> dict:
    """The job's settings, plus its template and class-name files by content (an edited prompt list of the
    same path must re-evaluate). Named template sets ("openai-imagenet") are not files and count by name."""
    out = to_dict(job)
    for key in ("templates", "classnames"):
        path = getattr(job, key)
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                out[f"{key}_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return out


def stage_fingerprint(cfg: RunConfig, stage: str, dirs: dict[str, str]) -> str:
    """The fingerprint `stage` commits under, given its upstream directories (which must be committed)."""
    from pipelines import crawl
    from pipelines import dedup
    from pipelines import filter as filter_
    from pipelines import shard
    from pipelines import train

    if stage == "evaluate":
        train_manifest = _manifest(cfg, dirs["train"])
        jobs = [_job_fingerprint(j) for j in cfg.evaluate]
        # The weights' hash, not only the train manifest: a forced retrain commits the same file names and
        # sizes under the same fingerprint, with (possibly) other weights.
        return fingerprint("evaluate", {"jobs": jobs, "model_sha256": train_manifest.extra.get("model_sha256")},
                           [train_manifest])
    module = {"crawl": crawl, "filter": filter_, "dedup": dedup, "shard": shard, "train": train}[stage]
    return module.fingerprint_of(wire(cfg, stage, dirs))


def _manifest(cfg: RunConfig, directory: str) -> Manifest:
    m = read_manifest(Storage.from_uri(directory, cfg.s3), "")
    if m is None:
        raise FileNotFoundError(f"{directory} has no _manifest.json")
    return m


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclass
class Step:
    stage: str
    action: str  # "run" | "reuse" | "skip" | "pending"
    reason: str
    fingerprint: str = ""
    path: str = ""

    def line(self) -> str:
        fp = self.fingerprint[:16] if self.fingerprint else "?" * 16
        return f"  {self.stage:<9} {self.action:<8} {fp}  {self.reason}"


@dataclass
class Selection:
    only: tuple[str, ...] = ()
    from_: str | None = None
    force: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*self.only, *self.force, *([self.from_] if self.from_ else [])):
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}: stages are {', '.join(STAGES)}")
        if self.only and self.from_:
            raise ValueError("--only and --from cannot be combined")

    def selected(self, stage: str) -> bool:
        if self.only:
            return stage in self.only
        if self.from_:
            return STAGES.index(stage) >= STAGES.index(self.from_)
        return True

    def forced(self, stage: str) -> bool:
        return stage in self.force or (self.from_ is not None and STAGES.index(stage) >= STAGES.index(self.from_))

    def needed_later(self, stage: str) -> bool:
        return any(self.selected(s) for s in STAGES[STAGES.index(stage) + 1:])


def decide(cfg: RunConfig, stage: str, dirs: dict[str, str], sel: Selection, upstream_runs: str | None) -> Step:
    """What to do with one stage now. `upstream_runs` names a stage before it that is still to run."""
    if stage == "evaluate" and not cfg.evaluate:
        return Step(stage, "skip", "no evaluate jobs configured")
    if not sel.selected(stage) and not sel.needed_later(stage):
        return Step(stage, "skip", "not selected")
    if upstream_runs is not None:
        if not sel.selected(stage):
            raise ValueError(f"{stage} is needed by a selected stage but its input ({upstream_runs}) is not "
                             "committed: run without --only/--from first")
        return Step(stage, "pending", f"decided once {upstream_runs} has committed (its output may change)")
    fp = stage_fingerprint(cfg, stage, dirs)
    path = stage_dir(cfg, stage, fp)
    committed = _committed(cfg, path, fp)
    if not sel.selected(stage):
        if not committed:
            raise ValueError(f"{stage} is needed by a selected stage but is not committed at {path} (this config "
                             "has not run it yet): run without --only/--from first")
        return Step(stage, "reuse", "committed (not selected, read by a selected stage)", fp, path)
    if sel.forced(stage):
        return Step(stage, "run", "forced" + (" (recomputes its committed output)" if committed else ""), fp, path)
    if committed and stage == "crawl" and cfg.crawl.retry_failed:
        return Step(stage, "run", "recrawls its transient failures (crawl.retry_failed)", fp, path)
    if committed:
        return Step(stage, "reuse", "committed with this config and input", fp, path)
    return Step(stage, "run", _why_not_committed(cfg, stage, path), fp, path)


def _committed(cfg: RunConfig, path: str, fp: str) -> bool:
    m = read_manifest(Storage.from_uri(path, cfg.s3), "")
    return m is not None and m.fingerprint == fp


def _why_not_committed(cfg: RunConfig, stage: str, path: str) -> str:
    st = Storage.from_uri(path, cfg.s3)
    parts = st.list("_parts") if stage in DATA_STAGES else []
    if parts:
        return f"resumes an interrupted run ({len(parts)} parts already committed)"
    if st.list("", recursive=False):
        return "resumes an interrupted run"
    parent = Storage.from_uri(f"{cfg.root.rstrip('/')}/{stage}", cfg.s3)
    others = sorted(p.rstrip("/") for p in parent.list("", recursive=False) if p.endswith("/"))
    if others:
        return f"config or input changed (earlier outputs: {', '.join(others[:3])})"
    return "never run"


def plan(cfg: RunConfig, sel: Selection) -> list[Step]:
    """The plan as far as it can be known now (downstream of a stage that runs is pending)."""
    steps, dirs, upstream_runs = [], {}, None
    for stage in STAGES:
        step = decide(cfg, stage, dirs, sel, upstream_runs)
        steps.append(step)
        if step.action == "run" and upstream_runs is None:
            upstream_runs = stage
        if step.path:
            dirs[stage] = step.path
    return steps


def format_plan(steps: list[Step], title: str = "plan") -> str:
    return "\n".join([f"{title}:", *(s.line() for s in steps)])


# ---------------------------------------------------------------------------------------------
# Execution.


def run_pipeline(cfg: RunConfig, sel: Selection = Selection(), dry_run: bool = False,
                 command: str = "", initial: list[Step] | None = None) -> dict[str, Any]:
    """Run the DAG; returns {"plan": [...], "dirs": {stage: path}, "report": uri, ...}.
    `initial`: the plan if the caller already computed it (the CLI does, to report its errors)."""
    started = time.time()
    initial = initial if initial is not None else plan(cfg, sel)
    print(format_plan(initial), flush=True)
    if dry_run:
        return {"plan": [dataclasses.asdict(s) for s in initial], "dirs": {s.stage: s.path for s in initial if s.path}}
    executed: list[Step] = []
    dirs: dict[str, str] = {}
    results: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        for stage in STAGES:
            step = decide(cfg, stage, dirs, sel, None)
            executed.append(step)
            if step.action == "skip":
                continue
            dirs[stage] = step.path
            console.end()  # the previous stage's status line, before this stage's header
            if step.action == "reuse":
                print(f"\n== {stage}: reused {step.path}", flush=True)
                continue
            print(f"\n== {stage}: {step.reason} -> {step.path}", flush=True)
            console.begin(stage)  # its status line, under a command (pipelines.core.console)
            if sel.forced(stage):
                parent, name = step.path.rsplit("/", 1)
                Storage.from_uri(parent, cfg.s3).delete_prefix(name)
            results[stage] = _execute(cfg, stage, dirs, step)
    except BaseException as err:  # the report is written for a failed run too, then the error propagates
        error = err
        raise
    finally:
        report_uri = _write_report(cfg, executed, dirs, started, command, error)
        summary = {"plan": [dataclasses.asdict(s) for s in executed], "dirs": dirs, "report": report_uri,
                   "wall_s": round(time.time() - started, 1), "failed": repr(error) if error else None}
        Storage.from_uri(cfg.root, cfg.s3).write_bytes("_last_run.json", json.dumps(summary, indent=2).encode())
    console.end()
    print(format_plan(executed, "done"), flush=True)
    print(f"run finished in {summary['wall_s']:.0f} s; report: {report_uri}", flush=True)
    return {**summary, "results": results}


def _execute(cfg: RunConfig, stage: str, dirs: dict[str, str], step: Step) -> Any:
    from pipelines import crawl
    from pipelines import dedup
    from pipelines import filter as filter_
    from pipelines import shard

    if stage in DATA_STAGES:
        module = {"crawl": crawl, "filter": filter_, "dedup": dedup, "shard": shard}[stage]
        stage_cfg = wire(cfg, stage, dirs, step.fingerprint)
        if stage == "crawl" and stage_cfg.retry_failed and not _committed(cfg, step.path, step.fingerprint):
            stage_cfg = dataclasses.replace(stage_cfg, retry_failed=False)  # nothing to recrawl yet: a first crawl
        manifest = module.run(stage_cfg)
        if manifest.fingerprint != step.fingerprint:
            raise AssertionError(f"{stage} committed fingerprint {manifest.fingerprint[:16]} but the plan "
                                 f"computed {step.fingerprint[:16]}: stage_fingerprint is out of date")
        return {"rows_out": manifest.rows_out}
    if stage == "train":
        return _train(cfg, dirs, step)
    return _evaluate(cfg, dirs, step)


def _train(cfg: RunConfig, dirs: dict[str, str], step: Step) -> dict[str, Any]:
    from pipelines.train.stage import run_training

    tcfg = wire(cfg, "train", dirs, step.fingerprint)
    summary = run_training(tcfg)
    shard = _manifest(cfg, dirs["shard"])
    out = Storage.from_uri(step.path, cfg.s3)
    files = [{"path": p, "rows": 0, "bytes": out.size(p)}
             for p in sorted(out.list("export")) + ["summary.json", "metrics.jsonl"]]
    write_manifest(out, "", Manifest(stage="train", fingerprint=step.fingerprint, files=files, rows_in=shard.rows_out,
                                     rows_out=shard.rows_out, config=to_dict(tcfg),
                                     timings={"total_s": summary.get("driver_wall_s", 0.0)},
                                     extra={"summary": summary, "model_sha256": summary["model_sha256"]}))
    return summary


def _evaluate(cfg: RunConfig, dirs: dict[str, str], step: Step) -> dict[str, Any]:
    from pipelines.evaluate.stage import EvalConfig, evaluate

    out = Storage.from_uri(step.path, cfg.s3)
    export = Storage.from_uri(dirs["train"], cfg.s3).uri("export")
    results, files, images = {}, [], 0
    with tempfile.TemporaryDirectory(prefix="evaluate_") as tmp:
        for job in cfg.evaluate:
            local = os.path.join(tmp, job.name)
            r = evaluate(EvalConfig(
                checkpoint=export, dataset=job.dataset, output=local, task=job.task, classnames=job.classnames,
                templates=job.templates, train_manifest=dirs["shard"] if job.overlap else None,
                overlap_hamming=job.overlap_hamming, probe_train=job.probe_train, batch_size=job.batch_size,
                workers=job.workers, s3=cfg.s3, ray=cfg.ray))
            results[job.name] = {k: r[k] for k in ("task", "top1", "top5", "n", "mean_per_class") if k in r}
            images += int(r.get("n") or r.get("n_images") or 0)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as f:
                    data = f.read()
                out.write_bytes(f"{job.name}/{name}", data)
                files.append({"path": f"{job.name}/{name}", "rows": 0, "bytes": len(data)})
    write_manifest(out, "", Manifest(stage="evaluate", fingerprint=step.fingerprint, files=files, rows_in=images,
                                     rows_out=images, config={"jobs": [to_dict(j) for j in cfg.evaluate]},
                                     extra={"results": results}))
    return results


# ---------------------------------------------------------------------------------------------
# The report.


def collect_report(cfg: RunConfig, steps: list[Step], dirs: dict[str, str], started: float, command: str,
                   error: BaseException | None) -> dict[str, Any]:
    """Everything the HTML report shows, read back from the committed outputs."""
    report: dict[str, Any] = {
        "title": f"CLIP run {cfg.root}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "config": to_dict(cfg),
        "plan": [dataclasses.asdict(s) for s in steps], "stages": {}, "samples": [],
        "wall_s": round(time.time() - started, 1),
    }
    if error is not None:
        report["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()
    manifests = {}
    for stage, path in dirs.items():
        m = read_manifest(Storage.from_uri(path, cfg.s3), "")
        if m is not None:
            manifests[stage] = m
            report["stages"][stage] = dataclasses.asdict(m)
    if "shard" in manifests and manifests["shard"].files and cfg.report.samples:
        st = Storage.from_uri(dirs["shard"], cfg.s3)
        table = st.read_parquet(manifests["shard"].file_paths()[0], columns=["image", "caption"])
        table = table.slice(0, cfg.report.samples)
        report["samples"] = [{"image": r["image"], "caption": r["caption"]} for r in table.to_pylist()]
    if "train" in manifests:
        st = Storage.from_uri(dirs["train"], cfg.s3)
        history = [json.loads(line) for line in st.read_bytes("metrics.jsonl").decode().splitlines() if line.strip()]
        report["train"] = {"summary": manifests["train"].extra.get("summary", {}), "history": history}
    if "evaluate" in manifests:
        st = Storage.from_uri(dirs["evaluate"], cfg.s3)
        report["eval"] = {}
        for job in cfg.evaluate:
            results = json.loads(st.read_bytes(f"{job.name}/results.json"))
            plots = {os.path.splitext(os.path.basename(p))[0]: st.read_bytes(p)
                     for p in sorted(st.list(job.name)) if p.endswith(".png")}
            report["eval"][job.name] = {"results": results, "plots": plots}
    return report


def _write_report(cfg: RunConfig, steps: list[Step], dirs: dict[str, str], started: float, command: str,
                  error: BaseException | None) -> str:
    try:
        from pipelines.run.report import build_report_html

        html = build_report_html(collect_report(cfg, steps, dirs, started, command, error))
    except Exception as err:  # a broken report must not hide the run's own error
        print(f"run: could not build the report: {err!r}", file=sys.stderr, flush=True)
        if error is None:
            raise
        return ""
    root = Storage.from_uri(cfg.root, cfg.s3)
    root.write_bytes("report.html", html.encode())
    if cfg.report.path:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.report.path)), exist_ok=True)
        with open(cfg.report.path, "w") as f:
            f.write(html)
    return root.uri("report.html")


# ---------------------------------------------------------------------------------------------
# CLI.


def _stages(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--only", metavar="STAGE[,STAGE]", help="run just these stages; their inputs must be committed")
        p.add_argument("--from", dest="from_", metavar="STAGE", help="recompute this stage and every later one")
        p.add_argument("--force", action="append", default=[], metavar="STAGE[,STAGE]",
                       help="recompute these stages even if committed")
        p.add_argument("--dry-run", action="store_true", help="print the plan and exit")

    def body(cfg: Any, args: argparse.Namespace) -> None:
        sel = Selection(_stages(args.only), args.from_, tuple(s for f in args.force for s in _stages(f)))
        initial = plan(cfg, sel)  # selection and input errors surface here, before any work
        # A failing stage raises with its traceback (the exit status is then 1); the report is written first.
        run_pipeline(cfg, sel, dry_run=args.dry_run, command=" ".join(["python -m pipelines.run", *argv]),
                     initial=initial)

    return run_command("run", RunConfig, argv, body, doc=__doc__, load=load_run_config, printable=printable_config,
                       hide=wired_keys(), add_arguments=flags, log_root=lambda c: c.root, status=False,
                       keys_note="Each stage section holds that stage's own keys (python -m pipelines.<stage> --help); "
                                 "the runner sets the keys that wire stages together (inputs, output paths, their S3 "
                                 "and Ray settings) and refuses a config that sets them.")


def wired_keys() -> list[str]:
    """The dotted run-config keys the runner sets itself (left out of --help and --print-config)."""
    return [f"{stage}.{key}" for stage, keys in WIRED_KEYS.items() for key in keys]


def printable_config(cfg: Any) -> dict[str, Any]:
    """The run config as a YAML mapping that load_run_config takes back: without the wired keys."""
    data = to_dict(cfg)
    for key in wired_keys():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data

if __name__ == "__main__":
    sys.exit(main())
