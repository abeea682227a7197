"""Stage 4, curate: metadata matching and balancing (MetaCLIP). See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["CurateConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.curate.stage", __all__)
