"""The whole DAG from one config: crawl (or ingest) -> filter -> dedup -> curate -> shard -> train -> evaluate.

    python -m pipelines.run --config configs/run_tiny.yaml [key=value ...]
        [--only STAGE[,STAGE]] [--from STAGE] [--force STAGE[,STAGE]] [--dry-run]

The data comes from one source, the one whose input the config sets: `crawl.input.paths` (URL lists to
crawl, as configs/run_tiny.yaml does) or `ingest.input` (an img2dataset download, Parquet or WebDataset
output, made sample rows by pipelines.ingest). Exactly one must be set; the other source's section, if
any, is not used:

    python -m pipelines.run --config configs/run_tiny.yaml crawl=null ingest.input=i2d

The source is the run's first stage: the plan, --only/--from/--force, the report and root/<source>/
name it, and filter reads its output. A crawl run's plan and directories do not depend on ingest.

Every stage's output lives under `<root>/<stage>/<fingerprint[:16]>`, where the fingerprint is the
one the stage itself commits under: its result-shaping settings plus its inputs' manifests (for the
source, its input files' paths, sizes and modification times). So a rerun finds finished work by
looking, not by remembering: a stage whose directory holds a manifest with its fingerprint is reused; a config
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
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pipelines.core import console
from pipelines.core.cli import run_command
from pipelines.core.config import ConfigError, build_config, load_raw, raw_value, to_dict
from pipelines.core.manifest import committed, read_manifest
from pipelines.core.runtime import RayConfig
from pipelines.core.stage import Stage, Wiring
from pipelines.core.storage import S3Options, Storage
from pipelines.crawl.stage import STAGE as CRAWL
from pipelines.curate.stage import STAGE as CURATE
from pipelines.dedup.stage import STAGE as DEDUP
from pipelines.evaluate.jobs import STAGE as EVALUATE
from pipelines.filter.stage import STAGE as FILTER
from pipelines.ingest.stage import STAGE as INGEST
from pipelines.shard.stage import STAGE as SHARD
from pipelines.train.stage import STAGE as TRAIN


@dataclass(frozen=True)
class Source:
    """A stage a run can start from: the run uses the source whose input key its config sets."""

    stage: Stage
    #: The dotted key of its section that names its input (set: the run starts from this source).
    input_key: str
    #: What that input is (for the error that asks for one).
    what: str

    @property
    def key(self) -> str:
        return f"{self.stage.name}.{self.input_key}"


# Where a run's data comes from: exactly one source, the one whose input the run config sets.
SOURCES: tuple[Source, ...] = (Source(CRAWL, "input.paths", "URL lists to crawl"),
                               Source(INGEST, "input", "an img2dataset download to ingest"))
SOURCE_NAMES = tuple(s.stage.name for s in SOURCES)
# The stages after the source, in order. A stage whose upstream is a source reads the run's source.
DOWNSTREAM: tuple[Stage, ...] = (FILTER, DEDUP, CURATE, SHARD, TRAIN, EVALUATE)
# Each source's DAG, in order. Adding a stage: a package whose stage.py defines its Stage, and one entry in
# DOWNSTREAM (or in SOURCES, for another way data comes in).
PIPELINES: dict[str, tuple[Stage, ...]] = {
    s.stage.name: (s.stage, *(dataclasses.replace(st, upstream=s.stage.name)
                              if st.upstream in SOURCE_NAMES and st.upstream != s.stage.name else st
                              for st in DOWNSTREAM))
    for s in SOURCES}
# A crawl run's DAG (the default source) and its stage names; `pipeline(cfg)` and `stages(cfg)` give a run's own.
PIPELINE: tuple[Stage, ...] = PIPELINES["crawl"]
STAGES = tuple(st.name for st in PIPELINE)
# Every stage by name: each has its section in the run config.
BY_NAME: dict[str, Stage] = {st.name: st for st in (*(s.stage for s in SOURCES), *DOWNSTREAM)}


def _source(name: str) -> Source:
    return next(s for s in SOURCES if s.stage.name == name)


@dataclass
class ReportConfig:
    # Also write the report to this local file ("" = only <root>/report.html).
    path: str = ""
    # Sample images (with captions) from the training shards shown in the report.
    samples: int = 24


@dataclass(kw_only=True)
class RunSettings:
    # Where every stage's output goes: a local directory or s3://bucket/prefix.
    root: str = "out/run"
    # Connection settings for root and for the stages' S3 inputs (credentials from the AWS env/profile).
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root must be a local directory or s3:// prefix")


def _run_config() -> type:
    """RunSettings plus one section per stage (its own config; `Stage.doc` is the field's comment). The runner
    sets what wires the sections together (inputs, output paths, S3 options, Ray): see `Stage.wired`. A source's
    section is None unless it is the run's source (`load_run_config` chooses)."""
    fields = []
    for st in BY_NAME.values():
        meta = {"doc": st.doc}
        if st.name in SOURCE_NAMES:
            meta["doc"] += (f"; the run's source when {_source(st.name).key} is set (exactly one of "
                            f"{', '.join(s.key for s in SOURCES)})")
            fields.append((st.name, st.section, field(default=None, metadata=meta)))
            continue
        fields.append((st.name, st.section, field(default_factory=st.default, metadata=meta) if st.default
                       else field(metadata=meta)))
    cls = dataclasses.make_dataclass("RunConfig", fields, bases=(RunSettings,), kw_only=True)
    cls.__module__ = __name__  # pickles and prints as pipelines.run.dag.RunConfig
    return cls


RunConfig = _run_config()


def load_run_config(path: str | None, overrides: list[str] = ()) -> Any:
    """RunConfig from YAML + overrides. The source is the one whose input is set (the other sources' sections
    are dropped). Wired keys are refused, then filled with placeholders so that each stage section validates
    as that stage's own config (errors name e.g. `dedup.dedup.partitions`); then every stage's wired config
    is built once, so a value only the wiring checks fails here too."""
    data, source = load_raw(path, overrides)
    src = _choose_source(data, source)
    for st in PIPELINES[src.stage.name]:
        section = data.get(st.name)
        if section is not None and st.wired and not isinstance(section, dict):
            raise ConfigError(f"{st.name} in {source} must be a mapping")
        for key in st.wired:
            node = section or {}
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                raise ConfigError(f"{st.name}.{key} in {source} is set by the runner (stage outputs go under "
                                  "root/<stage>/<fingerprint>; S3 and Ray settings come from the top-level s3 "
                                  "and ray sections): remove it")
        if "input" in st.wired:
            data.setdefault(st.name, {})["input"] = f"<{st.upstream} output, set by the runner>"
    cfg = build_config(RunConfig, data, source)
    for st in pipeline(cfg):
        st.wire(getattr(cfg, st.name), _wiring(cfg, st, {}, ""))
    return cfg


def _choose_source(data: dict[str, Any], where: str) -> Source:
    """The source whose input the raw config sets (exactly one must); the other sources' sections are removed."""

    def is_set(src: Source) -> bool:
        node = raw_value(data.get(src.stage.name))
        if node is not None and not isinstance(node, dict):
            raise ConfigError(f"{src.stage.name} in {where} must be a mapping (or null: not the run's source)")
        for part in src.input_key.split("."):
            node = raw_value(node.get(part)) if isinstance(node, dict) else None
        return node not in (None, "", [])

    chosen = [s for s in SOURCES if is_set(s)]
    if not chosen:
        raise ConfigError(f"no data source in {where}: set "
                          + " or ".join(f"{s.key} ({s.what})" for s in SOURCES))
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(s.key for s in chosen)} are both set in {where}: a run starts from one "
                          f"source; unset the other (e.g. {chosen[0].stage.name}=null)")
    for s in SOURCES:
        if s is not chosen[0]:
            data.pop(s.stage.name, None)
    return chosen[0]


