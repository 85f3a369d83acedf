"""The reusable entropy server, its CLI, the example servers and the systemd unit,
exercised through real gRPC clients on 127.0.0.1 and unix sockets."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support_grpc import REPO, ServerProcess, entropy_server, health_status, wait_for

from qr_sampler.cli import build_parser
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
from qr_sampler.entropy.health import HealthMonitor
from qr_sampler.proto import SERVICE_NAME, entropy_pb2, entropy_pb2_grpc
from qr_sampler.server.healthcheck import main as healthcheck_main

KEY = "server-side-secret"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qrs-") as d:
        yield Path(d)


def stub(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    return channel, entropy_pb2_grpc.EntropyServiceStub(channel)


class Recorder:
    """A generate() that records every call (to prove just-in-time generation)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.zeros = False

    def __call__(self, n: int) -> bytes:
        self.calls.append((n, time.time_ns()))
        return bytes(n) if self.zeros else os.urandom(n)


# ---------------------------------------------------------------------------
# protocol behaviour (generated stubs as the client: what any client sees)


def test_generates_on_request_and_stamps_each_reply() -> None:
    gen = Recorder()
    with entropy_server(gen, device_id="dev-7", stream_chunk_bytes=1000) as server:
        channel, s = stub(server.address)
        with channel:
            assert gen.calls == []  # nothing generated ahead of a request
            before = time.time_ns()
            reply = s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=321, sequence_id=99))
            assert len(reply.data) == 321 and reply.sequence_id == 99
            assert reply.device_id == "dev-7"
            assert before <= gen.calls[0][1] <= reply.generation_timestamp_ns <= time.time_ns()
            assert gen.calls == [(321, gen.calls[0][1])]

            replies = list(
                s.StreamEntropy(
                    iter(
                        [entropy_pb2.EntropyRequest(bytes_needed=n, sequence_id=n) for n in (5, 7)]
                    )
                )
            )
            assert [(len(r.data), r.sequence_id) for r in replies] == [(5, 5), (7, 7)]

            parts = list(
                s.ServerStreamEntropy(entropy_pb2.EntropyRequest(bytes_needed=2500, sequence_id=3))
            )
            assert [len(p.data) for p in parts] == [1000, 1000, 500]
            assert {p.sequence_id for p in parts} == {3}
            stamps = [p.generation_timestamp_ns for p in parts]
            assert stamps == sorted(stamps)
            assert [n for n, _ in gen.calls] == [321, 5, 7, 1000, 1000, 500]


def test_a_reply_is_stamped_when_its_bytes_were_generated() -> None:
    """The generation timestamp is taken as the generator returns, before the
    server's health tests of those bytes run (their start is recorded by
    wrapping the real monitor's check: the tests themselves run unchanged)."""
    gen = Recorder()
    with entropy_server(gen) as server:
        assert server.monitor is not None  # health tests on by default
        checked: list[int] = []
        real = server.monitor.check

        def check(data: bytes | memoryview) -> str | None:
            checked.append(time.time_ns())
            return real(data)

        server.monitor.check = check  # type: ignore[method-assign]
        channel, s = stub(server.address)
        with channel:
            for n in (20_480, 64):
                reply = s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=n, sequence_id=1))
                assert len(reply.data) == n
                assert gen.calls[-1][1] <= reply.generation_timestamp_ns <= checked[-1]


def test_limits_have_clear_messages() -> None:
    with entropy_server(max_bytes=1000, max_streams=2) as server:
        channel, s = stub(server.address)
        with channel:
            for n in (0, -5, 1001):
                with pytest.raises(grpc.RpcError) as info:
                    s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=n))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == (
                    f"bytes_needed must be between 1 and 1000 (this server's per-request cap); "
                    f"got {n}"
                )
            # inside a stream too
            with pytest.raises(grpc.RpcError) as info:
                list(s.StreamEntropy(iter([entropy_pb2.EntropyRequest(bytes_needed=2000)])))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # two streams open (held by request queues), the third is refused
            import queue

            queues: list[queue.Queue[Any]] = []
            calls = []
            for _ in range(2):
                q: queue.Queue[Any] = queue.Queue()
                queues.append(q)
                call = s.StreamEntropy(iter(q.get, None))
                q.put(entropy_pb2.EntropyRequest(bytes_needed=1, sequence_id=1))
                assert len(next(call).data) == 1  # the stream is really open
                calls.append(call)
            with pytest.raises(grpc.RpcError) as info:
                list(s.StreamEntropy(iter([entropy_pb2.EntropyRequest(bytes_needed=1)])))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many concurrent streams: this server allows 2" in info.value.details()
            for q in queues:
                q.put(None)
            for call in calls:
                assert list(call) == []
            # once closed, streams are accepted again
            assert wait_for(lambda: server._active_streams == 0)
            out = list(s.StreamEntropy(iter([entropy_pb2.EntropyRequest(bytes_needed=4)])))
            assert len(out[0].data) == 4
    assert server.counters["rejected:streams"] == 1
    assert server.counters["rejected:size"] == 4


