"""CLIP in plain PyTorch (no Ray): model, tokenizer, losses, transforms, zero-shot helpers.

The names below load with their module on first use, so `clip_model.tokenizer` and `clip_model.transforms`
import without torch (a data loader that tokenizes and crops needs neither the model nor torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipConfig": "config", "TextConfig": "config", "VisionConfig": "config", "get_config": "config",
    "model_names": "config",
    "ClipLoss": "loss", "SigLipLoss": "loss", "build_loss": "loss", "gather_features": "loss",
    "ClipTokenizer": "tokenizer",
    "CLIP": "model", "build_model": "model", "config_from_openai_state_dict": "model", "count_parameters": "model",
    "from_openai_state_dict": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
