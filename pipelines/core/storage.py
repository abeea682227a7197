"""One storage abstraction over local directories and `s3://bucket/prefix` URIs.

All paths passed to a `Storage` are relative to its root, with `/` separators. Byte-sized
metadata (manifests, markers) goes through `write_bytes`, which readers never see half-written;
large data goes through pyarrow (`write_parquet`, `open_output`), whose output becomes
visible only through a manifest that lists it (see `pipelines.manifest`). Object stores have no
atomic rename, so nothing here relies on one.

Credentials are never fields of any config: on S3 they come from boto3's credential chain (the
AWS_* environment variables, a named profile, SSO, credential_process, web identity, container or
instance metadata). One botocore credentials object per connection owns them: the boto3 client
signs with it, and `Storage.fs` asks it on every call, rebuilding its pyarrow S3FileSystem whenever
temporary credentials have been refreshed (they expire after 1-12 h; a frozen copy would fail a
week-long run with ExpiredToken). `Storage.fs` pickles as its S3Options only, so no key travels to
a Ray worker: the worker resolves its own credentials through the same chain, once per process.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(Exception):
    pass


@dataclass
class S3Options:
    # Endpoint of an S3-compatible store, e.g. "http://127.0.0.1:8333"; None = AWS S3 itself.
    endpoint_url: str | None = None
    # Always passed explicitly so that no client guesses it (the AWS SDK would ask EC2 metadata).
    region: str = "us-east-1"
    # Named profile in ~/.aws/{credentials,config}; None = boto3's default chain (env vars first).
    profile: str | None = None
    # Public buckets only: send unsigned requests and look up no credentials.
    anonymous: bool = False
    # Seconds to open a connection / to wait for a response, for boto3 and pyarrow alike.
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    # Attempts per request (first try included) before an operation fails.
    max_attempts: int = 3
    # One cheap head_bucket call when a Storage is opened, so bad credentials fail at once.
    check_on_open: bool = True

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(
                    f"s3.endpoint_url must look like http://host:port or https://host, got {self.endpoint_url!r}"
                )
            if parsed.path not in ("", "/"):
                raise ValueError(f"s3.endpoint_url must not contain a path, got {self.endpoint_url!r}")
        if not self.region:
            raise ValueError("s3.region must not be empty")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("s3 timeouts must be positive")
        if self.max_attempts < 1:
            raise ValueError(f"s3.max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


class Storage(abc.ABC):
    """Base class: everything expressible through a pyarrow FileSystem lives here."""

    # Safe to hand to Ray Data / Ray Train / pyarrow: on S3 it refreshes its credentials and pickles
    # without them (see _RefreshingS3Handler).
    fs: pafs.FileSystem
    # The root in the filesystem's own namespace ("/abs/dir" locally, "bucket/prefix" on S3).
    root: str

    @staticmethod
    def from_uri(uri: str, s3: S3Options | None = None) -> Storage:
        if not isinstance(uri, str) or not uri.strip():
            raise StorageError(f"storage uri must be a non-empty string, got {uri!r}")
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return S3Storage(uri, s3 or S3Options())
        if parsed.scheme in ("", "file"):
            return LocalStorage(parsed.path if parsed.scheme == "file" else uri)
        raise StorageError(f"unsupported storage uri {uri!r}: use a local path, file:// or s3://bucket/prefix")

    # -- paths -------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """A normalised relative path; refuses to leave the root, since every stage must stay inside it."""
        if not all(isinstance(p, str) for p in parts):
            raise StorageError(f"path parts must be strings, got {parts!r}")
        joined = posixpath.normpath("/".join(p.strip("/") for p in parts if p.strip("/")))
        if joined == ".":
            return ""
        if joined == ".." or joined.startswith("../"):
            raise StorageError(f"path {'/'.join(parts)!r} leaves the storage root {self.uri('')}")
        return joined

    def fs_path(self, path: str) -> str:
        rel = self.join(path)
        return f"{self.root}/{rel}" if rel else self.root

    @abc.abstractmethod
    def uri(self, path: str = "") -> str:
        raise NotImplementedError

    def ray_read_args(self, paths: Sequence[str]) -> dict[str, Any]:
        """`ray.data.read_parquet(**storage.ray_read_args(files))` reads exactly these files.

        The filesystem pickles without credentials: each Ray worker resolves (and refreshes) its own.
        """
        return {"paths": [self.fs_path(p) for p in paths], "filesystem": self.fs}

    # -- bytes -------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        with self._errors("exists", path):
            return self.fs.get_file_info(self.fs_path(path)).type != pafs.FileType.NotFound

    def size(self, path: str) -> int:
        with self._errors("size", path):
            info = self.fs.get_file_info(self.fs_path(path))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"size: {self.uri(path)} is not a file")
        return int(info.size)

    def read_bytes(self, path: str) -> bytes:
        with self._errors("read", path), self.fs.open_input_stream(self.fs_path(path)) as f:
            return f.read()

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` unless it exists; True if this call created it."""
        raise NotImplementedError

    def open_input(self, path: str) -> pa.NativeFile:
        with self._errors("open for reading", path):
            return self.fs.open_input_file(self.fs_path(path))

    def open_output(self, path: str) -> pa.NativeFile:
        """A streaming writer. Not atomic on a local disk: commit its output through a manifest."""
        self._make_parent(path)
        with self._errors("open for writing", path):
            return self.fs.open_output_stream(self.fs_path(path))

    # -- listing and deletion ----------------------------------------------------------------
    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Relative paths of the files under `prefix`, sorted; non-recursive also lists sub-dirs as 'name/'."""
        selector = pafs.FileSelector(self.fs_path(prefix), recursive=recursive, allow_not_found=True)
        with self._errors("list", prefix):
            infos = self.fs.get_file_info(selector)
        out = []
        for info in infos:
            rel = info.path[len(self.root) :].lstrip("/")
            if info.type == pafs.FileType.File and not _is_tmp(rel):
                out.append(rel)
            elif info.type == pafs.FileType.Directory and not recursive:
                out.append(rel + "/")
        return sorted(out)

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error (deletes are retried after crashes)."""
        with self._errors("delete", path):
            try:
                self.fs.delete_file(self.fs_path(path))
            except FileNotFoundError:
                pass

    def delete_prefix(self, prefix: str) -> None:
        if not self.join(prefix):
            raise StorageError(f"delete_prefix refuses to delete the whole storage root {self.uri('')}")
        with self._errors("delete prefix", prefix):
            self.fs.delete_dir_contents(self.fs_path(prefix), missing_dir_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(self.fs_path(prefix))

    # -- parquet -----------------------------------------------------------------------------
    def write_parquet(self, table: pa.Table, path: str, row_group_size: int | None = None) -> int:
        """Write one Parquet file; returns its size in bytes (for the manifest)."""
        if not isinstance(table, pa.Table):
            raise TypeError(f"write_parquet needs a pyarrow.Table, got {type(table).__name__}")
        self._make_parent(path)
        with self._errors("write parquet", path):
            pq.write_table(table, self.fs_path(path), filesystem=self.fs, row_group_size=row_group_size)
        return self.size(path)

    def read_parquet(self, paths: str | Sequence[str], columns: list[str] | None = None) -> pa.Table:
        """Read exactly the listed files (never a directory scan: unlisted files are uncommitted)."""
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not paths:
            raise StorageError("read_parquet needs at least one path")
        with self._errors("read parquet", paths[0] if len(paths) == 1 else f"{len(paths)} files"):
            dataset = pads.dataset([self.fs_path(p) for p in paths], filesystem=self.fs, format="parquet")
            return dataset.to_table(columns=columns)

    # -- hooks -------------------------------------------------------------------------------
    def _make_parent(self, path: str) -> None:
        pass

    @contextlib.contextmanager
    def _errors(self, op: str, path: str) -> Iterator[None]:
        try:
            yield
        except (StorageError, TypeError, ValueError):
            raise
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{op}: {self.uri(path)} does not exist ({err})") from err
        except Exception as err:  # pyarrow raises OSError/ArrowException, botocore its own tree
            raise self._explain(err, op, path) from err

    def _explain(self, err: Exception, op: str, path: str) -> StorageError:
        return StorageError(f"{op} failed for {self.uri(path)}: {err}")


class LocalStorage(Storage):
    def __init__(self, path: str) -> None:
        self.fs = pafs.LocalFileSystem()
        self.root = os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def __reduce__(self) -> tuple:
        return (LocalStorage, (self.root,))

    def uri(self, path: str = "") -> str:
        return self.fs_path(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self.fs_path(path)
        self._make_parent(path)
        with self._errors("write", path):
            tmp = self._write_tmp(target, data)
            os.replace(tmp, target)  # atomic on POSIX: readers see the old or the new file, never half

    def put_if_absent(self, path: str, data: bytes) -> bool:
        target = self.fs_path(path)
        self._make_parent(path)
        with self._errors("put_if_absent", path):
            tmp = self._write_tmp(target, data)
            try:
                # link() fails if target exists, like O_EXCL, and the content appears complete at once.
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)

    def _write_tmp(self, target: str, data: bytes) -> str:
        tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _make_parent(self, path: str) -> None:
        with self._errors("create directory for", path):
            os.makedirs(posixpath.dirname(self.fs_path(path)), exist_ok=True)


class S3Storage(Storage):
    def __init__(self, uri: str, options: S3Options, _connection: _S3Connection | None = None) -> None:
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"s3 uri {uri!r} has no bucket: use s3://bucket/prefix")
        self.options = options
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        # A Storage opened here resolves its credentials afresh; an unpickled one shares its process's.
        connection = _connection or _S3Connection(options)
        self.client, self.fs = connection.client, connection.fs
        if options.check_on_open:
            self._check_access()

    def __repr__(self) -> str:
        return f"S3Storage({self.uri('')!r}, endpoint={self.options.endpoint_name!r})"

    def __reduce__(self) -> tuple:
        # Clients do not pickle; the receiving process (e.g. a Ray worker) resolves its own
        # credentials through the same chain, so no secret travels inside the pickle.
        return (_unpickle_s3_storage, (self.uri(""), self.options))

    def uri(self, path: str = "") -> str:
        return f"s3://{self.fs_path(path)}"

    def key(self, path: str) -> str:
        return self.fs_path(path)[len(self.bucket) + 1 :]

    def write_bytes(self, path: str, data: bytes) -> None:
        # One PUT: S3 makes an object visible only once it is complete.
        with self._errors("write", path):
            self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=data)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("put_if_absent", path):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=data, IfNoneMatch="*")
                return True
            except ClientError as err:
                if _error_code(err) in ("PreconditionFailed", "412"):
                    return False
                raise

    def _check_access(self) -> None:
        with self._errors("open", ""):
            self.client.head_bucket(Bucket=self.bucket)

    def _explain(self, err: Exception, op: str, path: str) -> StorageError:
        where = f"{self.uri(path)} at endpoint {self.options.endpoint_name}"
        text = _one_line(f"{type(err).__name__}: {err}")  # a credential_process's stderr may span lines
        if _is_credential_failure(err):
            return StorageError(f"cannot get AWS credentials ({_who(self.options)}) for {where} during {op}: {text}")
        if _is_access_denied(err, text):
            return StorageError(
                f"access denied to {where} during {op}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or {_who(self.options)} ({text})"
            )
        if _is_unreachable(err, text):
            return StorageError(f"cannot reach S3 endpoint {self.options.endpoint_name} during {op} of {self.uri(path)}: {text}")
        if _error_code(err) in ("NoSuchBucket", "404") and op == "open":
            return StorageError(f"bucket {self.bucket!r} does not exist at endpoint {self.options.endpoint_name}")
        return StorageError(f"{op} failed for {where}: {text}")


