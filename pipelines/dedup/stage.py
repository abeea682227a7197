"""Stage 3, dedup: exact and near duplicates, and eval-set decontamination (paper section 5).

    python -m pipelines.dedup --config configs/dedup.yaml [key=value ...]

The plan (which rows go, and why) is computed by `dedup_core.plan_dedup` with Ray Data shuffles
and groupbys over the rows' hashes only, never the images and never on the driver. The drops are
then routed to their input files with a groupby, and each input file becomes one output part
holding the rows that stay; dropped rows go to `_rejected/` with the key of the row kept instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.dedup.plan import DedupConfig, build_eval_index, overlap_report, plan_dedup
from pipelines.evaluate.sets import EvalSet, open_eval_set, read_eval_set
from pipelines.core.manifest import Manifest, fingerprint, read_committed
from pipelines.core.schema import rejected_table
from pipelines.core.parts import OutputConfig, PartResult, PartStore, already_committed, finish_stage, run_file_parts
from pipelines.core.stage import DATA_STAGE_WIRED, Stage, wire_data_stage
from pipelines.core.runtime import RayConfig, data_args, init_ray
from pipelines.core.storage import S3Options, Storage

NAME = "dedup"
KEY_COLUMNS = ["key", "url", "sha256", "phash", "caption", "width", "height", "original_width", "original_height"]


@dataclass
class EvalSetRef:
    # A name for reports, and the set: imagefolder:DIR or parquet:PATH (image column "image").
    name: str = ""
    dataset: str = ""


@dataclass
class DedupStageConfig:
    # The committed output of the filter stage, local or s3://.
    input: str = ""
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # Eval sets to decontaminate against; their images never enter training.
    eval_sets: list[EvalSetRef] = field(default_factory=list)
    ray: RayConfig = field(default_factory=RayConfig)
    workers: int | None = None

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("dedup.input is empty: give the filter stage's output directory")
        for ref in self.eval_sets:
            if not ref.name or not ref.dataset:
                raise ValueError(f"dedup.eval_sets entries need a name and a dataset, got {ref}")


def _eval_phashes(eval_sets: list[EvalSet]) -> dict[str, list[int]]:
    """phash of every eval image, computed by Ray Data tasks; only the 8-byte hashes reach the driver."""
    out = {}
    for es in eval_sets:
        ds = read_eval_set(es).map_batches(_phash_batch, batch_format="numpy", **data_args())
        out[es.name] = [int(r["phash"]) for r in ds.take_all()]
    return out


def _phash_batch(batch: dict[str, Any]) -> dict[str, list[int]]:
    from pipelines.core.images import phash_of_encoded

    return {"phash": [phash_of_encoded(b) for b in batch["image"]]}


class WriteDrops:
    """Routes the plan's drops to one small Parquet file per input file, under the stage's _work/."""

    def __init__(self, out: Storage, fp: str) -> None:
        self.out = out
        self.fp = fp

    def __call__(self, group: pa.Table) -> pa.Table:
        idx = int(group.column("file_idx")[0].as_py())
        self.out.write_parquet(group.select(["key", "reason", "detail"]), f"_work/{self.fp[:8]}/drops-{idx:05d}.parquet")
        return pa.table({"file_idx": [idx], "drops": [group.num_rows]})


class ApplyDrops:
    def __init__(self, inp: Storage, store: PartStore, fp: str, with_drops: set[int]) -> None:
        self.inp = inp
        self.store = store
        self.fp = fp
        self.with_drops = with_drops

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out = []
        for idx, path in zip(batch["file_idx"], batch["path"]):
            name = os.path.splitext(os.path.basename(path))[0]
            out.append((self.store.done(name) or self._apply(name, int(idx), path)).dumps())
        return {"result": out}

    def _apply(self, name: str, idx: int, path: str) -> PartResult:
        table = self.inp.read_parquet(path)
        if idx in self.with_drops:
            drops = self.store.storage.read_parquet(f"_work/{self.fp[:8]}/drops-{idx:05d}.parquet")
        else:
            drops = pa.table({"key": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                              "detail": pa.array([], pa.string())})
        dropped_mask = pc.is_in(table.column("key"), value_set=drops.column("key"))
        kept = table.filter(pc.invert(dropped_mask))
        gone = table.filter(dropped_mask).select(["key", "url"])
        info = {k: (r, d) for k, r, d in zip(drops.column("key").to_pylist(), drops.column("reason").to_pylist(),
                                              drops.column("detail").to_pylist())}
        keys = gone.column("key").to_pylist()
        rejected = rejected_table(gone.column("key"), gone.column("url"), NAME, [info[k][0] for k in keys],
                                  [info[k][1] for k in keys])
        return self.store.commit(name, kept, rejected, table.num_rows)


def _prepare(cfg: DedupStageConfig) -> tuple[Storage, Manifest, list, str]:
    inp, in_manifest = read_committed(cfg.input, cfg.input_s3, "dedup.input (the filter's output)", producer="filter")
    eval_sets = [open_eval_set(ref.dataset, cfg.input_s3, name=ref.name, classnames=[]) for ref in cfg.eval_sets]
    eval_sizes = [{"name": es.name, "files": len(es.files), "bytes": sum(es.storage.size(f) for f in es.files)}
                  for es in eval_sets]
    conf = {"dedup": to_dict(cfg.dedup), "eval_sets": eval_sizes}
    return inp, in_manifest, eval_sets, fingerprint(NAME, conf, [in_manifest])


def fingerprint_of(cfg: DedupStageConfig) -> str:
    """What run(cfg) would commit under: its settings, the eval sets' sizes and its committed input."""
    return _prepare(cfg)[3]


