from __future__ import annotations

import json
import pickle
import re
import sys
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.fs as pafs
import pytest
import ray.cloudpickle

from pipelines.core.ports import free_port
from pipelines.demo.local_s3 import LocalS3, LocalS3Error
from pipelines.core.storage import LocalStorage, S3Options, S3Storage, Storage, StorageError


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "root"))
    return request.getfixturevalue("s3_storage")


def test_from_uri_picks_the_backend(tmp_path: Path, s3_storage: Storage) -> None:
    assert isinstance(Storage.from_uri(str(tmp_path)), LocalStorage)
    assert isinstance(Storage.from_uri(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(s3_storage, S3Storage)
    assert s3_storage.uri("a/b").startswith("s3://clip-test/") and s3_storage.uri("a/b").endswith("/a/b")
    with pytest.raises(StorageError, match="unsupported storage uri 'gs://x'"):
        Storage.from_uri("gs://x")
    with pytest.raises(StorageError, match="has no bucket"):
        Storage.from_uri("s3:///prefix", S3Options(endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="endpoint_url must look like"):
        S3Options(endpoint_url="127.0.0.1:8333")


def test_join_stays_inside_root(storage: Storage) -> None:
    assert storage.join("a/", "/b", "c.txt") == "a/b/c.txt"
    assert storage.join("a/./b/../c") == "a/c"
    with pytest.raises(StorageError, match="leaves the storage root"):
        storage.join("a", "../../etc")


def test_bytes_round_trip_and_overwrite(storage: Storage) -> None:
    assert not storage.exists("d/x.bin")
    storage.write_bytes("d/x.bin", b"one")
    assert storage.exists("d/x.bin") and storage.read_bytes("d/x.bin") == b"one"
    storage.write_bytes("d/x.bin", b"two!")
    assert storage.read_bytes("d/x.bin") == b"two!" and storage.size("d/x.bin") == 4
    assert storage.list() == ["d/x.bin"]  # no temporary files left behind


def test_missing_file_names_the_uri(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(storage.uri("nope.bin"))):
        storage.read_bytes("nope.bin")


def test_put_if_absent_creates_once(storage: Storage) -> None:
    assert storage.put_if_absent("locks/a", b"first") is True
    assert storage.put_if_absent("locks/a", b"second") is False
    assert storage.read_bytes("locks/a") == b"first"
    assert storage.list("locks") == ["locks/a"]


def test_list_and_delete(storage: Storage) -> None:
    for path in ["a/1", "a/2", "a/sub/3", "b/4"]:
        storage.write_bytes(path, path.encode())
    assert storage.list() == ["a/1", "a/2", "a/sub/3", "b/4"]
    assert storage.list("a", recursive=False) == ["a/1", "a/2", "a/sub/"]
    assert storage.list("missing") == []
    storage.delete("a/1")
    storage.delete("a/1")  # idempotent
    storage.delete_prefix("a")
    assert storage.list() == ["b/4"]
    with pytest.raises(StorageError, match="refuses to delete the whole storage root"):
        storage.delete_prefix("")


def test_streams(storage: Storage) -> None:
    with storage.open_output("s/blob") as f:
        f.write(b"abc" * 1000)
    with storage.open_input("s/blob") as f:
        f.seek(2997)
        assert f.read() == b"abc"


def test_parquet_round_trip_with_pandas(storage: Storage) -> None:
    df = pd.DataFrame({"key": [f"k{i}" for i in range(10)], "n": range(10), "img": [bytes([i]) * 5 for i in range(10)]})
    table = pa.Table.from_pandas(df, preserve_index=False)
    nbytes = storage.write_parquet(table, "p/part-0.parquet", row_group_size=4)
    storage.write_parquet(table.slice(0, 3), "p/part-1.parquet")
    assert nbytes == storage.size("p/part-0.parquet") > 0
    with storage.open_input("p/part-0.parquet") as f:
        assert pq.ParquetFile(f).num_row_groups == 3  # 4 + 4 + 2 rows
    back = storage.read_parquet(["p/part-0.parquet", "p/part-1.parquet"]).to_pandas()
    pd.testing.assert_frame_equal(back, pd.concat([df, df.iloc[:3]], ignore_index=True))
    assert storage.read_parquet("p/part-1.parquet", columns=["n"]).column_names == ["n"]


def test_ray_read_args_address_the_files(storage: Storage) -> None:
    storage.write_parquet(pa.table({"x": [1, 2]}), "r/a.parquet")
    args = storage.ray_read_args(["r/a.parquet"])
    assert pq.read_table(args["paths"][0], filesystem=args["filesystem"]).column("x").to_pylist() == [1, 2]


def test_pickled_storage_carries_no_secret(s3_server: LocalS3, s3_storage: Storage) -> None:
    s3_storage.write_bytes("k", b"v")
    blob = pickle.dumps(s3_storage)
    assert s3_server.secret_key.encode() not in blob
    assert pickle.loads(blob).read_bytes("k") == b"v"


def test_local_write_is_replace_not_truncate(tmp_path: Path) -> None:
    storage = Storage.from_uri(str(tmp_path))
    storage.write_bytes("m.json", b"old")
    reader = open(tmp_path / "m.json", "rb")  # a reader holding the old file keeps old, whole content
    storage.write_bytes("m.json", b"new content")
    assert reader.read() == b"old"
    reader.close()
    assert (tmp_path / "m.json").read_bytes() == b"new content"


def test_wrong_credentials_fail_on_open(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as info:
        Storage.from_uri(s3_server.uri("x"), s3_server.s3_options())
    msg = str(info.value)
    assert "access denied to s3://clip-test/x" in msg
    assert s3_server.endpoint_url in msg and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in msg
    assert "not-the-secret" not in msg


def test_wrong_credentials_fail_clearly_in_operations(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    bad = Storage.from_uri(s3_server.uri("x"), s3_server.s3_options(check_on_open=False))
    with pytest.raises(StorageError, match="access denied .* during write:"):  # boto3 path
        bad.write_bytes("f", b"1")
    with pytest.raises(StorageError, match="access denied .* during read:"):  # pyarrow path
        bad.read_bytes("f")
    with pytest.raises(StorageError, match="access denied .* during write parquet"):
        bad.write_parquet(pa.table({"x": [1]}), "f.parquet")


def test_unreachable_endpoint_is_named() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint http://127.0.0.1:{port}"):
        Storage.from_uri("s3://b/p", S3Options(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1))


def test_local_s3_refuses_a_busy_port(s3_server: LocalS3, tmp_path: Path) -> None:
    other = LocalS3(tmp_path / "other", bucket="other", s3_port=s3_server.ports.s3)
    with pytest.raises(LocalS3Error, match=f"port\\(s\\) already in use on 127.0.0.1: {{'s3': {s3_server.ports.s3}}}"):
        other.start()
    assert not other.running
    with pytest.raises(LocalS3Error, match="not a valid S3 bucket name"):
        LocalS3(tmp_path, bucket="ab")


def test_credentials_from_a_named_profile(s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[local]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # env keys would win over the profile
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = Storage.from_uri(s3_server.uri("profile-test"), s3_server.s3_options(profile="local"))
    storage.write_bytes("f", b"via profile")
    assert storage.read_bytes("f") == b"via profile"
    with pytest.raises(StorageError, match="AWS profile 'nope' \\(s3.profile\\) not found"):
        Storage.from_uri(s3_server.uri("x"), s3_server.s3_options(profile="nope"))


# A credential_process as SSO, web identity or instance metadata behave: temporary keys, here read from a
# file the test controls, that expire 5 minutes ahead. botocore refreshes credentials due within 10 minutes
# on every access, so each request asks this process again.
_CREDENTIAL_PROCESS = """
import datetime, json, pathlib, sys
keys = json.loads(pathlib.Path(sys.argv[1]).read_text())
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
print(json.dumps({"Version": 1, **keys, "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


def _set_keys(key_file: Path, access_key: str, secret_key: str, token: str | None = None) -> None:
    keys = {"AccessKeyId": access_key, "SecretAccessKey": secret_key, **({"SessionToken": token} if token else {})}
    key_file.write_text(json.dumps(keys))


@pytest.fixture
def rotating_profile(s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Profile 'rotating' gets expiring credentials from a credential_process; returns its key file."""
    script, key_file = tmp_path / "credential_process.py", tmp_path / "keys.json"
    script.write_text(_CREDENTIAL_PROCESS)
    _set_keys(key_file, s3_server.access_key, s3_server.secret_key)
    (tmp_path / "config").write_text(f"[profile rotating]\ncredential_process = {sys.executable} {script} {key_file}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return key_file


def test_expiring_credentials_are_refreshed_for_boto3_and_pyarrow(s3_server: LocalS3, rotating_profile: Path) -> None:
    uri = s3_server.uri(f"rotating-{uuid.uuid4().hex[:8]}")
    storage = Storage.from_uri(uri, s3_server.s3_options(profile="rotating"))
    fs = storage.fs
    table = pa.table({"x": [1, 2, 3]})
    storage.write_bytes("m", b"1")  # boto3
    storage.write_parquet(table, "p0.parquet")  # pyarrow

    # The provider now hands out a secret the server refuses, as if rotated keys had gone bad: every
    # path must pick it up at once (a frozen copy would go on succeeding).
    _set_keys(rotating_profile, s3_server.access_key, "rotated-wrong-secret")
    denied = "access denied to s3://clip-test/rotating-.* during {}:.*profile 'rotating'"
    with pytest.raises(StorageError, match=denied.format("write")):
        storage.write_bytes("m", b"2")
    with pytest.raises(StorageError, match=denied.format("write parquet")):
        storage.write_parquet(table, "p1.parquet")
    with pytest.raises(StorageError, match=denied.format("read parquet")):
        storage.read_parquet("p0.parquet")
    with pytest.raises(StorageError, match=denied.format("open for reading")) as info:
        storage.open_input("p0.parquet")
    assert "rotated-wrong-secret" not in str(info.value) and "\n" not in str(info.value)
    args = storage.ray_read_args(["p0.parquet"])
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # what Ray Data would read with
        pq.read_table(args["paths"][0], filesystem=args["filesystem"])

    # Valid keys again: the same Storage and the same filesystem object recover.
    _set_keys(rotating_profile, s3_server.access_key, s3_server.secret_key)
    storage.write_bytes("m", b"3")
    storage.write_parquet(table, "p1.parquet")
    assert storage.read_bytes("m") == b"3"
    assert storage.read_parquet(["p0.parquet", "p1.parquet"]).column("x").to_pylist() == [1, 2, 3] * 2
    with storage.open_input("p1.parquet") as f:
        assert pq.ParquetFile(f).metadata.num_rows == 3
    assert pq.read_table(args["paths"][0], filesystem=args["filesystem"]).num_rows == 3
    assert storage.fs is fs

    # A provider that fails outright is named as such, with the profile, on one line (its stderr
    # here is a Python traceback).
    rotating_profile.write_text("not json")
    failed = "cannot get AWS credentials \\(profile 'rotating'\\) for "
    with pytest.raises(StorageError, match=failed + "s3://clip-test/rotating-.* during write parquet") as info:
        storage.write_parquet(table, "p2.parquet")
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match=failed + f"S3 endpoint {s3_server.endpoint_url}") as info:
        Storage.from_uri(uri, s3_server.s3_options(profile="rotating"))
    assert "\n" not in str(info.value)


def _pickles(obj: object) -> list[bytes]:
    return [pickle.dumps(obj), ray.cloudpickle.dumps(obj)]


def test_nothing_pickled_carries_a_secret(
    s3_server: LocalS3, s3_storage: Storage, rotating_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: pyarrow's own S3FileSystem pickles the keys it was given, so this search would find them.
    native = pafs.S3FileSystem(access_key="AKIDCONTROL", secret_key="control-secret", session_token="control-token")
    assert all(b"control-secret" in blob and b"control-token" in blob for blob in _pickles(native))

    # Static keys from the environment (the s3_storage fixture, opened before the profile took over).
    s3_storage.write_parquet(pa.table({"x": [7]}), "a.parquet")
    native = s3_storage.fs.handler._connection.s3fs()  # what it signs with: it holds the secret, and pickles it
    assert s3_server.secret_key.encode() in pickle.dumps(native)
    for obj in (s3_storage, s3_storage.fs, s3_storage.ray_read_args(["a.parquet"])):
        for blob in _pickles(obj):
            assert s3_server.secret_key.encode() not in blob
    # What a Ray worker gets resolves its credentials where it runs, on first use: here, where the
    # AWS_* keys are gone (and the profile is not named), there are none.
    args = pickle.loads(ray.cloudpickle.dumps(s3_storage.ray_read_args(["a.parquet"])))
    with pytest.raises(StorageError, match="no AWS credentials found for S3 endpoint http://127.0.0.1:"):
        pq.read_table(args["paths"][0], filesystem=args["filesystem"])

    # Temporary credentials with a session token (SeaweedFS refuses tokens, so the request fails; the
    # filesystem has been built with them all the same).
    _set_keys(rotating_profile, "AKIDTEMPORARY", "temporary-secret-xyz", token="session-token-xyz")
    temp = Storage.from_uri(s3_server.uri("temp"), s3_server.s3_options(profile="rotating", check_on_open=False))
    with pytest.raises(StorageError, match="access denied"):
        temp.exists("a.parquet")
    assert b"session-token-xyz" in pickle.dumps(temp.fs.handler._connection.s3fs())
    for obj in (temp, temp.fs, temp.ray_read_args(["a.parquet"])):
        for blob in _pickles(obj):
            assert b"temporary-secret-xyz" not in blob and b"session-token-xyz" not in blob

    # With credentials where they are unpickled, storages and filesystems work, and share one
    # credentials owner per process (Ray unpickles the filesystem once per task).
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert pq.read_table(args["paths"][0], filesystem=args["filesystem"]).column("x").to_pylist() == [7]
    restored = [pickle.loads(pickle.dumps(s3_storage.fs)) for _ in range(2)]
    assert restored[0].get_file_info(s3_storage.fs_path("a.parquet")).type == pafs.FileType.File
    assert restored[1].get_file_info(s3_storage.fs_path("a.parquet")).size > 0
    assert restored[0].handler._connection is restored[1].handler._connection
    assert pickle.loads(pickle.dumps(s3_storage)).read_parquet("a.parquet").column("x").to_pylist() == [7]


def test_anonymous_filesystem_pickles_and_stays_anonymous(s3_server: LocalS3) -> None:
    anon = Storage.from_uri(s3_server.uri("anon"), s3_server.s3_options(anonymous=True, check_on_open=False))
    back = pickle.loads(ray.cloudpickle.dumps(anon.fs))
    assert back == anon.fs
    for fs in (anon.fs, back):
        with pytest.raises(OSError, match="ACCESS_DENIED"):  # the server allows no anonymous access
            fs.open_output_stream(anon.fs_path("f")).close()
