"""Stage 2, filter: caption and image rules, language id, per-query cap, CLIP score. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["FilterStageConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.filter.stage", __all__)
