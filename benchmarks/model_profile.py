"""Parameter counts and forward FLOPs per image-text pair for every named config.

FLOPs are counted by torch's FlopCounterMode on a real forward (one multiply-add = 2 FLOPs), with
attention forced onto SDPA's math path: the fused CPU kernel is not registered with the counter and its
QK^T and AV products would go uncounted. open_clip's published figures (docs/model_profile.csv) use the
same 2-per-MAC convention, so the columns compare directly.

Run: .venv/bin/python -m benchmarks.model_profile [--names ViT-B/32,RN50] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clip_model import build_model, count_parameters, get_config

PAPER_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
# Copied from open_clip docs/model_profile.csv (mparams; gflops = image + text at batch 1).
OPEN_CLIP = {
    "RN50": (102.01, 18.18), "RN101": (119.69, 25.5), "RN50x4": (178.3, 51.82), "RN50x16": (290.98, 162.69),
    "RN50x64": (623.26, 552.65), "ViT-B/32": (151.28, 14.78), "ViT-B/16": (149.62, 41.09),
    "ViT-L/14": (427.62, 175.33), "ViT-L/14@336px": (427.94, 395.22),
}


def _flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*args)
    return counter.get_total_flops()


def profile(name: str) -> dict:
    cfg = get_config(name)
    model = build_model(cfg).eval()
    image = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    text = torch.randint(0, cfg.text.vocab_size, (1, cfg.text.context_length))
    img_flops = _flops(model.encode_image, image)
    txt_flops = _flops(model.encode_text, text)
    return {
        "name": name,
        "params_m": round(count_parameters(model) / 1e6, 2),
        "image_params_m": round(count_parameters(model.visual) / 1e6, 2),
        "image_gflops": round(img_flops / 1e9, 2),
        "text_gflops": round(txt_flops / 1e9, 2),
        "gflops_2x_mac": round((img_flops + txt_flops) / 1e9, 2),
        "gmacs": round((img_flops + txt_flops) / 2e9, 2),
        "open_clip_params_m": OPEN_CLIP.get(name, (None, None))[0],
        "open_clip_gflops": OPEN_CLIP.get(name, (None, None))[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default=",".join(PAPER_NAMES))
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    rows = [profile(n) for n in args.names.split(",")]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_profile.json"), "w") as f:
        json.dump(rows, f, indent=2)
    header = "| model | params (M) | open_clip params (M) | GFLOPs | GMACs | open_clip GFLOPs |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params_m']} | {r['open_clip_params_m']} | {r['gflops_2x_mac']} | "
                     f"{r['gmacs']} | {r['open_clip_gflops']} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "model_profile.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