def source_of(cfg: Any) -> Source:
    """The run's source: the one source section the config holds."""
    found = [s for s in SOURCES if getattr(cfg, s.stage.name) is not None]
    if len(found) != 1:
        raise ConfigError(f"a run config holds exactly one of the sections {', '.join(SOURCE_NAMES)}, "
                          f"got {len(found)} (load it with load_run_config)")
    return found[0]


def pipeline(cfg: Any) -> tuple[Stage, ...]:
    """The run's stages, in order: its source, then DOWNSTREAM (the first of which reads the source)."""
    return PIPELINES[source_of(cfg).stage.name]


def stages(cfg: Any) -> tuple[str, ...]:
    """The names of the run's stages, in order (a crawl run's are STAGES)."""
    return tuple(st.name for st in pipeline(cfg))


def _stage(cfg: Any, name: str) -> Stage:
    for st in pipeline(cfg):
        if st.name == name:
            return st
    raise ValueError(_not_in_run(name, stages(cfg)))


def _not_in_run(name: str, order: tuple[str, ...]) -> str:
    return (f"stage {name} is not in this run: its source is {order[0]} ({_source(order[0]).key} is set), so its "
            f"stages are {', '.join(order)}")


# ---------------------------------------------------------------------------------------------
# Wiring: each stage's config with its input, output, S3 and Ray settings filled in.


