"""Real gRPC servers for the entropy tests, all on 127.0.0.1 or unix sockets.

* :func:`entropy_server` — the package's reusable :class:`EntropyServer`,
  in-process, on a shared asyncio loop thread;
* :class:`ServerProcess` — ``qr-sampler serve`` (or an example script) as a
  child process that can be killed with SIGKILL and restarted;
* :class:`FaultyServer` — speaks ``qr_entropy.EntropyService`` but misbehaves
  on demand (short, empty, oversized, malformed replies, wrong sequence id,
  all-zero bytes, stalls);
* :class:`ForeignServer` — a "firefly-style" appliance with its own proto
  (``qrng.QuantumRNG/GetRandomBytes``), compiled by grpcio-tools at test time;
* :func:`make_certs` — a CA, a server and a client certificate (openssl).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qr_sampler.proto import SERVICE_NAME, entropy_pb2
from qr_sampler.server import EntropyServer, ServerOptions

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# one asyncio loop thread hosts every in-process server of the test session


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="grpc-loop")
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


_LOOP: _LoopThread | None = None


def loop_thread() -> _LoopThread:
    global _LOOP
    if _LOOP is None:
        _LOOP = _LoopThread()
    return _LOOP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_address() -> str:
    return "127.0.0.1:0"


@contextlib.contextmanager
def entropy_server(
    generate: Callable[[int], bytes] = os.urandom,
    *,
    is_healthy: Callable[[], bool] | None = None,
    **options: Any,
) -> Iterator[EntropyServer]:
    """The package's server, in-process; ``server.address`` is the bound address."""
    options.setdefault("address", tcp_address())
    options.setdefault("offload", False)
    server = EntropyServer(
        generate, ServerOptions(**options), is_healthy=is_healthy, source_name="test"
    )
    lt = loop_thread()
    lt.run(server.start())
    try:
        yield server
    finally:
        lt.run(server.stop(0))


def health_status(address: str, service: str = "", **tls: bytes) -> str:
    """What a generic client sees from grpc.health.v1.Health/Check."""
    if tls:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(**tls))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError as exc:
            return f"ERROR:{exc.code().name}"  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_for(predicate: Callable[[], bool], tries: int = 400, pause: float = 0.05) -> bool:
    """Poll ``predicate`` a bounded number of times (never a timed assertion)."""
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(pause)
    return False


# ---------------------------------------------------------------------------
# the server as a separate process


