"""Stage 4, shard: shuffled, sized training shards with a manifest. See stage.py."""

from pipelines.core.lazy import lazy_exports

__all__ = ["ShardConfig", "fingerprint_of", "main", "run"]
__getattr__ = lazy_exports(__name__, "pipelines.shard.stage", __all__)
