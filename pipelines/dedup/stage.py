"""Stage 3, dedup: exact and near duplicates, and eval-set decontamination (paper section 5).

    python -m pipelines.dedup --config configs/dedup.yaml [key=value ...]

The plan (which rows go, and why) is computed by `dedup_core.plan_dedup` with Ray Data shuffles
and groupbys over the rows' hashes only, never the images and never on the driver. The drops are
then routed to their input files with a groupby, and each input file becomes one output part
holding the rows that stay; dropped rows go to `_rejected/` with the key of the row kept instead.
With `dedup.semantic.checkpoint` set, the rows that survive that plan are embedded by a CLIP image tower
and semantic duplicates (and near-copies of eval images) are dropped too (`semantic.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.dedup.plan import DedupConfig, EvalIndex, build_eval_index, overlap_report, plan_dedup
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


def _eval_hashes(eval_sets: list[EvalSet]) -> dict[str, list[tuple[int, int]]]:
    """(phash, colour signature) of every eval image, computed by Ray Data tasks from one decode each, as the
    crawl computes them; only the 16 bytes of hashes per image reach the driver."""
    out = {}
    for es in eval_sets:
        ds = read_eval_set(es).map_batches(_hash_batch, batch_format="numpy", **data_args())
        out[es.name] = [(int(r["phash"]), int(r["colour_sig"])) for r in ds.take_all()]
    return out


def _hash_batch(batch: dict[str, Any]) -> dict[str, list[int]]:
    from pipelines.core.images import hashes_of_encoded

    hashes = [hashes_of_encoded(b) for b in batch["image"]]
    return {"phash": [h[0] for h in hashes], "colour_sig": [h[1] for h in hashes]}


def _fill_colour(batch: pa.Table, inp: Storage, files: list[str], with_images: bool) -> pa.Table:
    """Gives every row a colour signature: the stored one, or one computed from the row's image bytes when the
    input has no colour_sig column (`with_images`: the image column was read instead) or the row's value is
    null or of another layout (those rows' images are read from their file, by key). Adds `colour_computed`
    (1 for rows computed here) and `colour_unknown` (1 for rows whose bytes do not decode: their signature
    stays 0 and their near-duplicate edges rest on the phash alone), so the stage can count both."""
    from pipelines.core.images import colour_known

    n = batch.num_rows
    if with_images:
        todo, stored = np.ones(n, bool), np.zeros(n, np.int64)
        images = batch.column("image").to_pylist()
        batch = batch.drop_columns(["image"])
    else:
        stored = pc.fill_null(batch.column("colour_sig"), 0).to_numpy().astype(np.int64)
        todo = ~colour_known(stored)
        images = _images_of(batch, todo, inp, files)
        batch = batch.drop_columns(["colour_sig"])
    colour, unknown = stored.copy(), np.zeros(n, np.int64)
    for i in np.flatnonzero(todo):
        colour[i], unknown[i] = _signature(images[i])
    return batch.append_column("colour_sig", pa.array(colour, pa.int64())) \
                .append_column("colour_computed", pa.array(todo.astype(np.int64))) \
                .append_column("colour_unknown", pa.array(unknown))


def _images_of(batch: pa.Table, todo: np.ndarray, inp: Storage, files: list[str]) -> list[bytes | None]:
    """The image bytes of the `todo` rows, read from their input files (only files holding such rows)."""
    images: list[bytes | None] = [None] * batch.num_rows
    keys, file_idx = batch.column("key").to_pylist(), batch.column("file_idx").to_numpy()
    for idx in np.unique(file_idx[todo]):
        table = inp.read_parquet(files[int(idx)], columns=["key", "image"])
        found = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
        for i in np.flatnonzero(todo & (file_idx == idx)):
            images[i] = found.get(keys[i])
    return images


def _signature(image: bytes | None) -> tuple[int, int]:
    """(colour signature, 0), or (0, 1) for bytes that do not decode."""
    from pipelines.core.images import colour_signature_of_encoded

    if not image:
        return 0, 1
    try:
        return colour_signature_of_encoded(image), 0
    except ValueError:
        return 0, 1


def _write_drop_group(group: pa.Table, out: Storage, fp: str, kind: str) -> pa.Table:
    """Writes one input file's drops to one small Parquet file under the stage's _work/ (`kind`: "drops" for
    the plan's, "semantic" for semantic dedup's, which only ever drops rows the plan kept). A Ray task."""
    idx = int(group.column("file_idx")[0].as_py())
    path = _drops_path(fp, kind, idx)
    out.write_parquet(group.select(["key", "reason", "detail"]), path)
    return pa.table({"file_idx": [idx], "path": [path]})


def _drops_path(fp: str, kind: str, idx: int) -> str:
    return f"_work/{fp[:8]}/{kind}-{idx:05d}.parquet"


def _write_drops(drops: Any, out: Storage, fp: str, kind: str, drop_files: dict[int, list[str]]) -> None:
    """Writes `drops` per input file and adds each file written to `drop_files` (input file -> its drop files)."""
    written = drops.groupby("file_idx").map_groups(_write_drop_group, batch_format="pyarrow",
                                                    fn_kwargs={"out": out, "fp": fp, "kind": kind},
                                                    **data_args()).take_all()
    for r in written:
        drop_files.setdefault(int(r["file_idx"]), []).append(r["path"])


_NO_DROPS = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def _read_drops(storage: Storage, paths: list[str]) -> pa.Table:
    return pa.concat_tables([storage.read_parquet(p).select(_NO_DROPS.names) for p in paths]) if paths \
        else _NO_DROPS.empty_table()


class ApplyDrops:
    def __init__(self, inp: Storage, store: PartStore, fp: str, drop_files: dict[int, list[str]]) -> None:
        self.inp = inp
        self.store = store
        self.fp = fp
        self.drop_files = drop_files

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out = []
        for idx, path in zip(batch["file_idx"], batch["path"]):
            name = os.path.splitext(os.path.basename(path))[0]
            out.append((self.store.done(name) or self._apply(name, int(idx), path)).dumps())
        return {"result": out}

    def _apply(self, name: str, idx: int, path: str) -> PartResult:
        table = self.inp.read_parquet(path)
        drops = _read_drops(self.store.storage, self.drop_files.get(idx, []))
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
    dedup = to_dict(cfg.dedup)
    if not cfg.dedup.semantic.enabled:  # counts only when on: outputs committed before it stay valid
        del dedup["semantic"]
    for key in ("rows_per_partition", "max_shuffle_rows"):  # how many tasks and passes, not what they find:
        del dedup[key]                                       # outputs committed before them stay valid
    conf = {"dedup": dedup, "eval_sets": eval_sizes}
    return inp, in_manifest, eval_sets, fingerprint(NAME, conf, [in_manifest])


def fingerprint_of(cfg: DedupStageConfig) -> str:
    """What run(cfg) would commit under: its settings, the eval sets' sizes and its committed input."""
    return _prepare(cfg)[3]


def _colour_stats(keys: Any, stored: bool, eval_index: EvalIndex | None) -> dict[str, Any]:
    """How the rows got their colour signatures, for the manifest (and one line on the terminal when any
    had to be computed): no input is quietly treated as colour-blind."""
    from pipelines.core.images import colour_known

    computed, unknown = int(keys.sum("colour_computed") or 0), int(keys.sum("colour_unknown") or 0)
    rows = keys.count()
    stats = {"input_column": stored, "rows": rows, "stored": rows - computed, "computed_from_image": computed,
             "undecodable_phash_only": unknown,
             "eval_images_phash_only": int((~colour_known(eval_index.colours)).sum()) if eval_index else 0}
    if computed:
        why = "null or another layout in" if stored else "no colour_sig column in"
        print(f"dedup: colour signature computed from the image bytes for {computed:,} of {rows:,} rows ({why} the input)"
              + (f"; {unknown:,} do not decode: phash only" if unknown else ""), flush=True)
    return stats


def _survivors(batch: dict[str, Any], inp: Storage, out: Storage, drop_files: dict[int, list[str]]) -> pa.Table:
    """The rows of each input file that the plan keeps: key (also as `id`, for the embedder), file_idx, area
    (original pixels: the representative rule) and the image bytes."""
    tables = []
    for idx, path in zip(batch["file_idx"], batch["path"]):
        table = inp.read_parquet(str(path), columns=["key", "image", "original_width", "original_height"])
        gone = _read_drops(out, drop_files.get(int(idx), [])).column("key")
        table = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=gone)))
        area = pc.multiply(pc.cast(table.column("original_width"), pa.int64()),
                           pc.cast(table.column("original_height"), pa.int64()))
        tables.append(pa.table({"key": table.column("key"), "id": table.column("key"),
                                "file_idx": pa.array(np.full(table.num_rows, int(idx)), pa.int64()),
                                "area": pc.fill_null(area, 0), "image": table.column("image")}))
    return pa.concat_tables(tables)


