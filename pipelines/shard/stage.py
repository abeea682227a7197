"""Stage 4, shard: the final training set as Parquet shards of a target size, then the manifest.

    python -m pipelines.shard --config configs/shard.yaml [key=value ...]

Shuffling is a Ray Data sort on a seeded hash of each key, with fixed, evenly spaced range
boundaries: the same input and seed give the same shards, row for row, however Ray lays out
blocks. Shards are named by their partition (`shard-<fingerprint>-00007-0.parquet`) and only the files this
run wrote, read back for their row counts, are committed by the manifest.

With `webdataset_samples_per_tar` set, the same rows, in the same order, are also written as WebDataset tars
for open_clip and other WebDataset readers: `wds/shard-<fingerprint>-<parquet shard>-<tar>.tar`, each sample
`<key>.jpg` (or .png/.webp: the image's own format, bytes unchanged), `<key>.txt` (the caption) and
`<key>.json` (the other columns). Every tar entry has a fixed mtime and owner, so a rerun writes the same
bytes. The manifest lists them under extra.webdataset (its `files` stay the Parquet shards that
Parquet readers take).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.core.manifest import MANIFEST_NAME, Manifest, fingerprint, read_committed
from pipelines.core.parts import OutputConfig, PartResult, already_committed, finish_stage
from pipelines.core.stage import DATA_STAGE_WIRED, Stage, wire_data_stage
from pipelines.core.runtime import RayConfig, data_args, init_ray
from pipelines.core.storage import S3Options, Storage

NAME = "shard"
_ORDER = "_shard_order"
_ORDER_BITS = 62  # order keys are uniform in [0, 2**62): int64-safe


@dataclass
class ShardConfig:
    # The committed output of the dedup stage (or any stage with sample rows), local or s3://.
    input: str = ""
    input_s3: S3Options = field(default_factory=S3Options)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Target rows per shard (shards come out within a few percent of it when shuffled).
    rows_per_shard: int = 10000
    # Optional byte target: the shard size is the smaller of the two, estimated from the input's bytes/row.
    bytes_per_shard: int | None = 256 * 1024 * 1024
    # Rows per Parquet row group: the unit a streaming reader fetches.
    row_group_size: int = 256
    # false: input order (file by file; within a file the committed key order).
    shuffle: bool = True
    seed: int = 0
    # Also write WebDataset tars of this many samples (~1000 is customary), in the Parquet shards' order.
    # null = Parquet only.
    webdataset_samples_per_tar: int | None = None

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("shard.input is empty: give the dedup stage's output directory")
        if self.rows_per_shard < 1 or self.row_group_size < 1:
            raise ValueError("shard.rows_per_shard and shard.row_group_size must be >= 1")
        if self.bytes_per_shard is not None and self.bytes_per_shard < 1:
            raise ValueError(f"shard.bytes_per_shard must be >= 1 or null, got {self.bytes_per_shard}")
        if self.webdataset_samples_per_tar is not None and self.webdataset_samples_per_tar < 1:
            raise ValueError(f"shard.webdataset_samples_per_tar must be >= 1 or null, "
                             f"got {self.webdataset_samples_per_tar}")


def _order_keys(batch: pa.Table, seed: int) -> pa.Table:
    keys = batch.column("key").to_pylist()
    order = [int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big") >> 2
             for k in keys]
    return batch.append_column(_ORDER, pa.array(order, pa.int64()))


def _input_order(batch: pa.Table, index_of: dict[str, int]) -> pa.Table:
    idx = [index_of[p] for p in batch.column("path").to_pylist()]
    order = [(i << 40) + int(k[:10], 16) for i, k in zip(idx, batch.column("key").to_pylist())]
    return batch.drop_columns(["path"]).append_column(_ORDER, pa.array(order, pa.int64()))


def shard_rows(cfg: ShardConfig, manifest: Manifest) -> int:
    rows = cfg.rows_per_shard
    if cfg.bytes_per_shard and manifest.rows_out:
        per_row = max(1.0, manifest.total_bytes / manifest.rows_out)
        rows = min(rows, max(1, int(cfg.bytes_per_shard / per_row)))
    return rows


def _names(fp: str):
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            # Ray appends "-<n>.parquet" when a task splits its output into several files.
            return f"shard-{fp[:8]}-{task_index:05d}"

    return ShardNames()


def _prepare(cfg: ShardConfig) -> tuple[Storage, Manifest, str]:
    inp, in_manifest = read_committed(cfg.input, cfg.input_s3, "shard.input (the curate stage's output)", producer="curate")
    conf = {k: v for k, v in to_dict(cfg).items() if k not in ("input", "input_s3", "output", "ray")}
    if conf.get("webdataset_samples_per_tar") is None:
        conf.pop("webdataset_samples_per_tar", None)  # Parquet-only runs keep the fingerprints they had
    return inp, in_manifest, fingerprint(NAME, conf, [in_manifest])


def fingerprint_of(cfg: ShardConfig) -> str:
    """What run(cfg) would commit under: its settings and its committed input (which must exist)."""
    return _prepare(cfg)[2]


def run(cfg: ShardConfig) -> Manifest:
    started = time.time()
    inp, in_manifest, fp = _prepare(cfg)
    out = Storage.from_uri(cfg.output.path, cfg.output.s3)
    committed = already_committed(out, NAME, fp)
    if committed is not None:
        return committed
    if in_manifest.rows_out == 0:
        raise ValueError(f"shard input {cfg.input} has no rows: nothing to shard")
    init_ray(cfg.ray)
    import ray.data
    from ray.data import SaveMode

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic task order -> deterministic names
    per_shard = shard_rows(cfg, in_manifest)
    num_shards = max(1, math.ceil(in_manifest.rows_out / per_shard))
    ds = ray.data.read_parquet(**inp.ray_read_args(in_manifest.file_paths()), ray_remote_args=data_args())
    if cfg.shuffle:
        step = 2 ** _ORDER_BITS / num_shards
        boundaries = [int(step * i) for i in range(1, num_shards)]
        ds = (ds.map_batches(_order_keys, batch_format="pyarrow", fn_kwargs={"seed": cfg.seed}, **data_args())
              .sort(_ORDER, boundaries=boundaries or None)
              .drop_columns([_ORDER]))
    else:
        # Input order, made explicit: Ray's repartition was seen to interleave blocks of two input
        # files. Order key = input file index, then the row's key: every stage commits its parts
        # sorted by key, so this is the committed order. Boundaries fall on file starts.
        starts: list[int] = []
        files = in_manifest.file_paths()
        index_of = {inp.fs_path(f): i for i, f in enumerate(files)}
        total = 0
        for i, f in enumerate(in_manifest.files):
            if i and total >= per_shard * (len(starts) + 1):
                starts.append(i << 40)
            total += f.rows
        ds = (ray.data.read_parquet(**inp.ray_read_args(files), include_paths=True, ray_remote_args=data_args())
              .map_batches(_input_order, batch_format="pyarrow", fn_kwargs={"index_of": index_of}, **data_args())
              .sort(_ORDER, boundaries=starts or None)
              .drop_columns([_ORDER]))
    one_shard = num_shards == 1 if cfg.shuffle else not starts
    if one_shard:
        # One shard: a sort without boundaries splits into Ray's default number of blocks (12 files of ~150
        # rows were written for 1,929 rows and a 2,000-row target); one block, in the sorted order, instead.
        ds = ds.repartition(1)
    # Shards live under data/, which this write replaces whole (Ray's OVERWRITE mode, which also lets
    # names be deterministic). An older manifest is removed first: it would list files being replaced.
    out.delete(MANIFEST_NAME)  # a missing file is not an error
    prefix = f"data/shard-{fp[:8]}-"
    ds.write_parquet(out.fs_path("data"), filesystem=out.fs, mode=SaveMode.OVERWRITE,
                     filename_provider=_names(fp), row_group_size=cfg.row_group_size,
                     max_rows_per_file=per_shard * 2)
    written = [p for p in out.list("data") if p.startswith(prefix) and p.endswith(".parquet")]
    files = []
    for path in sorted(written):
        with out.open_input(path) as f:
            meta = pq.ParquetFile(f).metadata
        files.append({"path": path, "rows": meta.num_rows, "bytes": out.size(path)})
    rows = sum(f["rows"] for f in files)
    part = PartResult("all", in_manifest.rows_out, rows, {}, files, [])
    if rows != in_manifest.rows_out:
        raise RuntimeError(f"shard wrote {rows} rows but its input committed {in_manifest.rows_out}; "
                           f"files under {out.uri()} starting {prefix} are stale or partial")
    sizes = np.array([f["rows"] for f in files])
    print(f"shard: {len(files)} shards, rows per shard min {sizes.min()} / median {int(np.median(sizes))} / "
          f"max {sizes.max()} (target {per_shard})", flush=True)
    schema = pq.read_schema(out.open_input(files[0]["path"]))
    extra: dict = {"rows_per_shard_target": per_shard, "num_shards": len(files)}
    if cfg.webdataset_samples_per_tar:
        extra["webdataset"] = write_webdataset(out, files, fp, cfg.webdataset_samples_per_tar)
    return finish_stage(out, NAME, fp, [part], schema, to_dict(cfg), started, [cfg.input], extra=extra)


# ------------------------------------------------------------------------------------------- WebDataset

WDS_DIR = "wds"
_IMAGE_EXT = ((b"\x89PNG", "png"), (b"RIFF", "webp"), (b"GIF8", "gif"), (b"BM", "bmp"))


def _image_ext(data: bytes) -> str:
    """The extension WebDataset decoders key on: the image's own format (the crawl stores JPEG by default)."""
    for magic, ext in _IMAGE_EXT:
        if data.startswith(magic) and (ext != "webp" or data[8:12] == b"WEBP"):
            return ext
    return "jpg"


