"""The DAG runner and its report. See dag.py."""

from pipelines.run.dag import Selection, load_run_config, main, run_pipeline

__all__ = ["Selection", "load_run_config", "main", "run_pipeline"]
