"""`make demo`: the paper end to end at laptop scale, on embedded services.

    python -m pipelines.demo [--config FILE] [key=value ...]   e.g. storage=local shapes=2000 train.epochs=10

(keys of DemoConfig below; any other key overrides the run config, configs/demo.yaml)

It starts a local SeaweedFS S3 server for the shards and checkpoints (storage=local skips it) and a
loopback web server of generated image-caption pairs (coloured shapes on backgrounds with varied
phrasings, plus scikit-learn's digits, plus planted duplicates, planted eval images and the hostile
cases a crawler meets), writes the URL list, and runs crawl -> filter -> dedup -> curate -> shard -> train ->
evaluate on held-out images, including colour-shape pairs never seen in training.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.core.cli import dump_yaml, run_command
from pipelines.core.config import ConfigError, did_you_mean, load_config, to_dict
from pipelines.demo.local_web import LocalWebServer, WebContent
from pipelines.demo.synthetic import digit_samples, encode, shape_classnames, shape_samples
from pipelines.demo.views import View, label_columns, views


@dataclass
class DemoConfig:
    # Where everything lands (URL list, eval sets, local stage outputs, the S3 server's data, the report).
    workdir: str = "demo_out"
    # "s3": shards, checkpoints and the export on a local SeaweedFS server (the cluster path); "local": disk.
    storage: Literal["s3", "local"] = "s3"
    # Training images: coloured shapes (over the non-held-out colour-shape pairs) and digits (train split).
    shapes: int = 4000
    digits: bool = True
    # Planted copies that dedup must find: exact byte copies and re-encoded/resized near-duplicates.
    planted_duplicates: int = 120
    image_px: int = 64
    # The web server's port. Fixed, so a rerun writes the same URL list and reuses every finished stage
    # (change a train key and only train and evaluate run again); 0 takes any free port.
    web_port: int = 18573
    # Held-out evaluation images per seen colour-shape pair (twice as many per never-seen pair).
    eval_per_class: int = 10
    seed: int = 0
    # The run config (stage settings); keys not of this class (train.epochs=10, ...) override it.
    run_config: str = "configs/demo.yaml"

    def __post_init__(self) -> None:
        if self.storage not in ("s3", "local"):
            raise ValueError(f"demo storage must be 's3' or 'local', got {self.storage!r}")


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


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
    # Held-out eval sets. Shapes: Parquet sets with a pair, a shape and a colour label per image (the views of
    # pipelines/demo/views.py score each in its own label space; a never-seen pair such as a red triangle must
    # beat every seen neighbour, "red square" and "orange triangle"). Digits: an ImageFolder (also the set
    # dedup decontaminates against).
    names = shape_classnames()
    held = shape_samples(2 * cfg.eval_per_class * len(shape_classnames(True)), px=cfg.image_px,
                         seed=cfg.seed + 1, held_out=True)
    seen = shape_samples(cfg.eval_per_class * (len(names) - len(shape_classnames(True))), px=cfg.image_px,
                         seed=cfg.seed + 2)
    os.makedirs(eval_dir, exist_ok=True)
    for name, samples in (("unseen", held), ("seen", seen)):
        labels = label_columns(samples)
        pq.write_table(pa.table({"image": pa.array([s.image for s in samples], pa.binary()),
                                 **{c: pa.array(v, pa.int64()) for c, v in labels.items()}}),
                       os.path.join(eval_dir, f"shapes_{name}.parquet"))
    digits_test = digit_samples("test", px=cfg.image_px, seed=cfg.seed + 3)
    for j, s in enumerate(digits_test):
        d = os.path.join(eval_dir, "digits", s.label)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{j:05d}.jpg"), "wb") as f:
            f.write(s.image)
    # Contamination the dedup stage must remove (paper section 5): a few eval digits crawled as training data.
    for s in digits_test[:15]:
        images.append(s.image)
        captions.append(f"a scan of a handwritten {s.label}")
        queries.append(s.label)
    return WebContent(images, captions, queries)


def _eval_job(view: View, work: str) -> str:
    """One evaluate job (flow YAML) for a view: its image set, label column, class names and prompts."""
    dataset = (f"imagefolder:{work}/eval/digits" if view.images == "digits"
               else f"parquet:{work}/eval/shapes_{view.images}.parquet")
    files = {}
    # An ImageFolder's labels follow its sorted folder names, which are the class names: no list to pass.
    named = [] if view.images == "digits" else [("classnames", list(view.classnames))]
    for key, value in [("templates", list(view.templates)), *named]:
        files[key] = os.path.join(work, "eval", f"{key}_{view.name}.json")
        with open(files[key], "w") as f:
            json.dump(value, f)
    classnames = f", classnames: '{files['classnames']}'" if "classnames" in files else ""
    return (f"{{name: {view.name}, dataset: '{dataset}', label_col: {view.label_col}, templates: '{files['templates']}'"
            f"{classnames}, single_template: '{view.templates[0]}'}}")


def _web_server(content: WebContent, port: int) -> LocalWebServer:
    try:
        return LocalWebServer(content, port=port)
    except OSError as e:
        print(f"demo: web_port {port} is not free ({e.strerror}); serving on a free port instead, so this run's "
              f"URL list differs from earlier runs' and the crawl and everything after it run again", flush=True)
        return LocalWebServer(content, port=0)


def _write_if_changed(path: str, table: pa.Table) -> None:
    """Write the URL list only when its bytes change: the crawl's fingerprint includes its modification time."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    data = buf.getvalue().to_pybytes()
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    with open(path, "wb") as f:
        f.write(data)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """key=value pairs for DemoConfig, and the rest for the run config (train.epochs=10, ...)."""
    own = {f.name for f in dataclasses.fields(DemoConfig)}
    demo = [a for a in argv if a.partition("=")[0].split(".")[0] in own]
    return demo, [a for a in argv if a not in demo]


