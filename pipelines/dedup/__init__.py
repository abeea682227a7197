"""Stage 3, dedup: exact and near duplicates, eval-set decontamination. See stage.py."""

from pipelines.dedup.stage import DedupStageConfig, fingerprint_of, main, run

__all__ = ["DedupStageConfig", "fingerprint_of", "main", "run"]
