import uuid

import pyarrow.parquet as pq
import pytest

from pipelines.core.config import load_config
from pipelines.core.manifest import read_manifest
from pipelines.shard.stage import ShardConfig, run
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import shape_samples

from .stage_data import commit_rows, sample_row

# One shared local Ray for the session (tests/conftest.py), started after the S3 server.
pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def rows():
    return [sample_row(s.image, s.caption, f"http://x.test/{i}.jpg") for i, s in enumerate(shape_samples(150, seed=4))]


def shard(inp: str, out: str, *extra: str, s3_endpoint: str | None = None):
    args = [f"input={inp}", f"output.path={out}", "rows_per_shard=40", "row_group_size=16", "ray.num_cpus=4", *extra]
    if s3_endpoint:
        args += [f"input_s3.endpoint_url={s3_endpoint}", f"output.s3.endpoint_url={s3_endpoint}"]
    return run(load_config(ShardConfig, None, args))


def test_shards_are_deterministic_sized_and_readable(rows, tmp_path) -> None:
    import pandas as pd
    import ray.data

    src = str(tmp_path / "dedup")
    commit_rows(src, rows, stage="dedup")
    a = shard(src, str(tmp_path / "a"))
    b = shard(src, str(tmp_path / "b"))
    assert a.rows_out == 150 and len(a.files) == 4  # ceil(150 / 40)
    assert all(20 <= f.rows <= 60 for f in a.files)
    sa, sb = Storage.from_uri(str(tmp_path / "a")), Storage.from_uri(str(tmp_path / "b"))
    for fa, fb in zip(a.files, b.files):  # same input + seed: the same shards row for row
        assert fa.path == fb.path
        assert sa.read_parquet(fa.path).column("key").equals(sb.read_parquet(fb.path).column("key"))
    keys = sa.read_parquet(a.file_paths()).column("key").to_pylist()
    assert sorted(keys) == sorted(r["key"] for r in rows) and len(set(keys)) == 150
    committed = Storage.from_uri(src).read_parquet(read_manifest(Storage.from_uri(src), "").file_paths())
    input_order = committed.column("key").to_pylist()
    assert keys != input_order  # shuffled
    # Row groups sized for streaming; readable by pyarrow, pandas and Ray Data.
    path = str(tmp_path / "a" / a.files[0].path)
    assert pq.ParquetFile(path).metadata.row_group(0).num_rows <= 16
    assert len(pd.read_parquet(path)) == a.files[0].rows
    assert ray.data.read_parquet([str(tmp_path / "a" / f.path) for f in a.files]).count() == 150
    c = shard(src, str(tmp_path / "c"), "seed=1")
    assert Storage.from_uri(str(tmp_path / "c")).read_parquet(c.file_paths()).column("key").to_pylist() != keys
    # Rerun of a committed stage is a no-op; unshuffled shards keep input order.
    assert shard(src, str(tmp_path / "a")).created_at == a.created_at
    d = shard(src, str(tmp_path / "d"), "shuffle=false")
    assert Storage.from_uri(str(tmp_path / "d")).read_parquet(d.file_paths()).column("key").to_pylist() == \
        input_order
    # Fewer rows than one shard holds: one shard (shuffled, or in input order), not Ray's default block count.
    for name, extra, want_order in (("e", (), None), ("f", ("shuffle=false",), input_order)):
        m = shard(src, str(tmp_path / name), "rows_per_shard=1000", *extra)
        assert len(m.files) == 1 and m.files[0].rows == 150, m.files
        got = Storage.from_uri(str(tmp_path / name)).read_parquet(m.file_paths()).column("key").to_pylist()
        assert got == want_order if want_order else (sorted(got) == sorted(input_order) and got != input_order)


def test_shards_on_s3(rows, s3_server) -> None:
    import ray
    import ray.data

    # Workers resolve S3 credentials themselves (nothing secret is pickled into tasks): the shared Ray
    # (ray_session) starts after the S3 fixture put its keys in the environment.

    prefix = f"shard-{uuid.uuid4().hex[:6]}"
    src, out = s3_server.uri(f"{prefix}/dedup"), s3_server.uri(f"{prefix}/shards")
    commit_rows(src, rows, stage="dedup", s3=s3_server.s3_options())
    m = shard(src, out, s3_endpoint=s3_server.endpoint_url)
    st = Storage.from_uri(out, s3_server.s3_options())
    assert read_manifest(st, "").fingerprint == m.fingerprint
    assert st.read_parquet(m.file_paths()).num_rows == 150
    assert st.read_parquet(m.file_paths()).to_pandas()["key"].nunique() == 150
    assert ray.data.read_parquet(**st.ray_read_args(m.file_paths())).count() == 150
