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


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
          eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where the parameters' device has one (CPU, CUDA).

    The fused kernel makes one pass over each tensor instead of about ten: a ViT-B/32 update on one CPU
    thread took 0.37 s per-tensor and 0.10 s fused. Over DeepSpeed ZeRO's flat 150M-element partition the
    per-op passes stream from memory instead of cache: the AdamW update alone took 0.86 s, and DeepSpeed's
    whole step went from 1.30 s to 0.63 s with the fused kernel. Results
    match the unfused update to float rounding, not bit for bit, so everything that compares runs (the
    training loop, its tests' single-process reference, the benchmarks' bare loop) builds it here."""
    devices = {p.device.type for p in model.parameters() if p.requires_grad}
    fused = devices <= {"cpu", "cuda"} or None
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


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
