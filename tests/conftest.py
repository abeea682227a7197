"""Shared fixtures. The SeaweedFS S3 server starts once per session (about 1.5 s) and is shared."""

from __future__ import annotations

import atexit
import os
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

from pipelines.demo.local_s3 import LocalS3
from pipelines.core.storage import Storage


def _exit_without_finalizing() -> None:
    """An xdist worker's last act: leave without Python's finalization (freeing every module and object of a
    process that loaded torch, Ray, DeepSpeed, MLflow and W&B). Registered when this conftest is imported, before
    the libraries the tests import, so their exit handlers (run last-registered first) have all run by then. Its
    results are with the controller already, which waits for the worker process to end: that wait took 3.4 s
    after the last exit handler in one worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if os.environ.get("PYTEST_XDIST_WORKER"):
    atexit.register(_exit_without_finalizing)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A real S3 endpoint on 127.0.0.1 (free ports), with its credentials in os.environ for the session.

    No skip: a missing `weed` binary is a broken dev install and must fail loudly.
    """
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs"), bucket="clip-test")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():
            mp.setenv(name, value)
        # Only these keys may sign requests; and no AWS client may ever ask EC2 metadata.
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server.start()
        try:
            yield server
        finally:
            # Killed, not stopped: nothing reads its data after the session, and SeaweedFS's graceful stop took 2.2-2.5
            # s (12 s once), at the end of each xdist worker, where it is on the suite's critical path.
            server.kill()


@pytest.fixture
def s3_storage(s3_server: LocalS3, request: pytest.FixtureRequest) -> Storage:
    """A fresh, empty prefix in the session bucket, so tests never see each other's objects."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60]
    return Storage.from_uri(s3_server.uri(f"{name}-{uuid.uuid4().hex[:8]}"), s3_server.s3_options())


def actors_created(class_part: str) -> int:
    """Actors this process's Ray has created so far whose class name contains `class_part`, dead ones included
    (Ray's GCS actor table: its state API needs a dashboard, which the tests' Ray does not start)."""
    import ray

    return sum(class_part in a["ActorClassName"] for a in ray._private.state.actors().values())


def restart_shared_ray() -> None:
    """Bring back the session's shared Ray after a test replaced it with a cluster of its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _start_ray()


# Logical CPUs of every Ray the tests start on this machine (the shared one, test_run's head): what a command's
# local Ray takes by default on 2 cores (max(4, 2 * cores)). Enough for 2 training workers and their loaders
# beside data tasks; with 6, each stage ran more processes at once on 2 cores (crawl and evaluate pools size by
# the cluster's CPUs). tests/test_run.py alone, 6 and 4 in turn, twice: 351/325 -> 290/248 CPU s, 236/216 -> 201/177 s.
RAY_CPUS = 4


def _start_ray() -> None:
    """The product's own local Ray (what a command starts when it is given no cluster), without a dashboard."""
    from pipelines.core.runtime import RayConfig, init_ray

    # Never join a cluster from the shell's RAY_ADDRESS; a local Ray is always new (address="local"), so it never
    # joins a `ray start` head that another test (tests/test_run.py) runs beside us either.
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(RayConfig(num_cpus=RAY_CPUS, dashboard=False))


@pytest.fixture(scope="session")
def ray_session(s3_server: LocalS3) -> Iterator[None]:
    """One local Ray (RAY_CPUS logical CPUs) for the whole session, shared by every test that asks for it; started
    after the S3 server, so its workers inherit the S3 credentials. Stage code finds it running and reuses
    it. A test that needs a cluster of its own (tests/test_cluster_configs.py) calls `restart_shared_ray`
    when it is done."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield


# Wall seconds of each heavy module under `make test` (-n 2 --dist loadfile) on the 2-core machine, from a
# `--durations=0` run; the rest take under 15 s each. pytest-xdist's loadfile hands out whole modules in collection
# order (the Makefile passes --no-loadscope-reorder: its default reorder puts modules with most tests first, which
# ran tests/test_run.py, 255 s in a few tests, last, and left one worker idle for 50 s at the end). Heaviest first
# is the classic longest-processing-time order: the short modules fill in at the end and the workers finish
# together. A module not listed here counts as 10 s, as the unlisted ones do; a new heavy module belongs in the
# table, whose figures need updating only when a module's cost changes a lot.
MODULE_SECONDS = {
    "test_run.py": 255, "test_train.py": 149, "test_train_elastic.py": 135, "test_crawl.py": 92, "test_dedup.py": 78,
    "test_dedup_core.py": 70, "test_crawl_fuzz.py": 64, "test_evaluate.py": 37, "test_cluster_configs.py": 35,
    "test_ingest.py": 33, "test_cli.py": 33, "test_curate.py": 26, "test_interop.py": 24, "test_filter.py": 19,
    "test_model.py": 17, "test_tracking.py": 17, "test_images.py": 15,
}
UNLISTED_MODULE_SECONDS = 10


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests module by module, heaviest module first (MODULE_SECONDS); within a module, as written."""

    def cost(item: pytest.Item) -> int:
        return MODULE_SECONDS.get(item.path.name, UNLISTED_MODULE_SECONDS)

    items.sort(key=cost, reverse=True)  # stable: each module's tests keep their order and stay together


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
