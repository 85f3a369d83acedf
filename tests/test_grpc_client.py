"""The ``quantum_grpc`` client against real gRPC servers on 127.0.0.1 and unix sockets.

Servers: the package's own server (in-process or as a child process), a
faulty qr_entropy server and a foreign "firefly-style" appliance (see
``support_grpc``). Nothing is mocked.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support_grpc import (
    FOREIGN_CAP,
    FOREIGN_KEY_HEADER,
    FOREIGN_METHOD,
    Certs,
    FaultyServer,
    ForeignServer,
    ServerProcess,
    compile_foreign_proto,
    entropy_server,
    make_certs,
    wait_for,
)

from qr_sampler.config import load_settings
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.grpc_client import QuantumGrpcSource, check_address, split_sizes
from qr_sampler.entropy.health import HealthMonitor
from qr_sampler.entropy.registry import build_entropy, build_source
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.errors import (
    AuthenticationError,
    ConfigError,
    EntropyReplyError,
    EntropyUnavailableError,
    HealthTestError,
)

MODES = ("unary", "server_streaming", "bidi_streaming")
KEY = "s3cret-key-do-not-log"


def _run_threads(work: Callable[[], None], count: int, timeout_s: float) -> None:
    """Run ``work`` on ``count`` threads at once; every one must end in time."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads)


def patient_breaker(**kw: Any) -> CircuitBreaker:
    """Generous deadlines: the 2-core CI machine is shared, and these tests are
    about correctness, not speed (fault tests set their own)."""
    params: dict[str, Any] = dict(min_timeout_s=10.0, max_timeout_s=20.0)
    params.update(kw)
    return CircuitBreaker(BreakerConfig(**params))


