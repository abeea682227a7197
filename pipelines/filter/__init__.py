"""Stage 2, filter: caption and image rules, language id, per-query cap, CLIP score. See stage.py."""

from pipelines.filter.stage import FilterStageConfig, fingerprint_of, main, run

__all__ = ["FilterStageConfig", "fingerprint_of", "main", "run"]