def _unpickle_s3_storage(uri: str, options: S3Options) -> S3Storage:
    return S3Storage(uri, options, _connection=_shared_connection(options))


class _S3Connection:
    """A boto3 client and a pyarrow filesystem over ONE botocore credentials object.

    Refreshable credentials (SSO, credential_process, web identity, container, instance metadata,
    assumed roles) renew themselves inside botocore when asked within 15 minutes of expiring; the
    boto3 client asks on every request, and `s3fs()` on every filesystem call. pyarrow's
    S3FileSystem takes fixed keys, so `s3fs()` builds a new one when the keys it gets differ from
    those of the current one. Static keys (AWS_* variables, a profile's keys) never change: one
    S3FileSystem for the connection's life, as before.
    """

    def __init__(self, options: S3Options) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound

        self.options = options
        try:
            session = boto3.Session(profile_name=options.profile)
        except ProfileNotFound as err:
            raise StorageError(f"AWS profile {options.profile!r} (s3.profile) not found: {err}") from err
        config = Config(
            region_name=options.region,
            connect_timeout=options.connect_timeout_s,
            read_timeout=options.request_timeout_s,
            retries={"max_attempts": options.max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if options.endpoint_url else None,
            signature_version=UNSIGNED if options.anonymous else None,
        )
        self.credentials: Any = None  # botocore Credentials / RefreshableCredentials; None = anonymous
        if not options.anonymous:
            try:
                self.credentials = session.get_credentials()
            except Exception as err:  # a failing credential_process, SSO token expired, STS refusing, ...
                raise StorageError(
                    f"cannot get AWS credentials ({_who(options)}) for S3 endpoint {options.endpoint_name}: "
                    + _one_line(f"{type(err).__name__}: {err}")
                ) from err
            if self.credentials is None:
                raise StorageError(
                    f"no AWS credentials found for S3 endpoint {options.endpoint_name}: set "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile (s3.profile / AWS_PROFILE)"
                )
        # The session caches this same credentials object and hands it to the client.
        self.client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
        self._lock = threading.Lock()
        # (the ReadOnlyCredentials it was built with, the filesystem): swapped as one tuple, so a
        # reader never pairs one filesystem with another's keys.
        self._current: tuple[Any, pafs.S3FileSystem] | None = None
        if options.anonymous:
            self._current = (None, _native_s3fs(options, None))
        self.fs = pafs.PyFileSystem(_RefreshingS3Handler(options, self))

    def s3fs(self) -> pafs.S3FileSystem:
        """A native S3FileSystem signing with the credentials valid now."""
        if self.credentials is None:
            return self._current[1]
        frozen = self.credentials.get_frozen_credentials()  # refreshes when due; cheap otherwise
        current = self._current
        if current is not None and current[0] == frozen:
            return current[1]
        with self._lock:
            current = self._current
            if current is None or current[0] != frozen:
                current = (frozen, _native_s3fs(self.options, frozen))
                self._current = current
            return current[1]


def _native_s3fs(options: S3Options, frozen: Any) -> pafs.S3FileSystem:
    """frozen: botocore ReadOnlyCredentials, or None for anonymous access. Never pickle the result."""
    if frozen is None:
        kwargs: dict[str, Any] = {"anonymous": True}
    else:
        kwargs = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(
        region=options.region,
        connect_timeout=options.connect_timeout_s,
        request_timeout=options.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        **kwargs,
    )


_SHARED: dict[tuple, _S3Connection] = {}
_SHARED_LOCK = threading.Lock()


def _shared_connection(options: S3Options) -> _S3Connection:
    """The connection unpickled Storages and filesystems of this process share.

    Ray deserialises a task's filesystem for every task: resolving credentials each time would run a
    credential_process, or call STS for web identity, once per task. The key holds the pid (a forked
    child builds its own client) and a digest of the AWS_* variables (other variables, other chain).
    """
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = (os.getpid(), astuple(options), hashlib.sha256(repr(env).encode()).hexdigest())
    with _SHARED_LOCK:
        connection = _SHARED.get(key)
        if connection is None:
            connection = _SHARED[key] = _S3Connection(options)
        return connection


class _RefreshingS3Handler(pafs.FileSystemHandler):
    """The pyarrow filesystem behind S3Storage.fs: every call goes to the connection's current
    S3FileSystem. Files it opens are native pyarrow files, so reads and writes do not pass through
    Python; an open file keeps the keys it was opened with (botocore renews 10-15 minutes ahead of
    expiry, so a file open for less than that is safe).

    It pickles as its S3Options alone: a pyarrow S3FileSystem built with keys pickles them (Ray would
    ship them in every task's arguments); this resolves them where it is unpickled, on first use.
    """

    def __init__(self, options: S3Options, connection: _S3Connection | None = None) -> None:
        self._options = options
        self._connection = connection

    def __reduce__(self) -> tuple:
        return (_RefreshingS3Handler, (self._options,))

    def _fs(self) -> pafs.S3FileSystem:
        if self._connection is None:
            self._connection = _shared_connection(self._options)
        return self._connection.s3fs()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RefreshingS3Handler) and other._options == self._options

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(astuple(self._options))

    def get_type_name(self) -> str:
        return "s3-refreshing"

    def normalize_path(self, path: str) -> str:
        return self._fs().normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._fs().get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._fs().get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs().create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs().delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs().delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._fs().delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self._fs().delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs().move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._fs().copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._fs().open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._fs().open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self._fs().open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self._fs().open_append_stream(path, metadata=metadata)


