"""Stage 4, curate: metadata matching and balancing (MetaCLIP). See stage.py."""

from pipelines.curate.stage import CurateConfig, fingerprint_of, main, run

__all__ = ["CurateConfig", "fingerprint_of", "main", "run"]