@dataclass
class DemoArgs:
    """The demo's own config and the keys it passes on to the run config."""

    demo: DemoConfig
    run_args: list[str]


def load_demo_args(path: str | None, overrides: list[str]) -> DemoArgs:
    """DemoConfig from the file and its own keys; every other key must be a run-config key, and the run config
    with them must load (checked here, before any server starts)."""
    from pipelines.run.dag import RunConfig, load_run_config

    demo_args, run_args = split_args(overrides)
    cfg = load_config(DemoConfig, path, demo_args)
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    for arg in run_args:
        key = arg.partition("=")[0].strip()
        if key and key.split(".")[0] not in run_fields:
            guess = did_you_mean(key, DemoConfig) or did_you_mean(key, RunConfig)
            raise ConfigError(f"unknown key {key}" + (f" (did you mean {guess}?)" if guess else "")
                              + f": neither a demo key ({', '.join(sorted(f.name for f in dataclasses.fields(DemoConfig)))})"
                              f" nor a run-config section ({', '.join(sorted(run_fields))})")
    load_run_config(cfg.run_config, run_args)
    return DemoArgs(cfg, run_args)


def _printable(args: DemoArgs) -> str:
    text = dump_yaml(to_dict(args.demo))
    if args.run_args:
        text += f"# passed on to the run config {args.demo.run_config} (command line only):\n"
        text += "".join(f"#   {a}\n" for a in args.run_args)
    return text


def main(argv: list[str] | None = None) -> int:
    return run_command(
        "demo", DemoConfig, argv, lambda a, _: _demo(a.demo, a.run_args), doc=__doc__, load=load_demo_args,
        printable=_printable, log_root=lambda a: a.demo.workdir, status=False,
        keys_note="Any other key (train.epochs=10, dedup.dedup.hamming_threshold=2, ...) overrides the run config "
                  "(run_config): python -m pipelines.run --help lists those keys.")