def stage_dir(cfg: Any, stage: str, fp: str) -> str:
    return f"{cfg.root.rstrip('/')}/{stage}/{fp[:16]}"


def _wiring(cfg: Any, st: Stage, dirs: dict[str, str], output: str) -> Wiring:
    upstream = dirs.get(st.upstream, "<not yet committed>") if st.upstream else None
    return Wiring(input=upstream, output=output, dirs=dict(dirs), s3=cfg.s3, ray=cfg.ray)


def wire(cfg: Any, stage: str, dirs: dict[str, str], fp: str | None = None) -> Any:
    """The stage's own config, reading its upstream's directory; `fp` (when known) names its output."""
    st = _stage(cfg, stage)
    return st.wire(getattr(cfg, stage), _wiring(cfg, st, dirs, stage_dir(cfg, stage, fp) if fp else ""))


def stage_fingerprint(cfg: Any, stage: str, dirs: dict[str, str]) -> str:
    """The fingerprint `stage` commits under, given its upstream directories (which must be committed)."""
    return _stage(cfg, stage).fingerprint(wire(cfg, stage, dirs))


def validate(cfg: Any) -> None:
    """What can be checked before any stage runs: the root is reachable with the given credentials, and
    every stage's own checks (input lists exist, model names are known, eval sets and prompt files exist)."""
    Storage.from_uri(cfg.root, cfg.s3)  # S3: one head_bucket with the configured credentials
    for st in pipeline(cfg):
        if st.skip_when(getattr(cfg, st.name)) is None:
            st.validate(st.wire(getattr(cfg, st.name), _wiring(cfg, st, {}, "")))


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
    #: The run's stages in order (`stages(cfg)`; plan, decide and run_pipeline set it); () = a crawl run's.
    order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*self.only, *self.force, *([self.from_] if self.from_ else [])):
            if name not in BY_NAME:
                raise ValueError(f"unknown stage {name!r}: stages are {' or '.join(SOURCE_NAMES)} (the run's "
                                 f"source), then {', '.join(st.name for st in DOWNSTREAM)}")
            if self.order and name not in self.order:
                raise ValueError(_not_in_run(name, self.order))
        if self.only and self.from_:
            raise ValueError("--only and --from cannot be combined")

    def of(self, cfg: Any) -> Selection:
        """This selection for `cfg`'s stages (an error if it names a source the run does not start from)."""
        order = stages(cfg)
        return self if self.order == order else dataclasses.replace(self, order=order)

    @property
    def _order(self) -> tuple[str, ...]:
        return self.order or STAGES

    def selected(self, stage: str) -> bool:
        if self.only:
            return stage in self.only
        if self.from_:
            return self._order.index(stage) >= self._order.index(self.from_)
        return True

    def forced(self, stage: str) -> bool:
        return stage in self.force or (self.from_ is not None and
                                       self._order.index(stage) >= self._order.index(self.from_))

    def needed_later(self, stage: str) -> bool:
        return any(self.selected(s) for s in self._order[self._order.index(stage) + 1:])


