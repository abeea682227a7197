"""Stage 4, shard: shuffled, sized training shards with a manifest. See stage.py."""

from pipelines.shard.stage import ShardConfig, fingerprint_of, main, run

__all__ = ["ShardConfig", "fingerprint_of", "main", "run"]
