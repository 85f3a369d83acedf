"""The urandom gRPC entropy server as a separate process (``qr-sampler serve``),
so engine tests can kill it and bring it back like a real outage."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class EntropyServerProcess:
    """``qr-sampler serve --source urandom`` on a unix socket or 127.0.0.1 port."""

    def __init__(
        self,
        address: str,
        log_path: Path,
        extra: list[str] | None = None,
        count_file: Path | None = None,
    ) -> None:
        self.address = address
        self.log_path = log_path
        self.extra = list(extra or [])
        self.count_file = count_file
        self.proc: subprocess.Popen[bytes] | None = None

    def requests_served(self) -> int:
        """Entropy requests seen by the counting server (``count_file`` mode)."""
        assert self.count_file is not None
        if not self.count_file.exists():
            return 0
        return len(self.count_file.read_text().splitlines())

    def start(self, timeout: float = 60.0) -> EntropyServerProcess:
        if self.address.startswith("unix://"):
            with contextlib.suppress(FileNotFoundError):
                Path(self.address[len("unix://") :]).unlink()
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QR_")}
        if self.count_file is not None:
            env["QRSAMPLER_COUNT_FILE"] = str(self.count_file)
            cmd = [sys.executable, str(Path(__file__).with_name("support_counting_server.py"))]
        else:
            cmd = [sys.executable, "-m", "qr_sampler.cli", "serve", "--source", "urandom"]
        self.proc = subprocess.Popen(
            [*cmd, "--address", self.address, *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"entropy server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    stub = health_pb2_grpc.HealthStub(ch)
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"entropy server not SERVING after {timeout}s")

    def kill(self) -> None:
        """Abrupt outage: SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
