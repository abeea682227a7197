"""One storage abstraction over local directories and `s3://bucket/prefix` URIs.

All paths passed to a `Storage` are relative to its root, with `/` separators. Byte-sized
metadata (manifests, markers) goes through `write_bytes`, which readers never see half-written;
large data goes through pyarrow (`write_parquet`, `open_output`), whose output becomes
visible only through a manifest that lists it (see `pipelines.manifest`). Object stores have no
atomic rename, so nothing here relies on one.

Credentials are never fields of any config: on S3 they come from boto3's credential chain (the
AWS_* environment variables or a named profile) and are handed to pyarrow in memory only.
"""

from __future__ import annotations

import abc
import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
        """`ray.data.read_parquet(**storage.ray_read_args(files))` reads exactly these files."""
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
    def __init__(self, uri: str, options: S3Options) -> None:
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"s3 uri {uri!r} has no bucket: use s3://bucket/prefix")
        self.options = options
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        self.client, self.fs = _connect(options)
        if options.check_on_open:
            self._check_access()

    def __repr__(self) -> str:
        return f"S3Storage({self.uri('')!r}, endpoint={self.options.endpoint_name!r})"

    def __reduce__(self) -> tuple:
        # Clients do not pickle; the receiving process (e.g. a Ray worker) resolves its own
        # credentials through the same chain, so no secret travels inside the pickle.
        return (S3Storage, (self.uri(""), self.options))

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
        text = f"{type(err).__name__}: {err}"
        if _is_access_denied(err, text):
            who = f"profile {self.options.profile!r}" if self.options.profile else "profile (AWS_PROFILE)"
            return StorageError(
                f"access denied to {where} during {op}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or {who} ({text})"
            )
        if _is_unreachable(err, text):
            return StorageError(f"cannot reach S3 endpoint {self.options.endpoint_name} during {op} of {self.uri(path)}: {text}")
        if _error_code(err) in ("NoSuchBucket", "404") and op == "open":
            return StorageError(f"bucket {self.bucket!r} does not exist at endpoint {self.options.endpoint_name}")
        return StorageError(f"{op} failed for {where}: {text}")


def _connect(options: S3Options) -> tuple[Any, pafs.S3FileSystem]:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from botocore.exceptions import ProfileNotFound

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
    client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
    fs_kwargs: dict[str, Any] = {"anonymous": True}
    if not options.anonymous:
        creds = session.get_credentials()
        if creds is None:
            raise StorageError(
                f"no AWS credentials found for S3 endpoint {options.endpoint_name}: set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile (s3.profile / AWS_PROFILE)"
            )
        frozen = creds.get_frozen_credentials()
        fs_kwargs = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
    if options.endpoint_url:
        parsed = urlparse(options.endpoint_url)
        fs_kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    fs = pafs.S3FileSystem(
        region=options.region,
        connect_timeout=options.connect_timeout_s,
        request_timeout=options.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        **fs_kwargs,
    )
    return client, fs


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


def _is_unreachable(err: Exception, text: str) -> bool:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    if isinstance(err, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
        return True
    return any(t in text for t in _UNREACHABLE_TEXT)


def _is_tmp(rel: str) -> bool:
    name = posixpath.basename(rel)
    return name.startswith(".") and name.endswith(".tmp")
