"""Stage 6, evaluate: zero-shot, linear probe, retrieval, overlap. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["TASKS", "EvalConfig", "evaluate", "main"]
__getattr__ = lazy_exports(__name__, "pipelines.evaluate.stage", __all__)
