"""Every YAML in configs/ loads into its stage's typed config (unknown keys would be errors)."""

import importlib

import pytest

from pipelines.core.config import load_config

STAGES = {
    "crawl.yaml": ("pipelines.crawl", "CrawlConfig", ["input.paths=[urls.parquet]"]),
    "filter.yaml": ("pipelines.filter", "FilterStageConfig", []),
    "dedup.yaml": ("pipelines.dedup", "DedupStageConfig", []),
    "shard.yaml": ("pipelines.shard", "ShardConfig", []),
    "train_tiny.yaml": ("pipelines.train", "TrainConfig", []),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_config_file_loads(name: str) -> None:
    module, cls, overrides = STAGES[name]
    cfg = load_config(getattr(importlib.import_module(module), cls), f"configs/{name}", overrides)
    assert type(cfg).__name__ == cls


@pytest.mark.parametrize("name", ["run_tiny.yaml", "demo.yaml", "cluster.yaml"])
def test_run_config_file_loads(name: str) -> None:
    from pipelines.run.dag import STAGES, Selection, load_run_config

    cfg = load_run_config(f"configs/{name}")
    assert cfg.root and cfg.train.model
    assert Selection(only=STAGES[:1]).selected("crawl")