class ServerProcess:
    """``qr-sampler serve`` or an example script as a child process.

    With a TCP address ending in ``:0`` the bound port is read from the
    server's log line ``listening on HOST:PORT``.
    """

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        address: str = "127.0.0.1:0",
        script: str | None = None,
        python: str = sys.executable,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.requested = address
        self.address = address
        self.args = list(args or [])
        self.script = script
        self.python = python
        self.prefix = prefix
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        """``prefix`` (e.g. ``[".../qr-sampler", "serve"]``), else ``python script``,
        else ``python -m qr_sampler.cli serve``; then ``--address`` and ``args``."""
        if self.prefix is not None:
            head = list(self.prefix)
        elif self.script:
            head = [self.python, self.script]
        else:
            head = [self.python, "-m", "qr_sampler.cli", "serve"]
        return [*head, "--address", self.requested, *self.args]

    def start(self, tries: int = 2400) -> ServerProcess:
        env = {k: v for k, v in (self.env or os.environ).items() if not k.startswith("QR_")}
        self.log = []
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        bound = wait_for(self._bound, tries=tries)
        if not bound:
            self.stop_kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        if not wait_for(lambda: health_status(self.address) == "SERVING", tries=tries):
            self.stop_kill()
            raise RuntimeError("server not SERVING:\n" + "".join(self.log))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if self.log_path is not None:
                with self.log_path.open("a") as fh:
                    fh.write(line)

    def _bound(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("server exited early:\n" + "".join(self.log))
        for line in list(self.log):
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.address = match.group(1)
                return True
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss_kib(self) -> int:
        """VmHWM of the server process (peak resident set), in KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
        assert match, text
        return int(match.group(1))

    def kill(self) -> None:
        """SIGKILL: the server dies without any goodbye (its PID only)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def signal(self, sig: int) -> int:
        """Send ``sig`` and wait (bounded) for the exit status."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout=60)

    def stop_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_kill()


# ---------------------------------------------------------------------------
# a qr_entropy server that misbehaves on demand

FAULTS = ("ok", "short", "empty", "oversized", "malformed", "wrong_seq", "zeros", "stall")


@dataclass
class FaultyServer:
    """``qr_entropy.EntropyService`` with a switchable ``fault``.

    ``fail_next`` (with ``fault``) applies the fault to that many requests
    only, then behaves. ``stall`` waits until released (at most ``stall_s``).
    Every request seen is counted in ``calls``.
    """

    fault: str = "ok"
    fail_next: int | None = None
    stall_s: float = 10.0
    api_key: str = ""
    address: str = "127.0.0.1:0"
    calls: int = 0
    requests: list[tuple[int, int]] = field(default_factory=list)
    _server: grpc.aio.Server | None = None
    _release: asyncio.Event | None = None

    def _current_fault(self) -> str:
        if self.fail_next is None:
            return self.fault
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fault
        return "ok"

    async def _reply(self, request: Any, context: Any) -> bytes:
        self.calls += 1
        self.requests.append((request.bytes_needed, request.sequence_id))
        if self.api_key:
            sent = dict(context.invocation_metadata()).get("api-key")
            if sent != self.api_key:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        n, seq = request.bytes_needed, request.sequence_id
        fault = self._current_fault()
        data = os.urandom(n)
        if fault == "short":
            data = data[: n - 1]
        elif fault == "empty":
            data = b""
        elif fault == "oversized":
            data = data + b"\x01"
        elif fault == "zeros":
            data = bytes(n)
        elif fault == "malformed":
            return b"\x0a\xff\xff\x03" + data[:8]  # field 1 claims ~64 KB, 8 bytes follow
        elif fault == "wrong_seq":
            seq += 1000
        elif fault == "stall":
            assert self._release is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.stall_s)
        reply = entropy_pb2.EntropyResponse(
            data=data, sequence_id=seq, generation_timestamp_ns=time.time_ns(), device_id="faulty"
        )
        return bytes(reply.SerializeToString())

    async def _unary(self, request: Any, context: Any) -> bytes:
        return await self._reply(request, context)

    async def _bidi(self, requests: Any, context: Any) -> Any:
        async for request in requests:
            yield await self._reply(request, context)

    async def _server_stream(self, request: Any, context: Any) -> Any:
        yield await self._reply(request, context)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        handlers = {
            "GetEntropy": grpc.unary_unary_rpc_method_handler(
                self._unary,
                request_deserializer=entropy_pb2.EntropyRequest.FromString,
                response_serializer=lambda b: b,
            ),
            "StreamEntropy": grpc.stream_stream_rpc_method_handler(
                self._bidi,
                request_deserializer=entropy_pb2.EntropyRequest.FromString,
                response_serializer=lambda b: b,
            ),
            "ServerStreamEntropy": grpc.unary_stream_rpc_method_handler(
                self._server_stream,
                request_deserializer=entropy_pb2.EntropyRequest.FromString,
                response_serializer=lambda b: b,
            ),
        }
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        if self.address.startswith("unix:"):
            server.add_insecure_port(self.address)
        else:
            port = server.add_insecure_port(self.address)
            self.address = f"127.0.0.1:{port}"
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    def release_stalls(self) -> None:
        if self._release is not None:
            loop_thread().loop.call_soon_threadsafe(self._release.set)

    def __enter__(self) -> FaultyServer:
        loop_thread().run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        loop_thread().run(self._stop())


# ---------------------------------------------------------------------------
# a foreign, firefly-style appliance with its own proto

FOREIGN_PROTO = """
syntax = "proto3";
package qrng;

// A QRNG appliance's own protocol: only the field 1s match qr_entropy's.
message RandomRequest {
  uint32 num_bytes = 1;
  string output_format = 2;   // a string where qr_entropy has its sequence id
}

message RandomResponse {
  bytes random_bytes = 1;
  string device_serial = 2;   // other fields, other wire types
  double temperature_c = 3;
  float  laser_power_mw = 4;
  repeated uint32 health_flags = 5;
  fixed64 counter = 6;
  bool ok = 7;
}

service QuantumRNG {
  rpc GetRandomBytes(RandomRequest) returns (RandomResponse);
}
"""

FOREIGN_METHOD = "/qrng.QuantumRNG/GetRandomBytes"
FOREIGN_CAP = 13_312
FOREIGN_KEY_HEADER = "x-api-key"


def compile_foreign_proto(out_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Compile :data:`FOREIGN_PROTO` with grpcio-tools; import its modules."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "qrng.proto").write_text(FOREIGN_PROTO)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{out_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "qrng.proto",
        ]
    )
    assert status == 0, "protoc failed on the foreign proto"
    sys.path.insert(0, str(out_dir))
    try:
        pb2 = importlib.import_module("qrng_pb2")
        pb2_grpc = importlib.import_module("qrng_pb2_grpc")
    finally:
        sys.path.remove(str(out_dir))
    return pb2, pb2_grpc


@dataclass
class ForeignServer:
    """``qrng.QuantumRNG/GetRandomBytes``: unary only, API key required in
    ``x-api-key``, at most 13,312 bytes per request (``INVALID_ARGUMENT`` above)."""

    pb2: ModuleType
    pb2_grpc: ModuleType
    api_key: str = "appliance-secret"
    address: str = "127.0.0.1:0"
    served: list[bytes] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    _server: grpc.aio.Server | None = None

    async def GetRandomBytes(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        sent = dict(context.invocation_metadata()).get(FOREIGN_KEY_HEADER)
        if sent != self.api_key:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "API key required")
        if not 1 <= request.num_bytes <= FOREIGN_CAP:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"num_bytes must be 1..{FOREIGN_CAP}"
            )
        data = os.urandom(request.num_bytes)
        self.served.append(data)
        return self.pb2.RandomResponse(
            random_bytes=data,
            device_serial="FF1-000123",
            temperature_c=31.5,
            laser_power_mw=2.25,
            health_flags=[1, 300, 70000],
            counter=len(self.served),
            ok=True,
        )

    async def _start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.pb2_grpc.add_QuantumRNGServicer_to_server(self, server)
        port = server.add_insecure_port(self.address)
        if not self.address.startswith("unix:"):
            self.address = f"127.0.0.1:{port}"
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def __enter__(self) -> ForeignServer:
        loop_thread().run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        loop_thread().run(self._stop())


# ---------------------------------------------------------------------------
# certificates


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> Certs:
    """A throwaway CA plus server (localhost, 127.0.0.1, ::1) and client certificates."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=qr-sampler test CA")  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "qr-sampler client")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
        run("x509", "-req", "-in", f"{name}.csr", *ca, "-out", f"{name}.pem",
            "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return Certs(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
    )