def _who(options: S3Options) -> str:
    return f"profile {options.profile!r}" if options.profile else "profile (AWS_PROFILE)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_code(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}
# What pyarrow's AWS SDK puts in its OSError text for the same conditions.
_DENIED_TEXT = (
    "ACCESS_DENIED",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "HTTP response code: 403",
    "AccessDenied",
)
_UNREACHABLE_TEXT = ("NETWORK_CONNECTION", "curlCode: 7", "Couldn't connect", "Could not connect", "Connection refused")


def _is_access_denied(err: Exception, text: str) -> bool:
    return _error_code(err) in _DENIED_CODES or any(t in text for t in _DENIED_TEXT)


def _is_credential_failure(err: Exception) -> bool:
    """botocore could not load or refresh credentials (a failing credential_process, an expired SSO login, ...)."""
    from botocore import exceptions as bx

    return isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                            bx.TokenRetrievalError, bx.SSOError, bx.RefreshWithMFAUnsupportedError))


def _is_unreachable(err: Exception, text: str) -> bool:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    if isinstance(err, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
        return True
    return any(t in text for t in _UNREACHABLE_TEXT)


def _is_tmp(rel: str) -> bool:
    name = posixpath.basename(rel)
    return name.startswith(".") and name.endswith(".tmp")
