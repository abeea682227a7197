"""Evaluation image sets as Ray Datasets: `imagefolder:DIR` (one subfolder per class) or
`parquet:PATH` (image bytes + integer label columns), local or s3://.

Rows: `image` (encoded bytes), `label` (int, index into `classnames`), `id` (path or row id).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa

from pipelines.core.runtime import data_args
from pipelines.core.storage import S3Options, Storage

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class EvalSet:
    name: str
    kind: str  # "imagefolder" | "parquet"
    storage: Storage
    files: list[str]  # relative to storage
    classnames: list[str]
    labels: list[int] | None = None  # imagefolder: label per file
    # Parquet only: which columns hold the encoded image and the integer label.
    image_col: str = "image"
    label_col: str = "label"


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("imagefolder", "parquet") or not path:
        raise ValueError(f"eval dataset {spec!r} must look like imagefolder:DIR or parquet:PATH")
    return kind, path


def check_dataset(spec: str, s3: S3Options | None, what: str) -> None:
    """The eval set `spec` names exists and holds something to read (images or .parquet files); the
    message names `what` (the setting) and the path. Cheap: a listing, nothing decoded."""
    kind, path = parse_spec(spec)
    if kind == "parquet" and _single_parquet_file(path, s3) is not None:
        return
    st = Storage.from_uri(path, s3)
    wanted = IMAGE_EXTS if kind == "imagefolder" else (".parquet",)
    if not any(f.lower().endswith(wanted) for f in st.list("")):
        raise FileNotFoundError(f"{what} {spec}: no {'images' if kind == 'imagefolder' else '.parquet files'} "
                                f"under {st.uri()}")


def open_eval_set(spec: str, s3: S3Options | None = None, name: str | None = None,
                  classnames: list[str] | None = None, image_col: str = "image", label_col: str = "label") -> EvalSet:
    kind, path = parse_spec(spec)
    st = Storage.from_uri(path, s3)
    name = name or os.path.basename(path.rstrip("/")) or path
    if kind == "imagefolder":
        files = [f for f in st.list("") if f.lower().endswith(IMAGE_EXTS) and "/" in f]
        if not files:
            raise FileNotFoundError(f"eval set {spec}: no images in class subfolders (DIR/<class>/<image>)")
        folders = sorted({f.split("/")[0] for f in files})
        names = classnames or [d.replace("_", " ") for d in folders]
        if len(names) != len(folders):
            raise ValueError(f"eval set {spec}: {len(folders)} class folders but {len(names)} class names")
        index = {d: i for i, d in enumerate(folders)}
        return EvalSet(name, kind, st, files, names, [index[f.split("/")[0]] for f in files])
    single = _single_parquet_file(path, s3)
    if single is not None:  # parquet:DIR/x.parquet; listing a file as a directory fails
        st, files = single
    else:
        files = [f for f in st.list("") if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"eval set {spec}: no .parquet files")
    if classnames is None:
        raise ValueError(f"eval set {spec}: a Parquet eval set needs a class-name list (--classnames FILE)")
    return EvalSet(name, kind, st, files, classnames, image_col=image_col, label_col=label_col)


def _single_parquet_file(path: str, s3: S3Options | None) -> tuple[Storage, list[str]] | None:
    """(storage of the parent, [file name]) when `path` names one .parquet file, else None."""
    import pyarrow.fs as pafs

    if not path.rstrip("/").endswith(".parquet"):
        return None
    parent, _, base = path.rstrip("/").rpartition("/")
    st = Storage.from_uri(parent or ".", s3)
    return (st, [base]) if st.fs.get_file_info(st.fs_path(base)).type == pafs.FileType.File else None


def count_images(es: EvalSet, stop_above: int | None = None) -> int:
    """Images in the set: its files (imagefolder) or the rows in its Parquet footers. With `stop_above`, footers
    are read only until the count passes it (a large set is not opened file by file to learn that it is large)."""
    if es.kind == "imagefolder":
        return len(es.files)
    import pyarrow.parquet as pq

    n = 0
    for f in es.files:
        with es.storage.open_input(f) as fh:
            n += pq.ParquetFile(fh).metadata.num_rows
        if stop_above is not None and n > stop_above:
            break
    return n


def read_eval_set(es: EvalSet, extra_label_cols: tuple[str, ...] = ()):
    """A Ray Dataset with image, label, id; reading is spread over the cluster. Parquet sets also carry
    `extra_label_cols` (as `label:<col>`, int64, null -> -1): other label spaces of the same images, so one
    embedding pass serves several zero-shot views (see evaluate.stage.EmbeddingCache)."""
    import ray.data

    if es.kind == "imagefolder":
        ds = ray.data.read_binary_files([es.storage.fs_path(f) for f in es.files], filesystem=es.storage.fs,
                                        include_paths=True, ray_remote_args=data_args())
        label_of = {es.storage.fs_path(f): lab for f, lab in zip(es.files, es.labels)}

        def add_labels(batch: pa.Table) -> pa.Table:
            paths = batch.column("path").to_pylist()
            return pa.table({"image": batch.column("bytes"), "label": pa.array([label_of[p] for p in paths], pa.int64()),
                             "id": pa.array(paths, pa.string())})

        return ds.map_batches(add_labels, batch_format="pyarrow", **data_args())
    image_col, label_col = es.image_col, es.label_col
    extra = [c for c in dict.fromkeys(extra_label_cols) if c not in (label_col, image_col)]
    paths = [es.storage.fs_path(f) for f in es.files]
    ds = (ray.data.read_parquet(paths, filesystem=es.storage.fs, ray_remote_args=data_args())
          .select_columns([image_col, label_col, *extra]))
    n_classes = len(es.classnames)

    def normalise(batch: pa.Table) -> pa.Table:
        labels = batch.column(label_col).to_pylist()
        bad = [x for x in labels if x is None or not 0 <= int(x) < n_classes]
        if bad:
            raise ValueError(f"eval set {es.name}: labels {bad[:5]} outside [0, {n_classes}) of the class-name list")
        cols = {"image": batch.column(image_col), "label": pa.array(labels, pa.int64()),
                "id": pa.array([f"{es.name}:" + hashlib.sha1(b).hexdigest()[:16]
                                for b in batch.column(image_col).to_pylist()], pa.string())}
        for c in extra:
            cols[f"label:{c}"] = pa.array([-1 if v is None else int(v) for v in batch.column(c).to_pylist()], pa.int64())
        return pa.table(cols)

    return ds.map_batches(normalise, batch_format="pyarrow", **data_args())
