"""The local Ray a command starts when it is given no cluster (`pipelines.core.runtime.init_ray`); the tests' shared
Ray is that same Ray (tests/conftest.py)."""

from __future__ import annotations

import os


def _worker_view() -> dict:
    import ray

    return {"env": os.environ.get("NO_ALBUMENTATIONS_UPDATE"), "runtime_env": dict(ray.get_runtime_context().runtime_env)}


def test_local_ray_workers_get_the_environment_without_a_runtime_env(ray_session) -> None:
    """Workers inherit the variable from the process that started Ray, and no runtime env is set: one would start
    every worker through Ray's setup_worker.py, a second Python importing Ray (benchmarks/bench_ray_workers.py)."""
    import ray

    views = ray.get([ray.remote(_worker_view).options(num_cpus=0.5).remote() for _ in range(2)])
    assert views == [{"env": "1", "runtime_env": {}}] * 2
