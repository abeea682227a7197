"""Stage 2, filter: caption and image rules, a per-query cap, and an optional CLIP-score filter.

    python -m pipelines.filter --config configs/filter.yaml [key=value ...]

Each committed input file is one part: the part keeps its name, writes the rows that pass and the
rows that do not (with the first rule they failed) and commits. The per-query cap needs all rows
of a query: a Ray Data groupby over (key, query) finds, for each query over the cap, the largest
key kept; the parts then apply those cut-offs. An input of no more rows than the cap has no query over
it, and skips that pass. Rows without a query (null, "", or no query column at all) are exempt from the
cap, never one bucket: each part counts them and the manifest sums them (`query_cap_exempt_rows`);
metadata balancing for such pools is the curate stage's job. A CLIP-score filter runs as an actor pool that
loads its checkpoint once per actor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.checkpoints import local_checkpoint
from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.filter.rules import FilterConfig, over_query_cap, query_cutoffs, row_reasons
from pipelines.core.manifest import Manifest, fingerprint, read_committed
from pipelines.core.schema import SAMPLE_SCHEMA, rejected_table
from pipelines.core.parts import OutputConfig, PartResult, PartStore, already_committed, finish_stage, run_file_parts
from pipelines.core.stage import DATA_STAGE_WIRED, Stage, wire_data_stage
from pipelines.core.runtime import RayConfig, data_args, init_ray
from pipelines.core.storage import S3Options, Storage

NAME = "filter"


@dataclass
class FilterStageConfig:
    # The committed output of the crawl or of ingest (a directory with _manifest.json), local or s3://.
    input: str = ""
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    rules: FilterConfig = field(default_factory=FilterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Parallel file workers; None = all logical CPUs.
    workers: int | None = None

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("filter.input is empty: give the crawl's (or ingest's) output directory")


def _query_cutoffs(group: pa.Table, cap: int) -> pa.Table:
    cut = query_cutoffs({group.column("query")[0].as_py(): group.column("key").to_pylist()}, cap)
    return pa.table({"query": pa.array(list(cut), pa.string()), "cutoff": pa.array(list(cut.values()), pa.string())})


def _passing_rules(batch: pa.Table, rules: FilterConfig) -> pa.Table:
    keep = pa.array([not r for r in row_reasons(batch, rules)])
    kept = batch.filter(keep)
    # Rows without a query (null or "") are exempt from the cap: they never reach the groupby.
    has_query = pc.fill_null(pc.not_equal(kept.column("query"), ""), False)
    return pa.table({"key": kept.column("key"), "query": kept.column("query")}).filter(has_query)


def compute_query_cutoffs(inp: Storage, manifest: Manifest, rules: FilterConfig) -> dict[str, str]:
    """Cut-offs over the rows that pass the caption and image rules (the cap counts rows that would
    otherwise be kept; the CLIP-score filter, if on, applies after it). Only queries over the cap come back
    to the driver (one short row each), never the rows."""
    import ray.data

    columns = ["key", "query", "caption", "width", "height", "original_width", "original_height"]
    keys = (ray.data.read_parquet(**inp.ray_read_args(manifest.file_paths()), ray_remote_args=data_args())
            .select_columns(columns)
            .map_batches(_passing_rules, batch_format="pyarrow", fn_kwargs={"rules": rules}, **data_args()))
    rows = keys.groupby("query").map_groups(_query_cutoffs, batch_format="pyarrow",
                                            fn_kwargs={"cap": rules.max_per_query}, **data_args()).take_all()
    return {r["query"]: r["cutoff"] for r in rows}


class ClipScorer:
    """Cosine similarity between a trained CLIP's image and caption embeddings (DataComp's CLIP score).

    `checkpoint` is any format evaluate loads (the same loader: clip_model.formats.load_checkpoint), local or
    s3://; `activation` (rules.clip_score_activation) where the checkpoint does not record it."""

    def __init__(self, checkpoint: str, s3: S3Options, activation: str | None = None) -> None:
        from clip_model.export import load_export
        from clip_model.transforms import EvalTransform

        local = local_checkpoint(checkpoint, s3)
        try:
            self.model, self.tokenizer = load_export(local, activation=activation)
        except ValueError as err:
            if "activation" not in str(err):
                raise
            # The loader names its own argument; a filter user sets the rules key.
            raise ValueError(f"filter rules.clip_score_checkpoint={checkpoint}: {err} (in the filter's config "
                             f"that is rules.clip_score_activation)") from err
        self.transform = EvalTransform(self.model.image_size)

    def __call__(self, images: list[bytes], captions: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.transform(b) for b in images[i:i + batch_size]])
                t = self.tokenizer(captions[i:i + batch_size], context_length=self.model.context_length)
                img, txt, _ = self.model(x, t)
                out.append((img * txt).sum(dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class FilterFiles:
    def __init__(self, inp: Storage, store: PartStore, cfg: FilterStageConfig, cutoffs: dict[str, str]) -> None:
        self.inp = inp
        self.store = store
        self.cfg = cfg
        self.cutoffs = cutoffs
        self.scorer = (ClipScorer(cfg.rules.clip_score_checkpoint, cfg.input_s3, cfg.rules.clip_score_activation)
                       if cfg.rules.clip_score_checkpoint else None)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out = []
        for path in batch["path"]:
            name = os.path.splitext(os.path.basename(path))[0]
            out.append((self.store.done(name) or self.filter_file(name, path)).dumps())
        return {"result": out}

    def filter_file(self, name: str, path: str) -> PartResult:
        table = self.inp.read_parquet(path)
        reasons = row_reasons(table, self.cfg.rules)
        stats = {}
        if self.cfg.rules.max_per_query and "query" in table.column_names:
            # Rows that pass the rules but have no query: exempt from the cap, counted (the manifest sums them).
            stats["query_cap_exempt_rows"] = sum(not r and not q for r, q in zip(reasons, table.column("query").to_pylist()))
        if self.cutoffs and "query" in table.column_names:
            over = over_query_cap(table.column("query").to_pylist(), table.column("key").to_pylist(), self.cutoffs)
            reasons = [r or ("query_cap" if o else "") for r, o in zip(reasons, over)]
        if self.scorer is not None:
            todo = [i for i, r in enumerate(reasons) if not r]
            scores = np.full(table.num_rows, np.nan, dtype=np.float32)
            if todo:
                sub = table.take(todo)
                scores[todo] = self.scorer(sub.column("image").to_pylist(), sub.column("caption").to_pylist())
            reasons = [r or ("clip_score_low" if s < self.cfg.rules.min_clip_score else "")
                       for r, s in zip(reasons, scores)]
            table = table.append_column("clip_score", pa.array(scores, pa.float32()))
        keep = pa.array([not r for r in reasons])
        kept = table.filter(keep)
        dropped = table.filter(pc.invert(keep))
        dropped_reasons = [r for r in reasons if r]
        rejected = rejected_table(dropped.column("key"), dropped.column("url"), NAME, dropped_reasons)
        return self.store.commit(name, kept, rejected, table.num_rows, stats)


def _exempt_rows(parts: list[PartResult]) -> int | None:
    counts = [p.stats.get("query_cap_exempt_rows") for p in parts]
    return None if None in counts else sum(counts)


def _prepare(cfg: FilterStageConfig) -> tuple[Storage, Manifest, str]:
    inp, in_manifest = read_committed(cfg.input, cfg.input_s3, "filter.input (the crawl's or ingest's output)",
                                      producer="crawl")
    rules = to_dict(cfg.rules)
    if rules.get("clip_score_activation") is None:  # counts only when set: outputs committed before it stay valid
        del rules["clip_score_activation"]
    return inp, in_manifest, fingerprint(NAME, {"rules": rules}, [in_manifest])


def fingerprint_of(cfg: FilterStageConfig) -> str:
    """What run(cfg) would commit under: its rules and its committed input (which must exist)."""
    return _prepare(cfg)[2]


def run(cfg: FilterStageConfig) -> Manifest:
    started = time.time()
    inp, in_manifest, fp = _prepare(cfg)
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    existing = already_committed(out, NAME, fp)
    if existing is not None:
        return existing
    init_ray(cfg.ray)
    t0 = time.time()
    has_query = not in_manifest.schema or "query" in [f["name"] for f in in_manifest.schema]
    capped = bool(cfg.rules.max_per_query) and has_query
    # No query can hold more rows than the whole input: at most `cap` rows in, no cut-offs to compute.
    cutoffs = (compute_query_cutoffs(inp, in_manifest, cfg.rules)
               if capped and in_manifest.rows_out > cfg.rules.max_per_query else {})
    t_cap = time.time() - t0
    store = PartStore(out, NAME, fp, cfg.output.row_group_size)
    items = [{"path": p} for p in in_manifest.file_paths()]
    if not items:
        raise ValueError(f"filter input {cfg.input} lists no data files (the crawl or ingest kept no rows)")
    # An actor pool only when each worker loads a CLIP model for the score rule; otherwise Ray tasks.
    parts = run_file_parts(items, FilterFiles, {"inp": inp, "store": store, "cfg": cfg, "cutoffs": cutoffs},
                           cfg.workers, stateful=bool(cfg.rules.clip_score_checkpoint))
    schema = SAMPLE_SCHEMA
    if cfg.rules.clip_score_checkpoint:
        schema = schema.append(pa.field("clip_score", pa.float32()))
    return finish_stage(out, NAME, fp, parts, schema, to_dict(cfg), started, [cfg.input],
                        extra={"queries_capped": len(cutoffs),
                               # rows passing the rules that have no query: never capped (None: cap off, no column,
                               # or a part committed by a version that did not count them)
                               "query_cap_exempt_rows": _exempt_rows(parts) if capped else None},
                        timings={"query_cap_s": round(t_cap, 3)})


STAGE = Stage(
    name=NAME, section=FilterStageConfig, default=FilterStageConfig, doc="rules, language id, the per-query cap, CLIP score: rows a model should learn from", upstream="crawl", wired=DATA_STAGE_WIRED,
    wire=wire_data_stage, fingerprint=fingerprint_of, run=run, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("filter", FilterStageConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