def test_api_key_is_checked_and_health_stays_open() -> None:
    with entropy_server(api_key=KEY, api_key_header="x-key") as server:
        channel, s = stub(server.address)
        with channel:
            req = entropy_pb2.EntropyRequest(bytes_needed=8, sequence_id=1)
            for metadata, why in (
                ((), "missing API key"),
                ((("x-key", "nope"),), "invalid API key"),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    s.GetEntropy(req, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert why in info.value.details() and KEY not in info.value.details()
                with pytest.raises(grpc.RpcError) as info:
                    list(s.StreamEntropy(iter([req]), metadata=metadata))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(s.GetEntropy(req, metadata=(("x-key", KEY),)).data) == 8
        assert health_status(server.address) == "SERVING"  # no key needed
        assert KEY not in repr(server.options)


def test_generic_health_check_and_watch() -> None:
    healthy = threading.Event()
    healthy.set()
    with entropy_server(is_healthy=healthy.is_set, health_poll_s=0.05) as server:
        assert health_status(server.address) == "SERVING"
        assert health_status(server.address, SERVICE_NAME) == "SERVING"
        assert health_status(server.address, "no.such.Service") == "ERROR:NOT_FOUND"
        channel = grpc.insecure_channel(server.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        healthy.clear()  # the device says it is unwell
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.address, SERVICE_NAME) == "NOT_SERVING"
        healthy.set()
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        channel.close()


def test_device_failing_health_tests_is_not_served() -> None:
    gen = Recorder()
    gen.zeros = True
    with entropy_server(gen) as server:
        channel, s = stub(server.address)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=4096, sequence_id=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "repetition count test failed" in info.value.details()
            assert health_status(server.address) == "NOT_SERVING"
            gen.zeros = False  # device back to normal: the next good block restores it
            assert len(s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=4096)).data) == 4096
            assert health_status(server.address) == "SERVING"
    assert server.counters["failed:health_rct"] == 1


def test_large_replies_in_flight_arrive_before_a_later_error() -> None:
    """Large replies are sent while the next one is generated: a failure of a later
    request (bad size, health test) still reaches the client only after every
    earlier reply, and the stamps stay in generation order."""
    big = 300_000  # above the server's pipelining threshold
    gen = Recorder()
    with entropy_server(gen, max_bytes=big, stream_chunk_bytes=100_000) as server:
        channel, s = stub(server.address)
        with channel:
            requests = [entropy_pb2.EntropyRequest(bytes_needed=big, sequence_id=i) for i in (1, 2)]
            requests.append(entropy_pb2.EntropyRequest(bytes_needed=big + 1, sequence_id=3))
            got = []
            with pytest.raises(grpc.RpcError) as info:
                for reply in s.StreamEntropy(iter(requests)):
                    got.append((len(reply.data), reply.sequence_id, reply.generation_timestamp_ns))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [g[:2] for g in got] == [(big, 1), (big, 2)]
            assert got[0][2] <= got[1][2]

            # the device turns bad after the first message of a server stream
            class TurnsBad(Recorder):
                def __call__(self, n: int) -> bytes:
                    self.zeros = len(self.calls) >= 1
                    return super().__call__(n)

            server._generate = TurnsBad()
            sizes = []
            with pytest.raises(grpc.RpcError) as info:
                for part in s.ServerStreamEntropy(
                    entropy_pb2.EntropyRequest(bytes_needed=big, sequence_id=4)
                ):
                    sizes.append(len(part.data))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert sizes == [100_000]  # the good message was delivered, the bad one never
    assert server.counters["failed:health_rct"] == 1


def test_generator_errors_and_wrong_lengths_are_reported() -> None:
    def broken(n: int) -> bytes:
        raise OSError("device unplugged")

    with entropy_server(broken) as server:
        channel, s = stub(server.address)
        with channel, pytest.raises(grpc.RpcError) as info:
            s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=4))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "device unplugged" in info.value.details()
    with entropy_server(lambda n: b"x") as server:
        channel, s = stub(server.address)
        with channel, pytest.raises(grpc.RpcError) as info:
            s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=4))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "returned 1 bytes for a request of 4" in info.value.details()


