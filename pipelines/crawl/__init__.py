"""Stage 1, crawl: URL + caption lists -> sample rows. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["CrawlConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.crawl.stage", __all__)
