"""Stage 1, crawl: URL + caption lists -> sample rows. See stage.py."""

from pipelines.crawl.stage import CrawlConfig, fingerprint_of, main, run

__all__ = ["CrawlConfig", "fingerprint_of", "main", "run"]
