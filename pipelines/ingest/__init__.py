"""Ingest: img2dataset's Parquet or WebDataset output as a committed stage output. See stage.py."""

from pipelines.ingest.stage import IngestConfig, fingerprint_of, main, run

__all__ = ["IngestConfig", "fingerprint_of", "main", "run"]