def decide(cfg: Any, stage: str, dirs: dict[str, str], sel: Selection, upstream_runs: str | None) -> Step:
    """What to do with one stage now. `upstream_runs` names a stage before it that is still to run."""
    st = _stage(cfg, stage)
    sel = sel.of(cfg)
    skip = st.skip_when(getattr(cfg, stage))
    if skip is not None:
        return Step(stage, "skip", skip)
    if not sel.selected(stage) and not sel.needed_later(stage):
        return Step(stage, "skip", "not selected")
    if upstream_runs is not None:
        if not sel.selected(stage):
            raise ValueError(f"{stage} is needed by a selected stage but its input ({upstream_runs}) is not "
                             "committed: run without --only/--from first")
        return Step(stage, "pending", f"decided once {upstream_runs} has committed (its output may change)")
    fp = stage_fingerprint(cfg, stage, dirs)
    path = stage_dir(cfg, stage, fp)
    done = committed(Storage.from_uri(path, cfg.s3), fp) is not None
    if not sel.selected(stage):
        if not done:
            raise ValueError(f"{stage} is needed by a selected stage but is not committed at {path} (this config "
                             "has not run it yet): run without --only/--from first")
        return Step(stage, "reuse", "committed (not selected, read by a selected stage)", fp, path)
    if sel.forced(stage):
        return Step(stage, "run", "forced" + (" (recomputes its committed output)" if done else ""), fp, path)
    again = st.rerun_when(wire(cfg, stage, dirs, fp)) if done else None
    if again:
        return Step(stage, "run", again, fp, path)
    if done:
        return Step(stage, "reuse", "committed with this config and input", fp, path)
    return Step(stage, "run", _why_not_committed(cfg, st, path), fp, path)


def _why_not_committed(cfg: Any, st: Stage, path: str) -> str:
    out = Storage.from_uri(path, cfg.s3)
    parts = out.list("_parts") if st.parts else []
    if parts:
        return f"resumes an interrupted run ({len(parts)} parts already committed)"
    if out.list("", recursive=False):
        return "resumes an interrupted run"
    parent = Storage.from_uri(f"{cfg.root.rstrip('/')}/{st.name}", cfg.s3)
    others = sorted(p.rstrip("/") for p in parent.list("", recursive=False) if p.endswith("/"))
    if others:
        return f"config or input changed (earlier outputs: {', '.join(others[:3])})"
    return "never run"


def plan(cfg: Any, sel: Selection) -> list[Step]:
    """The plan as far as it can be known now (downstream of a stage that runs is pending), after the checks
    that need no stage output (`validate`): a bad eval path or model name fails here, not hours later."""
    sel = sel.of(cfg)  # --only crawl on a run that ingests fails here, before any check
    validate(cfg)
    steps, dirs, upstream_runs = [], {}, None
    for stage in sel.order:
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


def run_pipeline(cfg: Any, sel: Selection = Selection(), dry_run: bool = False,
                 command: str = "", initial: list[Step] | None = None) -> dict[str, Any]:
    """Run the DAG; returns {"plan": [...], "dirs": {stage: path}, "report": uri, ...}.
    `initial`: the plan if the caller already computed it (the CLI does, to report its errors)."""
    started = time.time()
    sel = sel.of(cfg)
    initial = initial if initial is not None else plan(cfg, sel)
    print(format_plan(initial), flush=True)
    if dry_run:
        return {"plan": [dataclasses.asdict(s) for s in initial], "dirs": {s.stage: s.path for s in initial if s.path}}
    executed: list[Step] = []
    dirs: dict[str, str] = {}
    results: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        for stage in sel.order:
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


def _execute(cfg: Any, stage: str, dirs: dict[str, str], step: Step) -> Any:
    """Run one stage through its contract; it commits its own manifest, which must carry the planned fingerprint."""
    st = _stage(cfg, stage)
    stage_cfg = wire(cfg, stage, dirs, step.fingerprint)
    if committed(Storage.from_uri(step.path, cfg.s3), step.fingerprint) is None:
        stage_cfg = st.fresh(stage_cfg)
    manifest = st.run(stage_cfg)
    if manifest.fingerprint != step.fingerprint:
        raise AssertionError(f"{stage} committed fingerprint {manifest.fingerprint[:16]} but the plan "
                             f"computed {step.fingerprint[:16]}: its Stage.fingerprint is out of date")
    return manifest.extra.get("summary") or manifest.extra.get("results") or {"rows_out": manifest.rows_out}


# ---------------------------------------------------------------------------------------------
# The report.


def collect_report(cfg: Any, steps: list[Step], dirs: dict[str, str], started: float, command: str,
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


def _write_report(cfg: Any, steps: list[Step], dirs: dict[str, str], started: float, command: str,
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
    return [f"{st.name}.{key}" for st in BY_NAME.values() for key in st.wired]


def printable_config(cfg: Any) -> dict[str, Any]:
    """The run config as a YAML mapping that load_run_config takes back: without the wired keys (and without
    the sections of the sources the run does not start from)."""
    data = to_dict(cfg)
    for name in SOURCE_NAMES:
        if data.get(name) is None:
            data.pop(name, None)
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
