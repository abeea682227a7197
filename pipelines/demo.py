"""`make demo`: the paper end to end at laptop scale, on embedded services.

    python -m pipelines.demo [key=value ...]       e.g. storage=local  shapes=1200  workdir=demo_out

It starts a local SeaweedFS S3 server for the shards and checkpoints (storage=local skips it) and a
loopback web server of generated image-caption pairs (coloured shapes on backgrounds with varied
phrasings, plus scikit-learn's digits, plus planted duplicates, planted eval images and the hostile
cases a crawler meets), writes the URL list, and runs crawl -> filter -> dedup -> shard -> train ->
evaluate on held-out images, including colour-shape pairs never seen in training.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .config import load_config
from .local_web import LocalWebServer, WebContent
from .synthetic import digit_samples, encode, shape_classnames, shape_samples


@dataclass
class DemoConfig:
    # Where everything lands (URL list, eval sets, local stage outputs, the S3 server's data).
    workdir: str = "demo_out"
    # "s3": shards, checkpoints and the export on a local SeaweedFS server (the cluster path); "local": disk.
    storage: str = "s3"
    # Training images: coloured shapes (over the non-held-out colour-shape pairs) and digits (train split).
    shapes: int = 1200
    digits: bool = True
    # Planted copies that dedup must find: exact byte copies and re-encoded/resized near-duplicates.
    planted_duplicates: int = 120
    image_px: int = 64
    model: str = "tiny-vit"
    epochs: int = 6
    global_batch_size: int = 128
    lr: float = 2e-3
    num_workers: int = 2
    zero_stage: int = 2
    # Held-out evaluation images per shape class.
    eval_per_class: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.storage not in ("s3", "local"):
            raise ValueError(f"demo storage must be 's3' or 'local', got {self.storage!r}")


def _banner(text: str) -> None:
    print(f"\n{'=' * 100}\n== {text}\n{'=' * 100}", flush=True)


def _near_copy(image: bytes, rng: random.Random) -> bytes:
    """A resized, slightly cropped, re-encoded copy: what a re-upload looks like."""
    img = Image.open(io.BytesIO(image)).convert("RGB")
    w, h = img.size
    c = int(w * 0.04)
    img = img.crop((c, c, w - c, h - c)).resize((int(w * 1.5), int(h * 1.5)), Image.BICUBIC)
    return encode(img, "JPEG", quality=rng.choice([70, 80, 90]))


def build_web_content(cfg: DemoConfig, eval_dir: str) -> WebContent:
    rng = random.Random(cfg.seed)
    train = shape_samples(cfg.shapes, px=cfg.image_px, seed=cfg.seed)
    if cfg.digits:
        train += digit_samples("train", px=cfg.image_px, seed=cfg.seed)
    images, captions, queries = [s.image for s in train], [s.caption for s in train], [s.label for s in train]
    for i in rng.sample(range(len(train)), min(cfg.planted_duplicates, len(train))):
        exact = i % 2 == 0
        images.append(train[i].image if exact else _near_copy(train[i].image, rng))
        captions.append(train[i].caption if exact else f"{train[i].caption} (reposted)")
        queries.append(train[i].label)
    # Held-out eval sets, written as ImageFolders: shapes (seen and never-seen colour-shape pairs) and digits.
    held = shape_samples(cfg.eval_per_class * len(shape_classnames(True)), px=cfg.image_px, seed=cfg.seed + 1,
                         held_out=True)
    seen = shape_samples(cfg.eval_per_class * 8, px=cfg.image_px, seed=cfg.seed + 2)
    digits_test = digit_samples("test", px=cfg.image_px, seed=cfg.seed + 3)
    sets = {"shapes_unseen_pairs": held, "shapes_seen_pairs": seen, "digits": digits_test}
    for name, samples in sets.items():
        for j, s in enumerate(samples):
            d = os.path.join(eval_dir, name, s.label.replace(" ", "_"))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{j:05d}.jpg"), "wb") as f:
                f.write(s.image)
    # Contamination the dedup stage must remove (paper section 5): a few eval digits crawled as training data.
    for s in digits_test[:15]:
        images.append(s.image)
        captions.append(f"a scan of a handwritten {s.label}")
        queries.append(s.label)
    return WebContent(images, captions, queries)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(DemoConfig, None, argv)
    started = time.time()
    work = os.path.abspath(cfg.workdir)
    os.makedirs(work, exist_ok=True)
    s3 = None
    if cfg.storage == "s3":
        from .local_s3 import LocalS3

        s3 = LocalS3(os.path.join(work, "s3"), bucket="clip-demo", access_key="demo-key", secret_key="demo-secret")
        s3.start()
        # The demo's own server's keys, for this process and the Ray workers it starts (never logged).
        os.environ.update(s3.env())
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        print(f"demo: SeaweedFS S3 at {s3.endpoint_url}, bucket clip-demo", flush=True)
    try:
        _run(cfg, work, s3, started)
    finally:
        if s3 is not None:
            s3.stop()


def _run(cfg: DemoConfig, work: str, s3, started: float) -> None:
    from .crawl import CrawlConfig, run as crawl
    from .dedup import DedupStageConfig, run as dedup
    from .filter import FilterStageConfig, run as filter_
    from .shard import ShardConfig, run as shard
    from .train import TrainConfig, run_training

    _banner("generating the web: shapes x colours x sizes x backgrounds, digits, duplicates, hostile cases")
    content = build_web_content(cfg, os.path.join(work, "eval"))
    remote = s3.uri("run") if s3 else os.path.join(work, "stages")
    s3_opts = [f"endpoint_url={s3.endpoint_url}"] if s3 else []

    def s3_args(*prefixes: str) -> list[str]:
        return [f"{p}.{o}" for p in prefixes for o in s3_opts]

    with LocalWebServer(content) as web:
        url_list = os.path.join(work, "urls.parquet")
        pq.write_table(pa.Table.from_pylist(web.url_list(hostile=True)), url_list)
        print(f"demo: {len(content.images)} images served at {web.base_url}; URL list {url_list}", flush=True)
        _banner("1/6 crawl")
        crawl(load_config(CrawlConfig, None, [
            f"input.paths=[{url_list}]", "input.query_col=query", f"output.path={remote}/crawl",
            "fetch.allow_networks=[127.0.0.1/32]", "fetch.deadline_s=2", "fetch.max_retries=1",
            "fetch.max_bytes=2000000", f"image.image_size={cfg.image_px}", "image.resize_mode=center_crop",
            "rows_per_part=1000", *s3_args("output.s3")]))
    _banner("2/6 filter")
    filter_(load_config(FilterStageConfig, None, [
        f"input={remote}/crawl", f"output.path={remote}/filter", "rules.max_per_query=400",
        *s3_args("input_s3", "output.s3")]))
    _banner("3/6 dedup + eval decontamination")
    dedup(load_config(DedupStageConfig, None, [
        f"input={remote}/filter", f"output.path={remote}/dedup",
        # phash sees 32x32 grey levels: the synthetic shapes differ mostly by colour and position, and
        # at the default radius of 8 bits distinct shapes (a red vs an orange triangle) merge. The demo
        # uses tight radii; planted copies are still found, and decontamination runs on the digits.
        "dedup.hamming_threshold=3", "dedup.eval_hamming=2",
        f"eval_sets=[{{name: digits, dataset: 'imagefolder:{work}/eval/digits'}}]",
        *s3_args("input_s3", "output.s3")]))
    _banner("4/6 shard")
    shard(load_config(ShardConfig, None, [
        f"input={remote}/dedup", f"output.path={remote}/shards", "rows_per_shard=1000", "row_group_size=128",
        *s3_args("input_s3", "output.s3")]))
    _banner("5/6 train (Ray Train + DeepSpeed ZeRO, 2 CPU workers)")
    summary = run_training(load_config(TrainConfig, "configs/train_tiny.yaml", [
        f"model={cfg.model}", f"data.manifest={remote}/shards", f"storage_path={remote}/runs", "run_name=demo",
        f"epochs={cfg.epochs}", f"global_batch_size={cfg.global_batch_size}", f"optim.lr={cfg.lr}",
        f"num_workers={cfg.num_workers}", f"zero_stage={cfg.zero_stage}", "checkpoint_every=50",
        *s3_args("s3", "data.s3")]))
    print(json.dumps(summary, indent=2), flush=True)
    _banner("6/6 evaluate: zero-shot on held-out images, one template against the ensemble")
    results = evaluate_demo(work, remote, summary["export"], s3)
    _banner("summary")
    print(f"training: {summary.get('steps')} steps, loss {summary.get('first_loss')} -> {summary.get('final_loss')}")
    print(f"exported model: {summary['export']}")
    print(f"{'eval set':<22} {'single template top1':>22} {'ensemble top1':>15} {'ensemble top5':>15}")
    for name, r in results.items():
        print(f"{name:<22} {r['single_top1']:>22.1%} {r['top1']:>15.1%} {r['top5']:>15.1%}")
    with open(os.path.join(work, "demo_results.json"), "w") as f:
        json.dump({"train": summary, "eval": results}, f, indent=2)
    print(f"\nresults and plots under {work}/eval_results; demo finished in {time.time() - started:.0f} s", flush=True)


# Prompt ensembles for the demo's label spaces (the paper's "a photo of a {}." is the single template).
SHAPE_TEMPLATES = ["a photo of a {}.", "a {} on a white background", "an image of a {}", "a drawing of a {}",
                   "a small {}.", "a large {}."]
DIGIT_TEMPLATES = ["a photo of the number {}.", "the digit {}", "a handwritten {}", "a scanned image of the number {}"]


def evaluate_demo(work: str, remote: str, export: str, s3) -> dict:
    from .evaluate import EvalConfig, evaluate

    out = {}
    for name, templates in (("shapes_unseen_pairs", SHAPE_TEMPLATES), ("shapes_seen_pairs", SHAPE_TEMPLATES),
                            ("digits", DIGIT_TEMPLATES)):
        tfile = os.path.join(work, f"templates_{name}.json")
        with open(tfile, "w") as f:
            json.dump(templates, f)
        extra = [f"s3.endpoint_url={s3.endpoint_url}"] if s3 else []
        row = {}
        for mode, spec in (("single", "simple"), ("ensemble", tfile)):
            r = evaluate(load_config(EvalConfig, None, [
                f"checkpoint={export}", f"dataset=imagefolder:{work}/eval/{name}", f"templates={spec}",
                f"output={work}/eval_results/{name}/{mode}", *extra]))
            row[mode] = r
        out[name] = {"single_top1": row["single"]["top1"], "top1": row["ensemble"]["top1"],
                     "top5": row["ensemble"]["top5"], "n": row["ensemble"].get("n")}
    return out


if __name__ == "__main__":
    main()
