"""Shared fixtures. The SeaweedFS S3 server starts once per session (about 1.5 s) and is shared."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from pipelines.demo.local_s3 import LocalS3
from pipelines.core.storage import Storage


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
        with server:
            yield server


@pytest.fixture
def s3_storage(s3_server: LocalS3, request: pytest.FixtureRequest) -> Storage:
    """A fresh, empty prefix in the session bucket, so tests never see each other's objects."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60]
    return Storage.from_uri(s3_server.uri(f"{name}-{uuid.uuid4().hex[:8]}"), s3_server.s3_options())