def source(address: str, mode: str = "bidi_streaming", **kw: Any) -> QuantumGrpcSource:
    kw.setdefault("breaker", patient_breaker())
    kw.setdefault("health", HealthMonitor())
    return QuantumGrpcSource(address, mode=mode, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return compile_foreign_proto(tmp_path_factory.mktemp("foreign"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths must stay short (108 bytes): pytest's tmp_path can be too long
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qrg-") as d:
        yield Path(d)


# ---------------------------------------------------------------------------
# pure helpers


def test_split_sizes_fewest_requests_even_sizes() -> None:
    assert split_sizes(20480, 13312) == [10240, 10240]
    assert split_sizes(13312, 13312) == [13312]
    assert split_sizes(10, 3) == [3, 3, 2, 2]
    assert split_sizes(1, 1_000_000) == [1]


def test_address_validation_names_the_setting() -> None:
    for ok in ("localhost:50051", "127.0.0.1:1", "[::1]:50051", "unix:///tmp/x.sock", "dns:///h:1"):
        assert check_address(ok) == ok
    for bad in ("localhost", "host:0", "host:70000", "unix:", "", "http://x:1"):
        with pytest.raises(ConfigError, match="QR_GRPC_SERVER_ADDRESS"):
            check_address(bad)


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QR_GRPC_MODE"):
        QuantumGrpcSource("h:1", mode="carrier_pigeon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="QR_GRPC_METHOD_PATH"):
        QuantumGrpcSource("h:1", method_path="GetEntropy")
    with pytest.raises(ConfigError, match="QR_GRPC_TLS_CA_FILE"):
        QuantumGrpcSource("h:1", tls_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="together"):
        QuantumGrpcSource("h:1", tls_cert_file=str(tmp_path))


def test_nothing_connects_until_the_first_fetch() -> None:
    s = QuantumGrpcSource("127.0.0.1:9")  # nothing listens there
    assert s._channel is None
    s.close()


def test_empty_stream_path_falls_back_to_unary() -> None:
    s = QuantumGrpcSource("127.0.0.1:9", mode="bidi_streaming", stream_method_path="")
    assert s.mode == "unary" and s.method_path == "/qr_entropy.EntropyService/GetEntropy"


# ---------------------------------------------------------------------------
# every mode x transport x security, against the package's server

SECURITY = ("plain", "api_key", "tls", "mtls_api_key")


@pytest.mark.parametrize("security", SECURITY)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("mode", MODES)
def test_modes_transports_security(
    mode: str, transport: str, security: str, certs: Certs, sock_dir: Path
) -> None:
    server_opts: dict[str, Any] = {"max_bytes": 13312, "stream_chunk_bytes": 4096}
    client_opts: dict[str, Any] = {"max_bytes_per_request": 13312}
    if transport == "unix":
        server_opts["address"] = f"unix://{sock_dir}/e.sock"
    if "api_key" in security:
        server_opts["api_key"] = KEY
        client_opts["api_key"] = KEY
    if "tls" in security:
        server_opts.update(tls_cert_file=str(certs.server_cert), tls_key_file=str(certs.server_key))
        client_opts["tls_ca_file"] = str(certs.ca)
    if security.startswith("mtls"):
        server_opts["tls_client_ca_file"] = str(certs.ca)
        client_opts.update(tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    address_for_client = None
    with entropy_server(**server_opts) as server:
        address_for_client = server.address
        if "tls" in security and transport == "tcp":
            address_for_client = server.address.replace("127.0.0.1", "localhost")
        s = source(address_for_client, mode, **client_opts)
        try:
            started = time.time_ns()
            chunks = s.fetch([20480, 20480, 100])
            assert [len(c.data) for c in chunks] == [20480, 20480, 100]
            assert len({c.data[:64] for c in chunks}) == 3
            for c in chunks:
                assert c.source == "quantum_grpc" and not c.fallback
                assert c.device_id.startswith("test@")
                assert c.health == "ok"
                assert c.generation_timestamp_ns >= started
                assert c.sequence_id >= 1
            # 41,060 bytes under a 13,312 cap: 4 requests, sequence ids 1..4
            assert s.counters["requests"] == 4
            assert [c.sequence_id for c in chunks] == [1, 2, 4]
            assert server.counters["bytes"] == 41060
            more = s.fetch([777])
            assert len(more[0].data) == 777
            if mode == "bidi_streaming":
                assert server.counters["streams"] == 1  # one persistent stream
        finally:
            s.close()


def test_api_key_wrong_or_missing_is_an_authentication_error(caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    with entropy_server(api_key=KEY) as server:
        for mode in MODES:
            for key in ("wrong-key", ""):
                s = source(server.address, mode, api_key=key)
                with pytest.raises(AuthenticationError) as info:
                    s.fetch([64])
                assert "UNAUTHENTICATED" in str(info.value)
                assert s.counters["failed:auth"] == 1
                chunk = FallbackSource(s, SystemEntropySource()).fetch([64])[0]
                assert chunk.fallback and chunk.fallback_reason.startswith("auth: ")
                assert KEY not in chunk.fallback_reason
                s.close()
        good = source(server.address, "unary", api_key=KEY, api_key_header="api-key")
        text = repr(good.describe()) + repr(good.breaker.snapshot())
        assert KEY not in text and "'api_key': 'set'" in text
        assert len(good.fetch([64])[0].data) == 64
        good.close()
    assert KEY not in caplog.text


def test_settings_build_the_source_and_hide_the_key(certs: Certs) -> None:
    with entropy_server(api_key=KEY) as server:
        env = {
            "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
            "QR_GRPC_SERVER_ADDRESS": server.address,
            "QR_GRPC_MODE": "unary",
            "QR_GRPC_API_KEY": KEY,
            "QR_GRPC_MAX_BYTES_PER_REQUEST": "5000",
            "QR_CB_MIN_TIMEOUT_MS": "10000",
            "QR_GRPC_TIMEOUT_MS": "20000",
        }
        settings = load_settings(env=env, env_file=None)
        s = build_source(settings)
        assert isinstance(s, QuantumGrpcSource)
        assert s.health is not None  # 'auto' = on for quantum_grpc
        assert s.breaker.config.max_timeout_s == 20.0
        chunks = s.fetch([6000, 100])
        assert [len(c.data) for c in chunks] == [6000, 100]
        assert s.counters["requests"] == 2
        assert KEY not in repr(s.describe())
        s.close()
        off = build_source(load_settings(env={**env, "QR_HEALTH_TESTS": "off"}, env_file=None))
        assert isinstance(off, QuantumGrpcSource) and off.health is None
        assert off.fetch([10])[0].health == "off"
        off.close()


# ---------------------------------------------------------------------------
# a foreign protocol whose field 1s match


def test_foreign_firefly_style_server_by_splitting(
    foreign_modules: tuple[ModuleType, ModuleType],
) -> None:
    pb2, pb2_grpc = foreign_modules
    with ForeignServer(pb2, pb2_grpc) as appliance:
        s = source(
            appliance.address,
            "unary",
            method_path=FOREIGN_METHOD,
            api_key="appliance-secret",
            api_key_header=FOREIGN_KEY_HEADER,
            max_bytes_per_request=FOREIGN_CAP,
        )
        chunks = s.fetch([20480])
        assert len(chunks[0].data) == 20480
        assert len(appliance.requests) == 2
        assert all(r.num_bytes <= FOREIGN_CAP for r in appliance.requests)
        assert sum(r.num_bytes for r in appliance.requests) == 20480
        # field 2 (a string on this appliance) was never sent
        assert all(r.output_format == "" for r in appliance.requests)
        first, second = appliance.served  # the two concurrent calls, in arrival order
        assert chunks[0].data in (first + second, second + first)  # those bytes, nothing else
        assert chunks[0].sequence_id == -1 and chunks[0].generation_timestamp_ns == 0
        assert chunks[0].device_id == appliance.address
        # a batch of rows in as few requests as the cap allows
        batch = s.fetch([20480] * 4)
        assert [len(c.data) for c in batch] == [20480] * 4
        assert len(appliance.requests) == 2 + 7  # ceil(81,920 / 13,312)
        s.close()

        # asking above the appliance's cap: refused by the server, explained
        big = source(
            appliance.address,
            "unary",
            method_path=FOREIGN_METHOD,
            api_key="appliance-secret",
            api_key_header=FOREIGN_KEY_HEADER,
        )
        with pytest.raises(EntropyUnavailableError, match="QR_GRPC_MAX_BYTES_PER_REQUEST"):
            big.fetch([20480])
        big.close()
        # the appliance requires its key
        nokey = source(appliance.address, "unary", method_path=FOREIGN_METHOD)
        with pytest.raises(AuthenticationError):
            nokey.fetch([16])
        nokey.close()


# ---------------------------------------------------------------------------
# faults: detected, counted, surfaced, labelled by the fallback

REPLY_FAULTS = {
    "short": "short reply",
    "empty": "empty reply",
    "oversized": "oversized reply",
    "malformed": "malformed reply",
    "wrong_seq": "wrong sequence id",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", sorted(REPLY_FAULTS))
def test_bad_replies_are_failures_never_entropy(mode: str, fault: str) -> None:
    with FaultyServer(fault=fault) as server:
        s = source(server.address, mode)
        with pytest.raises(EntropyReplyError, match=REPLY_FAULTS[fault]):
            s.fetch([1000])
        assert s.counters["failed:bad_reply"] == 1
        assert s.counters["ok"] == 0
        # with a fallback: labelled system bytes, never the bad reply
        fb = FallbackSource(s, SystemEntropySource())
        chunks = fb.fetch([1000, 24])
        assert [len(c.data) for c in chunks] == [1000, 24]
        assert all(c.fallback and c.source == "system" for c in chunks)
        assert all(c.fallback_reason.startswith("bad_reply: ") for c in chunks)
        # 'error' mode: the error reaches the caller
        with pytest.raises(EntropyReplyError):
            FallbackSource(s, None).fetch([10])
        s.close()


@pytest.mark.parametrize("mode", MODES)
def test_all_zero_bytes_fail_the_health_test(mode: str) -> None:
    with FaultyServer(fault="zeros") as server:
        s = source(server.address, mode)
        with pytest.raises(HealthTestError, match="repetition count test failed") as info:
            s.fetch([2048])
        assert getattr(info.value, "health", "") == "failed:rct"
        assert s.counters["failed:health_test"] == 1
        assert s.health is not None and s.health.failures["rct"] == 1
        chunks = FallbackSource(s, SystemEntropySource()).fetch([2048])
        assert chunks[0].fallback and chunks[0].fallback_reason.startswith("health_test: ")
        assert chunks[0].health == "failed:rct"  # the record says which test failed
        assert chunks[0].data != bytes(2048)
        s.close()


@pytest.mark.parametrize("mode", MODES)
def test_stall_past_the_deadline_is_unavailable(mode: str) -> None:
    with FaultyServer(fault="stall") as server:
        breaker = CircuitBreaker(BreakerConfig(min_timeout_s=0.2, max_timeout_s=0.3))
        s = source(server.address, mode, breaker=breaker)
        with pytest.raises(EntropyUnavailableError, match="deadline"):
            s.fetch([100])
        assert s.counters["failed:unavailable"] == 1
        assert breaker.p99_s() == pytest.approx(0.3)  # the timeout entered the window
        server.release_stalls()
        s.close()


def test_bidi_stall_fails_every_waiter_then_a_new_stream_serves() -> None:
    """Several threads on one stalled stream: the one reading it and the ones
    parked behind it all get the deadline error (none hangs); after the stall,
    the next fetch opens a new stream and is served."""
    with FaultyServer(fault="stall", stall_s=5.0) as server:
        breaker = CircuitBreaker(
            BreakerConfig(min_timeout_s=0.2, max_timeout_s=0.3, failure_threshold=100)
        )
        s = source(server.address, "bidi_streaming", breaker=breaker)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work() -> None:
            try:
                s.fetch([100])
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        _run_threads(work, 4, timeout_s=60)
        assert len(errors) == 4
        assert all(isinstance(e, EntropyUnavailableError) for e in errors), errors
        assert all("deadline" in str(e) for e in errors), errors
        server.release_stalls()
        server.fault = "ok"
        assert len(s.fetch([100])[0].data) == 100
        s.close()


def test_bidi_stream_ended_while_idle_is_replaced_not_failed(sock_dir: Path) -> None:
    """A server that ends the stream between fetches (restart, shutdown) costs
    no failed fetch once the client has seen the end: the next fetch opens a
    new stream."""
    address = f"unix://{sock_dir}/idle.sock"
    s = source(address, "bidi_streaming")
    with entropy_server(address=address):
        assert len(s.fetch([64])[0].data) == 64
        stream = s._stream
    assert stream is not None
    assert wait_for(lambda: not stream.usable)  # the server's end reached the client
    with entropy_server(address=address):
        assert len(s.fetch([64])[0].data) == 64
    assert s.counters["ok"] == 2 and s.counters["failed:unavailable"] == 0
    s.close()


def test_retries_recover_a_transient_fault() -> None:
    with FaultyServer(fault="short", fail_next=2) as server:
        s = source(server.address, "unary", retries=2)
        assert len(s.fetch([500])[0].data) == 500
        assert s.counters["failed:bad_reply"] == 2 and s.counters["ok"] == 1
        assert server.calls == 3
        s.close()
    with FaultyServer(fault="short", fail_next=1) as server:
        s = source(server.address, "unary")  # default: no retries
        with pytest.raises(EntropyReplyError):
            s.fetch([500])
        assert server.calls == 1
        s.close()


def test_authentication_errors_are_not_retried() -> None:
    with FaultyServer(api_key="right") as server:
        s = source(server.address, "unary", api_key="wrong", retries=3)
        with pytest.raises(AuthenticationError):
            s.fetch([10])
        assert server.calls == 1
        s.close()


def test_breaker_opens_then_closes_when_the_server_behaves() -> None:
    with FaultyServer(fault="short") as server:
        breaker = CircuitBreaker(
            BreakerConfig(min_timeout_s=10, max_timeout_s=20, failure_threshold=3, recovery_s=0.2)
        )
        s = source(server.address, "bidi_streaming", breaker=breaker)
        fb = FallbackSource(s, SystemEntropySource())
        for _ in range(3):
            assert fb.fetch([256])[0].fallback
        assert breaker.state == "open" and server.calls == 3
        chunk = fb.fetch([256])[0]
        assert chunk.fallback and "circuit breaker open" in chunk.fallback_reason
        assert server.calls == 3  # the open breaker spared the server
        assert s.counters["failed:breaker_open"] >= 1
        server.fault = "ok"
        assert wait_for(lambda: not fb.fetch([256])[0].fallback)
        assert breaker.state == "closed"
        s.close()


def test_killed_mid_stream_then_back(sock_dir: Path) -> None:
    """A real server process, SIGKILLed while our bidi stream is open."""
    address = f"unix://{sock_dir}/entropy.sock"
    proc = ServerProcess(address=address).start()
    try:
        breaker = CircuitBreaker(
            BreakerConfig(min_timeout_s=10, max_timeout_s=20, failure_threshold=2, recovery_s=0.1)
        )
        s = source(address, "bidi_streaming", breaker=breaker)
        fb = FallbackSource(s, SystemEntropySource())
        assert not fb.fetch([20480])[0].fallback
        proc.kill()
        labels = [fb.fetch([20480])[0] for _ in range(3)]
        assert all(c.fallback and len(c.data) == 20480 for c in labels)
        assert labels[0].fallback_reason.startswith("unavailable: ")
        assert breaker.times_opened >= 1
        proc.start()  # same socket path
        assert wait_for(lambda: not fb.fetch([20480])[0].fallback)
        assert breaker.state == "closed"
        proc.kill()  # and in 'error' mode the failure reaches the caller
        with pytest.raises(EntropyUnavailableError):
            FallbackSource(s, None).fetch([1])
        s.close()
    finally:
        proc.stop_kill()


def test_build_entropy_error_mode_raises() -> None:
    settings = load_settings(
        env={
            "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
            "QR_GRPC_SERVER_ADDRESS": "127.0.0.1:9",  # discard port: nothing listens
            "QR_FALLBACK_MODE": "error",
        },
        env_file=None,
    )
    entropy = build_entropy(settings)
    with pytest.raises(EntropyUnavailableError):
        entropy.fetch([10])
    entropy.close()
    fallback = build_entropy(settings.model_copy(update={"fallback_mode": "mock_uniform"}))
    chunk = fallback.fetch([10])[0]
    assert chunk.fallback and chunk.source == "mock_uniform"
    assert chunk.fallback_reason.startswith("unavailable: ")
    fallback.close()


# ---------------------------------------------------------------------------
# threads and processes


def test_many_threads_share_one_source() -> None:
    with entropy_server() as server:
        for mode in MODES:
            s = source(server.address, mode, max_bytes_per_request=3000)
            errors: list[BaseException] = []
            seqs: list[int] = []
            heads: list[bytes] = []
            lock = threading.Lock()

            def work(
                s: QuantumGrpcSource = s,
                errors: list[BaseException] = errors,
                seqs: list[int] = seqs,
                heads: list[bytes] = heads,
                lock: threading.Lock = lock,
            ) -> None:
                try:
                    for i in range(25):
                        chunks = s.fetch([1000 + i, 5000])
                        assert [len(c.data) for c in chunks] == [1000 + i, 5000]
                        with lock:
                            seqs.append(chunks[0].sequence_id)
                            heads.extend(c.data[:32] for c in chunks)
                except BaseException as exc:
                    errors.append(exc)

            _run_threads(work, 6, timeout_s=120)
            assert not errors, errors[:3]
            assert s.counters["ok"] == 150
            assert len(set(seqs)) == 150  # every fetch got its own replies
            assert len(set(heads)) == 300  # no bytes served twice
            s.close()


FORK_SCRIPT = """
import os, sys
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
address, mode, used = sys.argv[1], sys.argv[2], sys.argv[3] == "used"
s = QuantumGrpcSource(address, mode=mode)
if used:  # the parent has a live channel (and stream) before forking
    assert len(s.fetch([100])[0].data) == 100
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        chunk = s.fetch([4321])[0]
        os.write(write, str(len(chunk.data)).encode())
        code = 0
    finally:
        os._exit(code)
os.close(write)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert os.read(read, 100) == b"4321"
assert len(s.fetch([100])[0].data) == 100  # the parent carries on
print("fork ok")
"""


@pytest.mark.parametrize("used", ["fresh", "used"])
@pytest.mark.parametrize("mode", ["unary", "bidi_streaming"])
def test_fetch_in_a_forked_child(mode: str, used: str, sock_dir: Path) -> None:
    """A source forked into a child (as vLLM forks its engine process) builds its
    own channel there. Run in a fresh interpreter: forking this test process, with
    in-process servers on other threads, would test gRPC's fork handling instead."""
    with ServerProcess(address=f"unix://{sock_dir}/f.sock") as server:
        out = subprocess.run(
            [sys.executable, "-c", FORK_SCRIPT, server.address, mode, used],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "fork ok" in out.stdout


def test_close_is_idempotent_and_fetch_reconnects() -> None:
    with entropy_server() as server:
        s = source(server.address, "bidi_streaming")
        s.fetch([10])
        s.close()
        s.close()
        assert len(s.fetch([10])[0].data) == 10
        s.close()


def test_signal_module_untouched() -> None:
    # the client installs no signal handlers (vLLM owns them)
    before = signal.getsignal(signal.SIGTERM)
    QuantumGrpcSource("127.0.0.1:9").close()
    assert signal.getsignal(signal.SIGTERM) is before