def _tar_entry(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed: the same rows give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_tars(out: Storage, shard_path: str, prefix: str, per_tar: int) -> list[dict]:
    """One Parquet shard -> tars of `per_tar` samples, in its row order; their manifest entries."""
    entries: list[dict] = []
    tar = stream = None
    path, count = "", 0

    def close() -> None:
        tar.close()
        stream.close()
        entries.append({"path": path, "rows": count, "bytes": out.size(path)})

    with out.open_input(shard_path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if tar is None or count == per_tar:
                    if tar is not None:
                        close()
                    path, count = f"{prefix}-{len(entries):03d}.tar", 0
                    stream = out.open_output(path)
                    tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
                key, image, caption = row.pop("key"), row.pop("image"), row.pop("caption")
                _tar_entry(tar, f"{key}.{_image_ext(image)}", image)
                _tar_entry(tar, f"{key}.txt", caption.encode("utf-8"))
                _tar_entry(tar, f"{key}.json", json.dumps({"key": key, **row}, sort_keys=True).encode())
                count += 1
    if tar is not None:
        close()
    return entries


def write_webdataset(out: Storage, files: list[dict], fp: str, per_tar: int) -> dict:
    """The committed Parquet shards, again as WebDataset tars (one Ray task per shard). Tars of an earlier
    run under wds/ are removed first, so the directory holds exactly what the manifest lists."""
    import ray

    from pipelines.core.runtime import data_args

    out.delete_prefix(WDS_DIR)
    task = ray.remote(num_cpus=1, **data_args())(_write_tars)
    refs = [task.remote(out, f["path"], f"{WDS_DIR}/shard-{fp[:8]}-{i:05d}", per_tar) for i, f in enumerate(files)]
    tars = [entry for entries in ray.get(refs) for entry in entries]
    rows, expected = sum(t["rows"] for t in tars), sum(f["rows"] for f in files)
    if rows != expected:
        raise RuntimeError(f"shard: the WebDataset tars hold {rows} samples, the Parquet shards {expected}")
    print(f"shard: {len(tars)} WebDataset tars of up to {per_tar} samples under {out.uri(WDS_DIR)}", flush=True)
    return {"files": tars, "samples_per_tar": per_tar, "members": ["<key>.jpg|png|webp", "<key>.txt", "<key>.json"]}


STAGE = Stage(
    name=NAME, section=ShardConfig, default=ShardConfig, doc="shuffled, sized training shards", upstream="curate", wired=DATA_STAGE_WIRED,
    wire=wire_data_stage, fingerprint=fingerprint_of, run=run, parts=True)


def main(argv: list[str] | None = None) -> int:
    return run_command("shard", ShardConfig, argv, lambda cfg, _: run(cfg), doc=__doc__,
                       log_root=lambda c: c.output.path)
