"""Stage 3, dedup: exact and near duplicates, eval-set decontamination. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["DedupStageConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.dedup.stage", __all__)
