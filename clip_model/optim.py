"""AdamW parameter groups as in the paper, and the logit-scale clamp."""

from __future__ import annotations

import torch
from torch import nn

from .model import LOGIT_SCALE_MAX


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Gains and biases (every 1-d tensor: LayerNorm/BatchNorm weights, biases, class embedding) and
    # the temperature are not decayed; matrices and embedding tables are (open_clip's rule).
    return param.ndim < 2 or name.endswith("logit_scale") or name.endswith("logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decoupled weight decay on weights, none on gains, biases and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def param_group_names(model: nn.Module) -> dict[str, list[str]]:
    """Which parameter names land in which group (for logs and tests)."""
    out: dict[str, list[str]] = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out["no_decay" if _no_decay(name, p) else "decay"].append(name)
    return out


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module) -> None:
    """Keep exp(logit_scale) <= 100 after each optimizer step (the paper's clip)."""
    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