def _embed(ds: Any, cfg: DedupStageConfig, what: str, flag_undecodable: bool = False) -> Any:
    """`ds` with an `embedding` column (unit rows) instead of `image`: pipelines.core.embedding's ImageEmbedder, an actor pool
    that loads the checkpoint once per actor."""
    from ray.data import ActorPoolStrategy

    from pipelines.core.embedding import ImageEmbedder

    sem = cfg.dedup.semantic
    return ds.map_batches(ImageEmbedder, batch_size=sem.batch_size, batch_format="numpy", num_cpus=1,
                          compute=ActorPoolStrategy(min_size=1, max_size=sem.actors),
                          fn_constructor_kwargs={"checkpoint": sem.checkpoint, "s3": cfg.input_s3, "with_phash": False,
                                                 "activation": sem.activation, "what": what,
                                                 "flag_undecodable": flag_undecodable}, **data_args())


def _decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = batch["error"] == ""
    return {k: batch[k][ok] for k in ("key", "file_idx", "area", "embedding")}


def _undecodable_drops(batch: pa.Table) -> pa.Table:
    from pipelines.dedup.semantic import DROPS_SCHEMA

    batch = batch.filter(pc.not_equal(batch.column("error"), ""))
    return pa.table({"key": batch.column("key"), "file_idx": batch.column("file_idx"),
                     "reason": pa.array(["semantic_undecodable"] * batch.num_rows, pa.string()),
                     "detail": batch.column("error").cast(pa.string())}, schema=DROPS_SCHEMA)


