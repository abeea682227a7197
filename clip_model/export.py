"""The exported-model format: one directory with the fp32 state dict in OpenAI's key layout
(`model.pt`), the architecture (`config.json`) and the tokenizer (`tokenizer.json`).

`pipelines.train` writes it, `pipelines.evaluate` and the CLIP-score filter read it, and a user can
load `model.pt` alone with `from_openai_state_dict` (the architecture is inferred from shapes).
"""

from __future__ import annotations

import json
import os

import torch

from .config import ClipConfig
from .model import CLIP, from_openai_state_dict

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


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


def load_export(path: str, map_location: str = "cpu"):
    """A directory written by save_export, or a bare OpenAI-layout state dict file.

    Returns (model in eval mode, tokenizer). Without a tokenizer file, OpenAI's BPE is used.
    """
    from .tokenizer import ClipTokenizer

    if os.path.isdir(path):
        model_path = os.path.join(path, MODEL_FILE)
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"exported model directory {path} has no {MODEL_FILE}")
        cfg_path = os.path.join(path, CONFIG_FILE)
        config = None
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = ClipConfig.from_dict(json.load(f))
        tok_path = os.path.join(path, TOKENIZER_FILE)
        tokenizer = ClipTokenizer.load(tok_path) if os.path.exists(tok_path) else ClipTokenizer.from_openai_bpe()
    else:
        model_path, config, tokenizer = path, None, ClipTokenizer.from_openai_bpe()
    sd = torch.load(model_path, map_location=map_location, weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    model = from_openai_state_dict(sd, config=config).eval()
    return model, tokenizer
