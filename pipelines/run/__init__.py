"""The DAG runner and its report. See dag.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["Selection", "load_run_config", "main", "run_pipeline"]
__getattr__ = lazy_exports(__name__, "pipelines.run.dag", __all__)