def run(cfg: DedupStageConfig) -> Manifest:
    started = time.time()
    inp, in_manifest, eval_sets, fp = _prepare(cfg)
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    existing = already_committed(out, NAME, fp)
    if existing is not None:
        return existing
    init_ray(cfg.ray)
    import ray
    import ray.data

    files = in_manifest.file_paths()
    if not files:
        raise ValueError(f"dedup input {cfg.input} lists no data files")
    timings = {}
    t0 = time.time()
    eval_index = build_eval_index(_eval_phashes(eval_sets)) if cfg.eval_sets else None
    timings["eval_index_s"] = round(time.time() - t0, 3)
    index_of = {inp.fs_path(f): i for i, f in enumerate(files)}

    def add_file_idx(batch: pa.Table) -> pa.Table:
        idx = [index_of[p] for p in batch.column("path").to_pylist()]
        return batch.drop_columns(["path"]).append_column("file_idx", pa.array(idx, pa.int64()))

    t0 = time.time()
    keys = (ray.data.read_parquet(**inp.ray_read_args(files), columns=KEY_COLUMNS, include_paths=True, ray_remote_args=data_args())
            .map_batches(add_file_idx, batch_format="pyarrow", **data_args()))
    drops = plan_dedup(keys, cfg.dedup, eval_index).materialize()
    timings["plan_s"] = round(time.time() - t0, 3)
    report = overlap_report(drops, eval_index) if cfg.eval_sets else {}
    written = drops.groupby("file_idx").map_groups(WriteDrops, batch_format="pyarrow",
                                                    fn_constructor_kwargs={"out": out, "fp": fp},
                                                    concurrency=1, **data_args()).take_all()
    with_drops = {int(r["file_idx"]) for r in written}
    store = PartStore(out, NAME, fp, cfg.output.row_group_size)
    items = [{"file_idx": i, "path": f} for i, f in enumerate(files)]
    parts = run_file_parts(items, ApplyDrops, {"inp": inp, "store": store, "fp": fp, "with_drops": with_drops},
                           cfg.workers)
    with inp.open_input(files[0]) as f:
        schema = pq.read_schema(f)  # the footer only, not the images
    if report:
        print("dedup: eval-set overlap (paper section 5)")
        for name, r in report.items():
            print(f"  {name}: {r}")
    manifest = finish_stage(out, NAME, fp, parts, schema, to_dict(cfg), started, [cfg.input],
                            extra={"eval_overlap": report}, timings=timings)
    out.delete_prefix(f"_work/{fp[:8]}")
    return manifest


STAGE = Stage(
    name=NAME, section=DedupStageConfig, default=DedupStageConfig, doc="exact and near duplicates, and eval-set decontamination (paper section 5)", upstream="filter", wired=DATA_STAGE_WIRED,
    wire=wire_data_stage, fingerprint=fingerprint_of, run=run, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("dedup", DedupStageConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
