"""Metadata for curation (MetaCLIP-style): build it with `python -m pipelines.metadata`, read it with
`read_metadata`; `text` holds the one tokenisation entries and captions share. See build.py."""

from pipelines.metadata.store import Metadata, read_metadata, write_metadata
from pipelines.metadata.text import normalize, spaced, tokens

__all__ = ["Metadata", "normalize", "read_metadata", "spaced", "tokens", "write_metadata"]
