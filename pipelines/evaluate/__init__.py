"""Stage 6, evaluate: zero-shot, linear probe, retrieval, overlap. See stage.py."""

from pipelines.evaluate.stage import TASKS, EvalConfig, evaluate, main

__all__ = ["TASKS", "EvalConfig", "evaluate", "main"]