def test_async_generate_is_awaited() -> None:
    async def agen(n: int) -> bytes:
        return os.urandom(n)

    with entropy_server(agen) as server:  # type: ignore[arg-type]
        channel, s = stub(server.address)
        with channel:
            assert len(s.GetEntropy(entropy_pb2.EntropyRequest(bytes_needed=9)).data) == 9


def test_reflection_answers_a_generic_client() -> None:
    with entropy_server(api_key=KEY) as server:  # reflection needs no key
        channel = grpc.insecure_channel(server.address)
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName(SERVICE_NAME)
        assert {m.name for m in service.methods} == {
            "GetEntropy",
            "StreamEntropy",
            "ServerStreamEntropy",
        }
        response = pool.FindMessageTypeByName("qr_entropy.EntropyResponse")
        assert [(f.name, f.number) for f in response.fields] == [
            ("data", 1),
            ("sequence_id", 2),
            ("generation_timestamp_ns", 3),
            ("device_id", 4),
        ]
        channel.close()


def test_unix_socket_mode() -> None:
    with tempfile.TemporaryDirectory(prefix="qrs-") as d:
        path = Path(d) / "sub" / "e.sock"
        with entropy_server(address=f"unix://{path}", socket_mode=0o660) as server:
            assert oct(path.stat().st_mode & 0o777) == oct(0o660)
            assert health_status(server.address) == "SERVING"


def test_options_are_validated() -> None:
    from qr_sampler.server import ServerOptions

    with pytest.raises(ValueError, match="max_bytes"):
        ServerOptions(max_bytes=0)
    with pytest.raises(ValueError, match="TLS"):
        ServerOptions(tls_cert_file="x")
    with pytest.raises(ValueError, match="client CA"):
        ServerOptions(tls_client_ca_file="ca.pem")


# ---------------------------------------------------------------------------
# the command line, as a process


