"""Ingest: img2dataset's Parquet or WebDataset output as a committed stage output. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["IngestConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.ingest.stage", __all__)
