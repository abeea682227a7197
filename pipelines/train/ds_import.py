"""DeepSpeed, imported without the two costly imports training never uses.

- `import deepspeed` runs `deepspeed.autotuning.autotuner`, which tries `import mlflow` at module level and, when
  mlflow is installed (our `tracking` extra), pays ~1.2 s of CPU for it: a third of the whole DeepSpeed import,
  in every training worker and every restarted one. Training never uses the autotuner, and our MLflow sink
  imports mlflow itself when it is configured. So mlflow is hidden for the duration of DeepSpeed's import only;
  an mlflow already imported by the process is left as it is.
- `deepspeed.initialize` with ZeRO checks the optimizer against its supported list, and ZeRO-1/2 look for Muon
  on every gradient reduction: both import `deepspeed.runtime.zero.muon`, whose kernels are decorated with
  `torch.compile` at module level. Decorating is lazy in torch (nothing compiles before the first call), but it
  resolves the compiler backend, which imports TorchInductor: about 1,600 more modules and 2.6 s more CPU for a
  process that imports DeepSpeed, builds a ZeRO-2 engine and takes a step (5.7 against 8.4 s, mean of 6 rounds:
  benchmarks/bench_engine_start.py), in every worker that builds an engine. We import that module once here
  with `torch.compile` deferred to the first call of each decorated function, which is when torch compiles
  anyway; the backend is then imported only if a Muon kernel ever runs (our optimizer is AdamW).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, once per process; the first call hides mlflow from DeepSpeed's autotuner and imports
    DeepSpeed's Muon kernels without importing TorchInductor."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this entry is None
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", ...) is None:
            del sys.modules["mlflow"]
    _import_with_deferred_compile(_MUON)
    return deepspeed


def deferred_compile(compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for `torch.compile` (`compile_fn`) that, applied to a plain function, returns a wrapper calling
    `compile_fn(fn, **options)` on its first call and the compiled function from then on. Anything else (a
    module, a method object) goes to `compile_fn` at once."""

    def compile_later(model: Any = None, **options: Any) -> Any:
        if model is None:  # @torch.compile(...) with options: a decorator
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):
            return compile_fn(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile_later


def _import_with_deferred_compile(name: str) -> None:
    """Import module `name` (if this DeepSpeed has it) while `torch.compile` is `deferred_compile`."""
    import torch

    real = torch.compile
    torch.compile = deferred_compile(real)
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        torch.compile = real
