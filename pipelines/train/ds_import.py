"""DeepSpeed, imported without the MLflow import its autotuner makes.

`import deepspeed` runs `deepspeed.autotuning.autotuner`, which tries `import mlflow` at module level and, when
mlflow is installed (our `tracking` extra), pays ~1.2 s of CPU for it: a third of the whole DeepSpeed import,
in every training worker and every restarted one. Training never uses the autotuner, and our MLflow sink
imports mlflow itself when it is configured. So mlflow is hidden for the duration of DeepSpeed's import only;
an mlflow already imported by the process is left as it is.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, once per process; the first call hides mlflow from DeepSpeed's autotuner."""
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
    return deepspeed
