"""Evaluate a CLIP checkpoint: zero-shot classification, linear probe, image-text retrieval, and the
paper's data-overlap analysis (section 5).

    python -m pipelines.evaluate [--config FILE] checkpoint=PATH dataset=imagefolder:DIR|parquet:PATH \
        output=DIR [classnames=FILE] [templates=FILE|openai-imagenet|simple] \
        [task=zeroshot|linear-probe|retrieval] [train_manifest=DIR] [probe.test_fraction=0.5 ...]

Image embeddings come from Ray Data batch inference (`ImageEmbedder`, a pool of actors that each
load the checkpoint once); only (id, label, embedding[, phash]) rows reach the driver. A set of at
most `local_images` images is embedded on the driver instead, by the same ImageEmbedder code with the
model the driver loads anyway: there an actor's start costs more than the embedding. The text tower
runs on the driver: class names x templates are few, captions are small.

Tasks and their data:
- zeroshot: one template (`single_template`, the paper's "a photo of a {}.") and the chosen template
  set (ensemble) side by side; top-level `top1`/`top5` are the chosen set's.
- linear-probe: with `probe_train=DATASET` the probe trains on that set and tests on `dataset`;
  without it `dataset` is split deterministically (rows ordered by id, stratified, seeded) into
  train/test (`probe.test_fraction`), and a validation split of the train rows picks C
  (see pipelines.linear_probe).
- retrieval: `parquet:PATH` with an image column and a caption column (a string, or a list of
  strings for COCO-style several captions per image); recall@1/5/10 both ways.
- overlap (`train_manifest=DIR`, classification tasks): eval images within `overlap_hamming`
  phash bits of any training row are Overlap, the rest Clean. The training phashes stream through
  Ray Data tasks that match them against the small eval index (dedup's exact pigeonhole lookup);
  only matched eval indices come back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from clip_model.export import load_export
from clip_model.formats import weight_files
from clip_model.zeroshot import build_classifier, classification_metrics, load_templates, retrieval_metrics

from pipelines.core.cli import run_command
from pipelines.core.config import to_dict
from pipelines.evaluate.overlap import overlap_mask
from pipelines.evaluate.sets import EvalSet, count_images, open_eval_set, read_eval_set
from pipelines.evaluate.config import SINGLE_TEMPLATE, TASKS, EvalConfig  # noqa: F401 (TASKS: the package's lazy export)
from pipelines.core.checkpoints import local_checkpoint
from pipelines.core.embedding import ImageEmbedder
from pipelines.core.manifest import Manifest, read_committed
from pipelines.core.runtime import data_args, init_ray
from pipelines.core.storage import Storage

RESULTS_FILE = "results.json"


# ---------------------------------------------------------------- checkpoint and inputs

def load_classnames(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classnames file {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    names = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines()]
    names = [n for n in names if isinstance(n, str) and n.strip()]
    if not names:
        raise ValueError(f"classnames file {path}: no class names (JSON list or one name per line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"classnames file {path}: duplicate class names {dup[:5]}")
    return names


# ---------------------------------------------------------------- Ray Data batch inference

@dataclass
class Embedded:
    """Rows collected on the driver, ordered by id (Ray Data does not keep input order)."""

    ids: list[str]
    embeddings: np.ndarray  # N, D float32, unit norm
    columns: dict[str, np.ndarray]  # label / caption / phash / label:<col>, aligned with ids
    label_col: str = "label"  # the eval set's column that `label` holds

    def relabelled(self, label_col: str) -> "Embedded":
        """The same rows with `label` taken from another label column read in the same pass."""
        if label_col == self.label_col:
            return self
        key = f"label:{label_col}"
        if key not in self.columns:
            raise KeyError(f"label column {label_col!r} was not read with these embeddings")
        return Embedded(self.ids, self.embeddings, {**self.columns, "label": self.columns[key]}, label_col)


@dataclass
class EmbeddingCache:
    """Image embeddings shared by the evaluation jobs of one stage run: jobs on the same eval set and weights
    (several label spaces of the same images, e.g. pair / shape / colour) embed it once. `label_cols` names,
    per dataset, every label column some job reads, so the first pass carries them all."""

    label_cols: dict[str, list[str]] = field(default_factory=dict)
    entries: dict[tuple, Embedded] = field(default_factory=dict)
    passes: int = 0  # embedding passes actually run (the rest were shared)
    # (checkpoint, activation) -> (local path, model, tokenizer): an s3:// export is downloaded and loaded once.
    models: dict[tuple[str, str | None], tuple[str, Any, Any]] = field(default_factory=dict)

    def add_job(self, dataset: str, label_col: str) -> None:
        """Declare a job before any runs, so the first pass over `dataset` reads every label column needed."""
        cols = self.label_cols.setdefault(dataset, [])
        if label_col not in cols:
            cols.append(label_col)


def _workers(cfg: EvalConfig) -> int:
    import ray

    return cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)


def embed(ds: Any, cfg: EvalConfig, with_phash: bool, images: int, model: Any) -> Embedded:
    """The embeddings of `ds` (image, id, label columns), a set of `images` images. At most cfg.local_images of
    them are embedded in this process with `model`, the model it loaded for the text side; more by a pool of
    ImageEmbedder actors that each load the checkpoint. Both paths run the same ImageEmbedder code."""
    if images <= cfg.local_images:
        embedder = ImageEmbedder.with_model(model, with_phash)
        batches = [embedder(b) for b in ds.iter_batches(batch_format="numpy", batch_size=cfg.batch_size)]
    else:
        from ray.data import ActorPoolStrategy

        out = ds.map_batches(ImageEmbedder, batch_size=cfg.batch_size, batch_format="numpy",
                             compute=ActorPoolStrategy(min_size=1, max_size=_workers(cfg)), num_cpus=1,
                             fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "s3": cfg.s3,
                                                    "with_phash": with_phash, "activation": cfg.activation},
                             **data_args())
        batches = list(out.iter_batches(batch_format="numpy", batch_size=None))
    if not batches:
        raise ValueError(f"eval set {cfg.dataset}: no images")
    cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(cols["id"].astype(str), kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    return Embedded([str(i) for i in cols.pop("id")], cols.pop("embedding").astype(np.float32), cols, cfg.label_col)


def _open_classification_set(spec: str, cfg: EvalConfig, classnames: list[str] | None) -> EvalSet:
    es = open_eval_set(spec, cfg.s3, classnames=classnames, image_col=cfg.image_col, label_col=cfg.label_col)
    if es.kind == "parquet":
        _require_columns(es, [cfg.image_col, cfg.label_col], spec)
    return es


def _require_columns(es: EvalSet, cols: list[str], spec: str) -> None:
    with es.storage.open_input(es.files[0]) as f:
        have = pq.ParquetFile(f).schema_arrow.names
    missing = [c for c in cols if c not in have]
    if missing:
        raise ValueError(f"eval set {spec}: missing column(s) {missing}; the file has {have}")


# ---------------------------------------------------------------- tasks

def _text_features(model: Any, tokenizer: Any, texts: list[str], batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        feats = [model.encode_text(tokenizer(texts[i:i + batch], context_length=model.context_length))
                 for i in range(0, len(texts), batch)]
    return F.normalize(torch.cat(feats).float(), dim=-1)


def _labels(emb: Embedded, classnames: list[str], spec: str) -> torch.Tensor:
    labels = torch.as_tensor(emb.columns["label"].astype(np.int64))
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(classnames):
        raise ValueError(f"eval set {spec}: labels span [{int(labels.min())}, {int(labels.max())}] but there are "
                         f"{len(classnames)} class names")
    return labels


def _named(metrics: dict, classnames: list[str]) -> dict:
    return {**metrics, "per_class": dict(zip(classnames, metrics["per_class"]))}


def run_zeroshot(emb: Embedded, model: Any, tokenizer: Any, classnames: list[str], templates: list[str],
                 spec: str, single_template: str = SINGLE_TEMPLATE) -> tuple[dict, torch.Tensor]:
    """Results and the per-image correctness of the chosen (ensemble) templates."""
    labels = _labels(emb, classnames, spec)
    img = torch.from_numpy(emb.embeddings)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, context_length=model.context_length)

    modes, correct = {}, None
    for mode, temps in (("single", [single_template]), ("ensemble", templates)):
        weights = build_classifier(model.encode_text, tokenize, classnames, temps)  # D, C
        logits = img @ weights  # N, C; the logit scale changes no ranking
        modes[mode] = {"templates": len(temps), **_named(classification_metrics(logits, labels, len(classnames)),
                                                         classnames)}
        correct = logits.argmax(dim=1) == labels
    chosen = modes["ensemble"]
    results = {"top1": chosen["top1"], "top5": chosen["top5"], "mean_per_class": chosen["mean_per_class"],
               "per_class": chosen["per_class"], "support": chosen["support"], "confusion": chosen["confusion"],
               "modes": modes}
    return results, correct


def run_linear_probe(emb: Embedded, train: Embedded | None, classnames: list[str], cfg: EvalConfig
                     ) -> tuple[dict, torch.Tensor, np.ndarray]:
    """Results, per-test-image correctness, and the indices (into emb) of the test rows."""
    # Imported here: scikit-learn costs ~1.7 s of CPU to import, and only the driver's probe uses it.
    from pipelines.evaluate.linear_probe import linear_probe, split_indices

    labels = _labels(emb, classnames, cfg.dataset).numpy()
    if train is None:
        train_idx, test_idx = split_indices(labels, cfg.probe.test_fraction, cfg.probe.seed, "train/test")
        x_tr, y_tr = emb.embeddings[train_idx], labels[train_idx]
        split = (f"--dataset split: rows ordered by id, stratified, seed {cfg.probe.seed}; "
                 f"test {cfg.probe.test_fraction:.0%}, then validation {cfg.probe.val_fraction:.0%} of train")
    else:
        test_idx = np.arange(len(labels))
        x_tr, y_tr = train.embeddings, _labels(train, classnames, cfg.probe_train).numpy()
        split = (f"train on --probe-train {cfg.probe_train}, test on --dataset; validation "
                 f"{cfg.probe.val_fraction:.0%} of train (stratified, seed {cfg.probe.seed})")
    probe = linear_probe(x_tr, y_tr, emb.embeddings[test_idx], labels[test_idx], cfg.probe)
    scores = torch.from_numpy(probe.pop("scores"))
    y_test = torch.from_numpy(labels[test_idx])
    if scores.shape[1] < len(classnames):  # classes absent from both train and test
        scores = torch.cat([scores, torch.full((len(scores), len(classnames) - scores.shape[1]), -np.inf,
                                               dtype=scores.dtype)], dim=1)
    metrics = _named(classification_metrics(scores, y_test, len(classnames)), classnames)
    return {**metrics, "probe": {**probe, "split": split}}, scores.argmax(dim=1) == y_test, test_idx


def run_retrieval(cfg: EvalConfig, model: Any, tokenizer: Any) -> dict:
    import ray.data

    es = open_eval_set(cfg.dataset, cfg.s3, classnames=[])
    if es.kind != "parquet":
        raise ValueError(f"--task retrieval needs parquet:PATH with {cfg.image_col!r} and {cfg.caption_col!r} "
                         f"columns, got {cfg.dataset}")
    _require_columns(es, [cfg.image_col, cfg.caption_col], cfg.dataset)
    image_col, caption_col, name = cfg.image_col, cfg.caption_col, es.name

    def rows(batch: pa.Table) -> pa.Table:
        images = batch.column(image_col)
        caps = [[c] if isinstance(c, str) else list(c or []) for c in batch.column(caption_col).to_pylist()]
        ids = [f"{name}:" + hashlib.sha1(b).hexdigest()[:16] for b in images.to_pylist()]
        return pa.table({"image": images, "id": pa.array(ids, pa.string()),
                         "caption": pa.array([json.dumps(c) for c in caps], pa.string())})

    ds = ray.data.read_parquet(**es.storage.ray_read_args(es.files), ray_remote_args=data_args()).select_columns([image_col, caption_col])
    emb = embed(ds.map_batches(rows, batch_format="pyarrow", **data_args()), cfg, with_phash=False,
                images=count_images(es, cfg.local_images), model=model)
    texts, owner = [], []
    for i, caps in enumerate(emb.columns["caption"]):
        for c in json.loads(caps):
            texts.append(c), owner.append(i)
    if not texts:
        raise ValueError(f"eval set {cfg.dataset}: column {caption_col!r} holds no captions")
    txt = _text_features(model, tokenizer, texts)
    metrics = retrieval_metrics(torch.from_numpy(emb.embeddings), txt, owner)
    return {**metrics, "n_images": len(emb.ids), "n_texts": len(texts)}


# ---------------------------------------------------------------- data overlap (paper section 5)

def overlap_report(correct: torch.Tensor, overlap: np.ndarray, ids: list[str]) -> dict:
    c = correct.numpy().astype(bool)

    def acc(sel: np.ndarray) -> float | None:
        return float(c[sel].mean()) if sel.any() else None

    every = np.ones(len(c), dtype=bool)
    all_, clean = acc(every), acc(~overlap)
    return {"n": {"all": int(len(c)), "clean": int((~overlap).sum()), "overlap": int(overlap.sum())},
            "top1": {"all": all_, "clean": clean, "overlap": acc(overlap),
                     "all_minus_clean": None if clean is None else all_ - clean},
            "overlap_ids": [ids[i] for i in np.flatnonzero(overlap)][:1000]}


# ---------------------------------------------------------------- the job

def evaluate(cfg: EvalConfig, cache: EmbeddingCache | None = None) -> dict:
    """Run one task; commits OUTPUT (local or s3://): results.json, the PNG plots and _manifest.json last.
    Returns the results. With `cache`, the image embeddings are shared with other jobs on the same set."""
    started, timings = time.time(), {}
    # Fail on bad input before any Ray work starts.
    checkpoint, model, tokenizer = _load_model(cfg, cache)
    templates = load_templates(cfg.templates) if cfg.task == "zeroshot" else []
    classnames = load_classnames(cfg.classnames) if cfg.classnames else None
    train = read_committed(cfg.train_manifest, cfg.s3, "train_manifest", column="phash") if cfg.train_manifest else None
    out = Storage.from_uri(cfg.output, cfg.s3)
    init_ray(cfg.ray)
    results: dict[str, Any] = {"task": cfg.task, "checkpoint": cfg.checkpoint, "dataset": cfg.dataset}
    if cfg.task == "retrieval":
        t0 = time.time()
        results.update(run_retrieval(cfg, model, tokenizer))
        timings["retrieval_s"] = round(time.time() - t0, 3)
    else:
        results.update(_classification(cfg, model, tokenizer, classnames, templates, train, timings, cache))
    results["config"] = to_dict(cfg)
    results["timings"] = {**timings, "total_s": round(time.time() - started, 3)}
    files = {}
    if cfg.plots and cfg.task != "retrieval":
        with tempfile.TemporaryDirectory(prefix="eval_plots_") as tmp:
            results["plots"] = [os.path.basename(p) for p in _plots(results, tmp)]
            for name in results["plots"]:
                with open(os.path.join(tmp, name), "rb") as f:
                    files[name] = f.read()
    files[RESULTS_FILE] = json.dumps(results, indent=2, allow_nan=False).encode()
    commit_results(out, files, results, fingerprint_of(cfg, checkpoint, train[1] if train else None),
                   to_dict(cfg), time.time() - started)
    print(format_table(results), flush=True)
    return results


def fingerprint_of(cfg: EvalConfig, checkpoint: str, train: Manifest | None) -> str:
    """One evaluation's identity: the job's settings (template and class-name files by content), the weights
    by content, and the training shards it is checked against."""
    from pipelines.core.manifest import fingerprint

    operational = ("output", "s3", "ray", "workers", "batch_size", "local_images")
    conf = {k: v for k, v in to_dict(cfg).items() if k not in operational}
    for key in ("templates", "classnames"):
        path = getattr(cfg, key)
        if path and os.path.isfile(path):
            conf[f"{key}_sha256"] = _sha256_file(path)
    hashes = [_sha256_file(f) for f in weight_files(checkpoint)]
    conf["weights_sha256"] = hashes[0] if len(hashes) == 1 else hashes
    return fingerprint("evaluate", conf, [train] if train is not None else [])


def _sha256_file(path: str) -> str:
    st = os.stat(path)
    return _sha256_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, once per (path, size, mtime): the jobs of a stage run hash the same weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def commit_results(out: Storage, files: dict[str, bytes], results: dict, fp: str, config: dict,
                   seconds: float) -> Manifest:
    """Write an evaluation's files, then its manifest (the commit)."""
    from pipelines.core.manifest import write_manifest

    entries = []
    for name, data in sorted(files.items()):
        out.write_bytes(name, data)
        entries.append({"path": name, "rows": 0, "bytes": len(data)})
    n = int(results.get("n") or results.get("n_images") or 0)
    manifest = Manifest(stage="evaluate", fingerprint=fp, files=entries, rows_in=n, rows_out=n, config=config,
                        timings={"total_s": round(seconds, 3)},
                        extra={"results": {k: results[k] for k in ("task", "top1", "top5", "n", "mean_per_class")
                                           if k in results}})
    write_manifest(out, "", manifest)
    return manifest


def _classification(cfg: EvalConfig, model: Any, tokenizer: Any, classnames: list[str] | None,
                     templates: list[str], train_manifest: tuple[Storage, Manifest] | None,
                     timings: dict[str, float], cache: EmbeddingCache | None = None) -> dict:
    es = _open_classification_set(cfg.dataset, cfg, classnames)
    train_es = _open_classification_set(cfg.probe_train, cfg, classnames) if cfg.probe_train else None
    if train_es is not None and train_es.classnames != es.classnames:
        raise ValueError(f"--probe-train {cfg.probe_train} has classes {train_es.classnames[:5]}... but --dataset "
                         f"{cfg.dataset} has {es.classnames[:5]}...: they must be the same list")
    t0 = time.time()
    emb = _embedded(es, cfg, cache, model)
    train = _embed_set(train_es, cfg, False, model) if train_es else None
    timings["embed_s"] = round(time.time() - t0, 3)
    t0 = time.time()
    out: dict[str, Any] = {"n": len(emb.ids), "classnames": es.classnames}
    if cfg.task == "zeroshot":
        res, correct = run_zeroshot(emb, model, tokenizer, es.classnames, templates, cfg.dataset,
                                    cfg.single_template)
        test_idx = np.arange(len(emb.ids))
        out["templates"] = cfg.templates
    else:
        res, correct, test_idx = run_linear_probe(emb, train, es.classnames, cfg)
    out.update(res)
    timings[f"{cfg.task}_s"] = round(time.time() - t0, 3)
    if train_manifest is not None:
        t0 = time.time()
        mask = overlap_mask(train_manifest, emb.columns["phash"], cfg.overlap_hamming)
        out["overlap"] = overlap_report(correct, mask[test_idx], [emb.ids[i] for i in test_idx])
        out["overlap"]["hamming"] = cfg.overlap_hamming
        timings["overlap_s"] = round(time.time() - t0, 3)
    return out


def _load_model(cfg: EvalConfig, cache: EmbeddingCache | None) -> tuple[str, Any, Any]:
    """(local checkpoint path, model, tokenizer); shared through the cache by the jobs of one stage run."""
    key = (cfg.checkpoint, cfg.activation)
    if cache is not None and key in cache.models:
        return cache.models[key]
    checkpoint = local_checkpoint(cfg.checkpoint, cfg.s3)
    loaded = (checkpoint, *load_export(checkpoint, activation=cfg.activation))
    if cache is not None:
        cache.models[key] = loaded
    return loaded


def _embed_set(es: EvalSet, cfg: EvalConfig, with_phash: bool, model: Any, extra: tuple[str, ...] = ()) -> Embedded:
    return embed(read_eval_set(es, extra), cfg, with_phash, count_images(es, cfg.local_images), model)


def _embedded(es: EvalSet, cfg: EvalConfig, cache: EmbeddingCache | None, model: Any) -> Embedded:
    """The eval set's embeddings: from the cache when another job on the same images already ran."""
    with_phash = bool(cfg.train_manifest)
    if cache is None:
        return _embed_set(es, cfg, with_phash, model)
    key = (cfg.dataset, cfg.checkpoint, cfg.activation, cfg.image_col, with_phash)
    if key not in cache.entries:
        extra = tuple(cache.label_cols.get(cfg.dataset, ())) if es.kind == "parquet" else ()
        if extra:  # other jobs' label columns: a missing one is named here, not in a Ray task
            _require_columns(es, list(extra), cfg.dataset)
        cache.entries[key] = _embed_set(es, cfg, with_phash, model, extra)
        cache.passes += 1
    return cache.entries[key].relabelled(cfg.label_col)


def _plots(results: dict, output: str) -> list[str]:
    from pipelines.evaluate.plots import confusion_png, per_class_png

    names = results["classnames"]
    title = f"{results['task']} on {os.path.basename(results['dataset'].rstrip('/'))}"
    present = _present_classes(results)
    per_class = ({m: [r["per_class"][c] for c in present] for m, r in results["modes"].items()} if "modes" in results
                 else {results["task"]: [results["per_class"][c] for c in present]})
    return [confusion_png(results["confusion"], names, os.path.join(output, "confusion.png"), title),
            per_class_png(per_class, present, os.path.join(output, "per_class_accuracy.png"), title)]


def _present_classes(results: dict) -> list[str]:
    """Class names that have eval images (a label space may name more classes than the set holds)."""
    return [c for c, n in zip(results["classnames"], results["support"]) if n > 0]


def format_table(results: dict) -> str:
    lines = [f"evaluate {results['task']}: {results['dataset']}"]
    if results["task"] == "retrieval":
        lines.append(f"  {results['n_images']} images, {results['n_texts']} texts")
        for way in ("image_to_text", "text_to_image"):
            lines.append(f"  {way:<14}" + "".join(f"  R@{k} {results[f'{way}_R@{k}']:6.1%}" for k in (1, 5, 10)))
        return "\n".join(lines)
    lines.append(f"  {'mode':<16} {'templates':>9} {'top1':>7} {'top5':>7} {'mean/class':>10}")
    rows = results.get("modes") or {"linear probe": results}
    for mode, r in rows.items():
        lines.append(f"  {mode:<16} {r.get('templates', '-')!s:>9} {r['top1']:7.1%} {r['top5']:7.1%} "
                     f"{r['mean_per_class']:10.1%}")
    if "probe" in results:
        p = results["probe"]
        lines.append(f"  best C {p['best_C']:.4g} (train {p['n_fit']} / val {p['n_val']} / test {p['n_test']})")
    present = _present_classes(results)
    if "modes" in results and len(present) <= 60:
        absent = len(results["classnames"]) - len(present)
        lines.append(f"  {'class':<24} {'single':>7} {'ensemble':>9}"
                     + (f"   ({absent} more classes in the label space, no images)" if absent else ""))
        for name in present:
            lines.append(f"  {name[:24]:<24} {results['modes']['single']['per_class'][name]:7.1%} "
                         f"{results['modes']['ensemble']['per_class'][name]:9.1%}")
    if "overlap" in results:
        o = results["overlap"]
        top, n = o["top1"], o["n"]
        diff = "-" if top["all_minus_clean"] is None else f"{100 * top['all_minus_clean']:+.1f} pp"
        lines.append("  data overlap (paper section 5): top1 on All / Clean / Overlap, All - Clean")
        lines.append(f"  n {n['all']} / {n['clean']} / {n['overlap']}: {_pct(top['all'])} / {_pct(top['clean'])} / "
                     f"{_pct(top['overlap'])}, {diff}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    return run_command("evaluate", EvalConfig, argv, lambda cfg, _: evaluate(cfg), doc=__doc__,
                       log_root=lambda c: c.output)
