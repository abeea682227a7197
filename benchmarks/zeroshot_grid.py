"""A one-process stand-in for the demo's training, to search the recipe of issue 16 quickly.

    python -m benchmarks.zeroshot_grid --name base                      # the demo's recipe today
    python -m benchmarks.zeroshot_grid --name w16 --vision-width 16     # one change at a time
    python -m benchmarks.zeroshot_grid --report                         # the table of every run so far

Same data generator, model table, loss, optimiser groups, schedule and evaluation templates as
`make demo`, without Ray, DeepSpeed, the crawl or dedup (so it trains on every generated row, where
the demo trains on the ~3,700 rows dedup keeps). Each run appends (settings, the zero-shot views,
seconds) to benchmarks/out/zeroshot_grid.jsonl. The views are those the demo reports:
pair names (36-way) on never-seen and seen pairs, shape-only and colour-only prompts on never-seen
pairs, and digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from clip_model import build_loss, build_model
from clip_model.config import get_config
from clip_model.optim import adamw, clamp_logit_scale_
from clip_model.transforms import EvalTransform, drop_words
from clip_model.zeroshot import build_classifier
from pipelines.demo.synthetic import digit_samples, shape_classnames, shape_samples
from pipelines.demo.views import label_columns, views
from pipelines.train.data import load_tokenizer
from pipelines.train.loop import warmup_cosine

OUT = os.path.join(os.path.dirname(__file__), "out", "zeroshot_grid.jsonl")


def _decode(images: list[bytes], size: int) -> torch.Tensor:
    t = EvalTransform(size)
    return torch.stack([t(b) for b in images])


def _random_crops(x: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Random square crops covering `scale` of the area, resized back (bilinear; the pipeline uses PIL)."""
    if scale == (1.0, 1.0):
        return x
    b = x.shape[0]
    s = torch.sqrt(torch.empty(b).uniform_(*scale, generator=gen))  # side fraction
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - s)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - s)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, cx, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_gray(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Replace a fraction p of the (normalised) images by their luma, normalised back."""
    if p <= 0:
        return x
    from clip_model.transforms import OPENAI_MEAN, OPENAI_STD

    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    rgb = x * std + mean
    luma = (0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]).expand_as(rgb)
    pick = (torch.rand(x.shape[0], generator=gen) < p).view(-1, 1, 1, 1)
    return torch.where(pick, (luma - mean) / std, x)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    px = args.image_px
    train = shape_samples(args.shapes, px=px, seed=0)
    if args.digits:
        train += digit_samples("train", px=px, seed=0)
    vision = get_config(args.model).vision
    changes = {"width": args.vision_width or None, "image_size": args.model_px or None,
               "layers": tuple(int(v) for v in args.vision_layers.split(",")) if args.vision_layers else None}
    overrides: dict = {"vision": dataclasses.replace(vision, **{k: v for k, v in changes.items() if v is not None})}
    cfg = get_config(args.model, **overrides)
    model = build_model(cfg)
    tok = load_tokenizer()
    ctx = cfg.text.context_length
    images = _decode([s.image for s in train], cfg.vision.image_size)
    captions = [s.caption for s in train]
    n = len(train)
    steps_per_epoch = n // args.batch
    total = steps_per_epoch * args.epochs
    opt = adamw(model, args.lr, args.wd, (0.9, 0.98), 1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup, total, 0.0))
    loss_fn = build_loss(args.loss)
    t0 = time.time()
    losses = []
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x = _random_gray(_random_crops(images[idx], tuple(args.crop_scale), gen), args.gray, gen)
            caps = [drop_words(captions[j], args.word_dropout, rng) for j in idx.tolist()]
            tokens = tok(caps, context_length=ctx)
            img, txt, scale = model(x, tokens)
            loss = loss_fn(img, txt, scale, model.logit_bias)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            clamp_logit_scale_(model)
            losses.append(float(loss.detach()))
    train_s = time.time() - t0
    views = evaluate(model, tok, ctx, cfg.vision.image_size, px)
    return {"name": args.name, "settings": {k: v for k, v in vars(args).items() if k not in ("name", "report")},
            "steps": total, "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])),
            "train_s": round(train_s, 1), "views": views}


@torch.no_grad()
def evaluate(model, tok, ctx: int, size: int, px: int) -> dict:
    """The demo's views (pipelines.demo.views) on freshly generated held-out images."""
    model.eval()
    n_eval = 10
    held = shape_samples(2 * n_eval * len(shape_classnames(True)), px=px, seed=1, held_out=True)
    seen = shape_samples(n_eval * (len(shape_classnames()) - len(shape_classnames(True))), px=px, seed=2)
    digits = digit_samples("test", px=px, seed=3)
    sets = {"unseen": held, "seen": seen, "digits": digits}
    feats = {k: F.normalize(model.encode_image(_decode([s.image for s in v], size)), dim=-1) for k, v in sets.items()}
    out = {}
    for job in views():
        labels = torch.tensor(label_columns(sets[job.images])[job.label_col])
        res = {}
        for mode, templates in (("single", job.templates[:1]), ("ensemble", job.templates)):
            w = build_classifier(model.encode_text, lambda t: tok(t, context_length=ctx), job.classnames, templates)
            res[mode] = round(float(((feats[job.images] @ w).argmax(1) == labels).float().mean()), 4)
        out[job.name] = res
    return out


def report() -> None:
    """Every run so far as a Markdown table (docs/experiments.md): single / ensemble top-1 per view."""
    rows = [json.loads(line) for line in open(OUT)] if os.path.exists(OUT) else []
    if not rows:
        return
    names = list(rows[0]["views"])
    print("| run | steps | " + " | ".join(names) + " | train s |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['views'][k]['single']:.0%} / {r['views'][k]['ensemble']:.0%}" for k in names)
        print(f"| {r['name']} | {r['steps']} | {cells} | {r['train_s']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="run")
    p.add_argument("--report", action="store_true")
    p.add_argument("--model", default="demo-rn")
    p.add_argument("--vision-width", type=int, default=0)
    p.add_argument("--vision-layers", default="")
    p.add_argument("--embed-dim", type=int, default=0)
    p.add_argument("--model-px", type=int, default=0)
    p.add_argument("--image-px", type=int, default=64)
    p.add_argument("--shapes", type=int, default=4000)
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0))
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--word-dropout", type=float, default=0.0)
    p.add_argument("--gray", type=float, default=0.0, help="random grayscale probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.report:
        return report()
    torch.set_num_threads(args.threads)
    r = run(args)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps({k: r[k] for k in ("name", "steps", "final_loss", "train_s")}), json.dumps(r["views"]))


if __name__ == "__main__":
    main()
