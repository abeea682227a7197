"""The exported-model format: one directory with the fp32 state dict in OpenAI's key layout
(`model.pt`), the architecture and activation (`config.json`) and the tokenizer (`tokenizer.json`, our
ClipTokenizer's own format; `save_hf` writes Hugging Face's files).

`pipelines.train` writes it; `pipelines.evaluate` and the CLIP-score filter read it, or any other
checkpoint `clip_model.formats.load_checkpoint` knows (OpenAI's TorchScript, open_clip, Hugging Face).
A user can load `model.pt` alone with `from_openai_state_dict` (the architecture is inferred from shapes).

    python -m clip_model.export SRC DEST [--to export|hf] [--activation quick_gelu|gelu]

converts any checkpoint `load_checkpoint` reads into our export or a Hugging Face CLIPModel directory.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .formats import EXPORT_CONFIG_FILE as CONFIG_FILE
from .formats import EXPORT_MODEL_FILE as MODEL_FILE
from .formats import EXPORT_TOKENIZER_FILE as TOKENIZER_FILE
from .formats import load_checkpoint
from .hf import save_hf
from .model import CLIP

__all__ = ["CONFIG_FILE", "MODEL_FILE", "TOKENIZER_FILE", "load_export", "main", "save_export", "save_hf"]


def save_export(model: CLIP, directory: str, tokenizer=None, state_dict: dict | None = None) -> None:
    """`state_dict` overrides the model's own (e.g. a ZeRO-3 consolidated one gathered on rank 0)."""
    os.makedirs(directory, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    torch.save({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in sd.items()},
               os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, TOKENIZER_FILE))


def load_export(path: str, map_location: str = "cpu", activation: str | None = None):
    """Our export directory, or any checkpoint clip_model.formats.load_checkpoint reads (`activation` where the
    format does not record it). Returns (model in eval mode on CPU, tokenizer)."""
    del map_location  # kept for callers; checkpoints load on CPU (the caller moves the model)
    loaded = load_checkpoint(path, activation)
    return loaded.model, loaded.tokenizer


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_model.export", description="Convert any checkpoint clip_model.formats.load_checkpoint reads (our export, OpenAI's "
                                     "TorchScript .pt, open_clip files and directories, Hugging Face CLIPModel "
                                     "directories) into our export or a Hugging Face CLIPModel directory.")
    parser.add_argument("src", help="a checkpoint: our export, OpenAI .pt, open_clip file or dir, HF CLIPModel dir")
    parser.add_argument("dest", help="the directory to write")
    parser.add_argument("--to", choices=("export", "hf"), default="hf", help="our export or a HF CLIPModel dir")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                        help="required when SRC does not record it (bare state dicts, open_clip epoch_N.pt)")
    args = parser.parse_args(argv)
    try:
        loaded = load_checkpoint(args.src, args.activation)
        if args.to == "hf":
            save_hf(loaded.model, args.dest, loaded.tokenizer)
        else:
            save_export(loaded.model, args.dest, loaded.tokenizer)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.src} ({loaded.origin}, activation {loaded.activation}) -> {args.dest} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
