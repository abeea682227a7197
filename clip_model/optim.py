"""AdamW parameter groups as in the paper, and the logit-scale clamp."""

from __future__ import annotations

import inspect
import sys
from typing import Any

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
    return AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose bookkeeping does not import TorchDynamo in a process that has not imported it.

    torch wraps `Optimizer.step` (a graph break and a grad-mode switch), `add_param_group`, `zero_grad`,
    `state_dict` and `load_state_dict` (`torch._disable_dynamo`) in wrappers that import `torch._dynamo` on
    their first call: 800 more modules in every training worker (the optimizer is built as the worker starts,
    also after each elastic resize), when nothing compiles. A fresh process that imports DeepSpeed, builds a
    ZeRO-2 engine and steps once took 7.3 CPU s with this class, 12.6 with torch's AdamW, on 2 cores
    (benchmarks/bench_engine_start.py, 6 rounds).

    Those wrappers matter only while Dynamo traces, which needs Dynamo imported: so while it is not, these methods
    call torch's own functions under them (the step under `torch.no_grad()`, as torch's wrapper does); once
    anything has imported Dynamo, they are torch's methods unchanged. Step hooks and the profiler's step record
    still run (`Optimizer._patch_step_function` wraps this class's `step`). The update is torch's fused or
    per-tensor AdamW."""

    def step(self, closure: Any = None) -> Any:
        if _dynamo_loaded() or self.defaults["differentiable"]:
            # torch's step under its own wrapper; not super().step: once a plain torch AdamW exists, its class's
            # step is wrapped by the step-hook runner too, which would run this optimizer's hooks a second time.
            return _unhooked(torch.optim.AdamW.step)(self, closure)
        with torch.no_grad():
            return _TORCH_STEP(self, closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if _dynamo_loaded():
            return super().add_param_group(param_group)
        return _TORCH_ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if _dynamo_loaded():
            return super().zero_grad(set_to_none)
        return _TORCH_ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if _dynamo_loaded():
            return super().state_dict()
        return _TORCH_STATE_DICT(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _dynamo_loaded():
            return super().load_state_dict(state_dict)
        return _TORCH_LOAD_STATE_DICT(self, state_dict)


def _unhooked(step: Any) -> Any:
    """`step` without the step-hook runners that `Optimizer._patch_step_function` wrapped around it (marked `hooked`)."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


def _torch_function(method: Any, defined_in: str) -> Any:
    """The function under torch's wrappers of an optimizer method (they keep it as `__wrapped__`); checked to be
    torch's own `defined_in.name`, so a torch that wraps differently fails here, at import, not mid-training."""
    fn = inspect.unwrap(method)
    want = f"{defined_in}.{method.__name__}"
    if fn.__qualname__ != want or not fn.__module__.startswith("torch.optim."):
        raise ImportError(f"clip_model.optim: torch {torch.__version__}'s {want} is not where this module expects it")
    return fn


_TORCH_STEP = _torch_function(torch.optim.Adam.step, "Adam")
_TORCH_ADD_PARAM_GROUP = _torch_function(torch.optim.Optimizer.add_param_group, "Optimizer")
_TORCH_ZERO_GRAD = _torch_function(torch.optim.Optimizer.zero_grad, "Optimizer")
_TORCH_STATE_DICT = _torch_function(torch.optim.Optimizer.state_dict, "Optimizer")
_TORCH_LOAD_STATE_DICT = _torch_function(torch.optim.Optimizer.load_state_dict, "Optimizer")


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