def test_serve_cli_lists_flags_and_rejects_bad_ones(tmp_path: Path) -> None:
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for flag in ("--source", "--address", "--api-key-env", "--api-key-file", "--max-bytes",
                 "--max-streams", "--device-id", "--tls-cert", "--tls-key"):  # fmt: skip
        assert flag in help_text
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    run = [sys.executable, "-m", "qr_sampler.server", "--address", "127.0.0.1:0"]
    out = subprocess.run(
        [*run, "--api-key-env", "NOT_SET_ANYWHERE"], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--api-key-env: environment variable NOT_SET_ANYWHERE is empty" in out.stderr
    out = subprocess.run([*run, "--source", "quantum"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = subprocess.run(
        [*run, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "k")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--tls-cert: no such file" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_on_signals(sig: int, sock_dir: Path) -> None:
    (sock_dir / "key").write_text(KEY + "\n")
    proc = ServerProcess(
        ["--api-key-file", str(sock_dir / "key"), "--max-bytes", "4096"],
        address=f"unix://{sock_dir}/e.sock",
    ).start()
    try:
        s = QuantumGrpcSource(
            proc.address,
            api_key=KEY,
            max_bytes_per_request=4096,
            breaker=CircuitBreaker(BreakerConfig(min_timeout_s=10, max_timeout_s=20)),
        )
        assert [len(c.data) for c in s.fetch([5000, 3000])] == [5000, 3000]
        s.close()
        assert proc.signal(sig) == 0
        log = "".join(proc.log)
        assert "qr-entropy server stopped" in log and KEY not in log
        assert "api key required" in log
    finally:
        proc.stop_kill()


def test_healthcheck_cli(sock_dir: Path, capsys: Any) -> None:
    with entropy_server(address=f"unix://{sock_dir}/h.sock") as server:
        assert healthcheck_main([server.address]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
    assert healthcheck_main([f"unix://{sock_dir}/h.sock", "--timeout", "1"]) == 1
    assert capsys.readouterr().out.startswith("ERROR")


@pytest.mark.parametrize(
    "script", ["simple_urandom_server.py", "timing_noise_server.py", "qrng_template_server.py"]
)
def test_example_servers_serve(script: str, sock_dir: Path) -> None:
    proc = ServerProcess(
        ["--max-bytes", "2048"],
        address=f"unix://{sock_dir}/x.sock",
        script=str(REPO / "examples" / "servers" / script),
    ).start()
    try:
        s = QuantumGrpcSource(
            proc.address,
            mode="unary",
            max_bytes_per_request=2048,
            health=HealthMonitor(),
            breaker=CircuitBreaker(BreakerConfig(min_timeout_s=20, max_timeout_s=30)),
        )
        chunks = s.fetch([3000])
        assert len(chunks[0].data) == 3000 and chunks[0].health == "ok"
        if script.startswith("qrng"):
            assert chunks[0].device_id == "TEMPLATE-os.urandom-not-a-qrng"
            assert "fill in MyQRNG first" in "".join(proc.log)
        s.close()
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.stop_kill()


# ---------------------------------------------------------------------------
# systemd


def expand_like_systemd(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ``${VAR}`` is one word, ``$VAR`` splits on spaces."""
    words: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words.extend(env.get(whole.group(1), "").split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


def test_systemd_unit_verifies_and_its_command_runs(tmp_path: Path, sock_dir: Path) -> None:
    unit_dir = REPO / "examples" / "systemd"
    unit = (unit_dir / "qr-entropy-server.service").read_text()
    env_text = (unit_dir / "qr-entropy-server.env").read_text()
    for text in (unit, env_text):  # no shell-only ${VAR:-default} in effective lines
        live = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in live if re.search(r"\$\{\w+:[-=+?]", ln)]
    env = dict(
        line.split("=", 1)
        for line in env_text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    assert exec_start
    used = set(re.findall(r"\$\{?(\w+)\}?", exec_start.group(1)))
    assert used <= set(env), f"ExecStart uses variables the env file lacks: {used - set(env)}"
    assert "RuntimeDirectory=qr-entropy" in unit
    assert "/run/qr-entropy/" in env["ENTROPY_SERVER_ADDRESS"]

    # systemd-analyze verify, with the venv path of this checkout (the unit's
    # /opt/qr-sampler/venv does not exist here) and warnings counted as failures
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd"
    venv_bin = Path(sys.executable).parent
    local = unit.replace("/opt/qr-sampler/venv/bin", str(venv_bin)).replace(
        "/etc/qr-sampler/qr-entropy-server.env", str(unit_dir / "qr-entropy-server.env")
    )
    target = tmp_path / "qr-entropy-server.service"
    target.write_text(local)
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(target)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr

    # the command line, expanded as systemd would, starts a working server
    env["ENTROPY_SERVER_ADDRESS"] = f"unix://{sock_dir}/entropy.sock"
    argv = expand_like_systemd(exec_start.group(1), env)
    assert argv[0].endswith("/qr-sampler") and argv[1] == "serve"
    address = argv[argv.index("--address") + 1]
    proc = ServerProcess(
        argv[2 : argv.index("--address")] + argv[argv.index("--address") + 2 :], address=address
    ).start()
    try:
        assert health_status(proc.address) == "SERVING"
        assert oct(Path(address[len("unix://") :]).stat().st_mode & 0o777) == oct(0o660)
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.stop_kill()


# ---------------------------------------------------------------------------
# load


def test_load_32_bidi_streams(capsys: Any) -> None:
    """Acceptance: 32 concurrent bidi streams x 500 requests x 20,480 bytes against
    one server process — zero errors, every byte count exact. Prints the server's
    peak RSS. Count-bounded, not timed. Health tests run on both sides with
    alpha = 2^-40 (RCT cutoff 8), so a false alarm over these 328 MB has
    probability below 1e-8."""
    streams, requests, size = 32, 500, 20480
    proc = ServerProcess(["--health-alpha-log2", "40"]).start()
    try:
        sources = [
            QuantumGrpcSource(
                proc.address,
                mode="bidi_streaming",
                health=HealthMonitor(alpha_log2=40),
                breaker=CircuitBreaker(BreakerConfig(min_timeout_s=30, max_timeout_s=60)),
            )
            for _ in range(streams)
        ]
        errors: list[BaseException] = []
        received = [0] * streams
        exact = [0] * streams

        def run(i: int) -> None:
            try:
                for _ in range(requests):
                    chunk = sources[i].fetch([size])[0]
                    received[i] += len(chunk.data)
                    exact[i] += len(chunk.data) == size and not chunk.fallback
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.perf_counter() - started
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[:3]
        assert exact == [requests] * streams
        assert received == [requests * size] * streams
        assert all(s.counters["ok"] == requests for s in sources)
        rss_mib = proc.peak_rss_kib() / 1024
        total_mb = streams * requests * size / 1e6
        with capsys.disabled():
            print(
                f"\nload: {streams} bidi streams x {requests} x {size} B = {total_mb:.0f} MB "
                f"in {elapsed:.1f} s ({total_mb / elapsed:.0f} MB/s); "
                f"server peak RSS {rss_mib:.0f} MiB"
            )
        assert rss_mib < 1024
        for s in sources:
            s.close()
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.stop_kill()