def _eval_embeddings(eval_sets: list[EvalSet], cfg: DedupStageConfig) -> tuple[np.ndarray | None, list[str]]:
    """Every eval image's embedding, labelled "<set>#<i>" (i: position when the set's ids are sorted)."""
    vectors, labels = [], []
    for es in eval_sets:
        batches = list(_embed(read_eval_set(es), cfg, f"eval set {es.name} image").iter_batches(
            batch_format="numpy", batch_size=None))
        ids = np.concatenate([b["id"] for b in batches]).astype(str)
        order = np.argsort(ids, kind="stable")
        vectors.append(np.concatenate([b["embedding"] for b in batches]).astype(np.float32)[order])
        labels += [f"{es.name}#{i}" for i in range(len(ids))]
    return (np.concatenate(vectors) if vectors else None), labels


def _semantic_dedup(cfg: DedupStageConfig, inp: Storage, out: Storage, fp: str, items: list[dict],
                    drop_files: dict[int, list[str]], eval_sets: list[EvalSet], timings: dict) -> dict[str, Any]:
    """Embeds the plan's survivors (and the eval images), plans semantic drops, writes them beside the plan's."""
    import ray.data

    from pipelines.dedup.semantic import plan_semantic

    t0 = time.time()
    eval_emb, eval_labels = _eval_embeddings(eval_sets, cfg)
    rows = ray.data.from_items(items).map_batches(_survivors, batch_size=1, batch_format="numpy", **data_args(),
                                                  fn_kwargs={"inp": inp, "out": out, "drop_files": drop_files})
    # A training row whose image does not decode here is rejected with its reason, never raised out of the stage.
    embedded = _embed(rows, cfg, "dedup input row", flag_undecodable=True).materialize()
    emb = embedded.map_batches(_decoded, batch_format="numpy", **data_args()).materialize()
    undecodable = embedded.map_batches(_undecodable_drops, batch_format="pyarrow", **data_args()).materialize()
    timings["semantic_embed_s"] = round(time.time() - t0, 3)
    drops, stats = plan_semantic(emb, cfg.dedup.semantic, eval_emb, eval_labels, cfg.dedup.partitions_for(emb.count()),
                                 cfg.dedup.shuffle_strategy)
    stats["semantic_undecodable"] = undecodable.count()
    if stats["semantic_undecodable"]:
        drops = undecodable if drops is None else drops.union(undecodable)
    if drops is not None:
        _write_drops(drops, out, fp, "semantic", drop_files)
    print(f"dedup: semantic: {stats}", flush=True)
    return stats


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
    eval_index = build_eval_index(_eval_hashes(eval_sets)) if cfg.eval_sets else None
    timings["eval_index_s"] = round(time.time() - t0, 3)
    index_of = {inp.fs_path(f): i for i, f in enumerate(files)}

    def add_file_idx(batch: pa.Table) -> pa.Table:
        idx = [index_of[p] for p in batch.column("path").to_pylist()]
        return batch.drop_columns(["path"]).append_column("file_idx", pa.array(idx, pa.int64()))

    t0 = time.time()
    with inp.open_input(files[0]) as f:
        schema = pq.read_schema(f)  # the footer only, not the images
    colour = cfg.dedup.colour_threshold is not None
    stored = "colour_sig" in schema.names
    columns = KEY_COLUMNS + (["colour_sig" if stored else "image"] if colour else [])
    keys = (ray.data.read_parquet(**inp.ray_read_args(files), columns=columns, include_paths=True, ray_remote_args=data_args())
            .map_batches(add_file_idx, batch_format="pyarrow", **data_args()))
    colour_stats = {}
    if colour:
        keys = keys.map_batches(_fill_colour, fn_kwargs={"inp": inp, "files": files, "with_images": not stored},
                                batch_format="pyarrow", **data_args()).materialize()
        colour_stats = _colour_stats(keys, stored, eval_index)
        timings["colour_s"] = round(time.time() - t0, 3)
    drops = plan_dedup(keys, cfg.dedup, eval_index).materialize()
    timings["plan_s"] = round(time.time() - t0, 3)
    report = overlap_report(drops, eval_index) if cfg.eval_sets else {}
    drop_files: dict[int, list[str]] = {}
    _write_drops(drops, out, fp, "drops", drop_files)
    items = [{"file_idx": i, "path": f} for i, f in enumerate(files)]
    semantic = {}
    if cfg.dedup.semantic.enabled:
        t0 = time.time()
        semantic = _semantic_dedup(cfg, inp, out, fp, items, drop_files, eval_sets, timings)
        timings["semantic_s"] = round(time.time() - t0, 3)
    store = PartStore(out, NAME, fp, cfg.output.row_group_size)
    parts = run_file_parts(items, ApplyDrops, {"inp": inp, "store": store, "fp": fp, "drop_files": drop_files},
                           cfg.workers)
    if report:
        print("dedup: eval-set overlap (paper section 5)")
        for name, r in report.items():
            print(f"  {name}: {r}")
    manifest = finish_stage(out, NAME, fp, parts, schema, to_dict(cfg), started, [cfg.input],
                            extra={"eval_overlap": report, "colour_sig": colour_stats, "semantic": semantic},
                            timings=timings)
    out.delete_prefix(f"_work/{fp[:8]}")
    return manifest


STAGE = Stage(
    name=NAME, section=DedupStageConfig, default=DedupStageConfig, doc="exact and near duplicates, and eval-set decontamination (paper section 5)", upstream="filter", wired=DATA_STAGE_WIRED,
    wire=wire_data_stage, fingerprint=fingerprint_of, run=run, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("dedup", DedupStageConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