def _demo(cfg: DemoConfig, run_args: list[str]) -> None:
    started = time.time()
    work = os.path.abspath(cfg.workdir)
    os.makedirs(work, exist_ok=True)
    s3 = None
    if cfg.storage == "s3":
        from pipelines.demo.local_s3 import LocalS3

        s3 = LocalS3(os.path.join(work, "s3"), bucket="clip-demo", access_key="demo-key", secret_key="demo-secret")
        s3.start()
        # The demo's own server's keys, for this process and the Ray workers it starts (never logged).
        os.environ.update(s3.env())
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        print(f"demo: SeaweedFS S3 at {s3.endpoint_url}, bucket clip-demo", flush=True)
    try:
        _run(cfg, run_args, work, s3, started)
    finally:
        if s3 is not None:
            s3.stop()


def _run(cfg: DemoConfig, run_args: list[str], work: str, s3, started: float) -> None:
    from pipelines.run.dag import Selection, load_run_config, run_pipeline

    _banner("generating the web: shapes x colours x sizes x backgrounds, digits, duplicates, hostile cases")
    content = build_web_content(cfg, os.path.join(work, "eval"))
    root = s3.uri("run") if s3 else os.path.join(work, "stages")
    jobs = [_eval_job(v, work) for v in views()]
    with _web_server(content, cfg.web_port) as web:
        url_list = os.path.join(work, "urls.parquet")
        _write_if_changed(url_list, pa.Table.from_pylist(web.url_list(hostile=True)))
        print(f"demo: {len(content.images)} images served at {web.base_url}; URL list {url_list}", flush=True)
        overrides = [
            f"root={root}", f"crawl.input.paths=[{url_list}]", f"report.path={work}/report.html",
            f"dedup.eval_sets=[{{name: digits, dataset: 'imagefolder:{work}/eval/digits'}}]",
            f"evaluate=[{', '.join(jobs)}]",
            *([f"s3.endpoint_url={s3.endpoint_url}"] if s3 else []),
            *run_args,
        ]
        run_cfg = load_run_config(cfg.run_config, overrides)
        # The web is only needed by the crawl, but a rerun may crawl again: keep it up for the whole run.
        out = run_pipeline(run_cfg, Selection(), command="python -m pipelines.demo " + " ".join(run_args))
    _banner("summary")
    train = out["results"].get("train") or {}
    if train:
        print(f"training: {train.get('steps')} steps, loss {train.get('first_loss'):.3f} -> "
              f"{train.get('final_loss'):.3f}, {train.get('driver_wall_s')} s")
    else:
        print("training: reused from an earlier run (its curves are in the report)")
    train_dir = out["dirs"]["train"]
    print(f"exported model: {train_dir}/export")
    evaluated = {}
    from pipelines.core.storage import Storage

    ev = Storage.from_uri(out["dirs"]["evaluate"], run_cfg.s3)
    print(f"{'view':<22} {'classes':>8} {'images':>7} {'single template top1':>22} {'ensemble top1':>15} "
          f"{'ensemble top5':>15}")
    for job in run_cfg.evaluate:
        r = json.loads(ev.read_bytes(f"{job.name}/results.json"))
        row = {"n": r["n"], "classes": len(r["classnames"]), "single_top1": r["modes"]["single"]["top1"],
               "top1": r["modes"]["ensemble"]["top1"], "top5": r["modes"]["ensemble"]["top5"],
               "chance": 1 / len(r["classnames"])}
        evaluated[job.name] = row
        print(f"{job.name:<22} {row['classes']:>8} {row['n']:>7} {row['single_top1']:>22.1%} {row['top1']:>15.1%} "
              f"{row['top5']:>15.1%}")
    with open(os.path.join(work, "demo_results.json"), "w") as f:
        json.dump({"train": train, "eval": evaluated, "dirs": out["dirs"], "wall_s": time.time() - started}, f,
                  indent=2)
    print(f"\nreport: {work}/report.html (also {out['report']}); demo finished in {time.time() - started:.0f} s",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
