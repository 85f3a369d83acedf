"""``quantum_grpc``: the protocol-agnostic, resilient gRPC entropy client.

What it talks to
    Any gRPC service whose request message carries the byte count in field 1
    and whose response carries the bytes in field 1 — the ``qr_entropy``
    protocol (``qr_sampler/proto/entropy.proto``) or a foreign one such as a
    QRNG appliance's. No generated stubs are needed: messages are encoded and
    decoded at the wire level (:mod:`qr_sampler.entropy.wire`) and calls go
    through the channel's generic ``unary_unary`` / ``unary_stream`` /
    ``stream_stream`` methods with the configured method paths.

Sequence ids
    Only for methods in the ``qr_entropy`` package: each request carries a
    fresh sequence id (field 2, starting at 1) and the reply must echo it. A
    foreign service may use field 2 for something else, so for it requests
    hold field 1 alone and replies are matched by order (gRPC keeps a stream's
    messages in order).

Modes (``QR_GRPC_MODE``)
    ``unary``            one call per request; split requests run concurrently.
    ``server_streaming`` one call per request whose response stream together
                         holds exactly the requested bytes.
    ``bidi_streaming``   one persistent stream; requests are written to it
                         back to back and replies matched by sequence id; a
                         waiting caller reads the replies itself (no thread
                         hand-off per reply).
    An empty streaming method path disables streaming: the unary method is used.

A batch
    :meth:`QuantumGrpcSource.fetch` asks for every row's bytes together, split
    into as few requests as ``QR_GRPC_MAX_BYTES_PER_REQUEST`` allows (sizes as
    even as possible), all in flight at once; the replies are joined in order
    and cut back into rows. Each row's chunk carries the sequence id and
    device id of the reply holding its first byte and the earliest generation
    stamp among the replies it spans.

Checks (every reply)
    exactly the requested length (short, empty, oversized → ``EntropyReplyError``),
    well-formed message (→ ``EntropyReplyError``), echoed sequence id
    (→ ``EntropyReplyError``), continuous health tests on the bytes
    (→ ``HealthTestError``, on by default; see :mod:`qr_sampler.entropy.health`).
    Unreachable server, deadline exceeded, stream broken → ``EntropyUnavailableError``;
    ``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` → ``AuthenticationError``.

TLS
    Server certificates are verified against the CA bundle (or the system's);
    over a unix socket the name checked is ``localhost`` unless
    ``tls_server_name`` says otherwise. A client certificate and key give
    mutual TLS.

Resilience
    Each attempt's deadline is the circuit breaker's adaptive timeout
    (:mod:`qr_sampler.entropy.breaker`); while the breaker is open fetches fail
    at once with ``EntropyUnavailableError`` (the fallback wrapper then serves
    labelled fallback bytes). ``QR_GRPC_RETRIES`` (default 0) retries a failed
    attempt, except authentication and health-test failures.

Process and thread safety
    Nothing connects in ``__init__``; the channel is created on first use and
    re-created in a forked child (the parent's channel, stream and threads are
    dropped there, never used). Before a fork the persistent bidi stream is
    closed (gRPC cannot fork with a call in flight); the parent reopens it on
    its next fetch. A fetch in flight on another thread at that moment fails
    (and falls back, labelled). Any number of threads may call ``fetch``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import re
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import grpc

from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.health import HealthMonitor, HealthTestFailure
from qr_sampler.entropy.wire import Reply, decode_response, encode_request
from qr_sampler.errors import (
    AuthenticationError,
    ConfigError,
    EntropyError,
    EntropyReplyError,
    EntropyUnavailableError,
)
from qr_sampler.proto import GET_ENTROPY, SERVER_STREAM_ENTROPY, STREAM_ENTROPY

if TYPE_CHECKING:
    from qr_sampler.config import QRSettings

logger = logging.getLogger(__name__)

Mode = Literal["unary", "server_streaming", "bidi_streaming"]
MODES: tuple[str, ...] = ("unary", "server_streaming", "bidi_streaming")
#: protocol whose fields 2-4 (sequence id, timestamp, device id) the client uses
QR_ENTROPY_PACKAGE = "qr_entropy"
_METHOD_PATH = re.compile(r"^/[\w.]+/\w+$")
_ADDRESS = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[\w.-]+):\d{1,5}$")
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def _identity(data: bytes) -> bytes:
    return data


def speaks_qr_entropy(method_path: str) -> bool:
    """True when ``method_path`` is a method of the ``qr_entropy`` package."""
    return method_path.startswith(f"/{QR_ENTROPY_PACKAGE}.")


def split_sizes(total: int, cap: int) -> list[int]:
    """Split ``total`` bytes into the fewest requests of at most ``cap``, sizes as even
    as possible (e.g. 20,480 under a 13,312 cap → [10,240, 10,240])."""
    if total < 1 or cap < 1:
        raise ValueError("total and cap must be >= 1")
    parts = -(-total // cap)
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def check_address(address: str) -> str:
    """Validate a gRPC target: ``host:port``, ``[v6]:port`` or ``unix:///path`` (and
    the other gRPC URI schemes). Raises :class:`ConfigError` naming the setting."""
    if address.startswith(_SCHEMES) and len(address.split(":", 1)[1].lstrip("/")) > 0:
        return address
    if _ADDRESS.match(address) and 0 < int(address.rsplit(":", 1)[1]) < 65536:
        return address
    raise ConfigError(
        f"QR_GRPC_SERVER_ADDRESS: must be 'host:port' or 'unix:///path'; got {address!r}"
    )


#: every source alive in this process, reset in a forked child
_LIVE: weakref.WeakSet[QuantumGrpcSource] = weakref.WeakSet()


def _quiesce_live_sources_before_fork() -> None:
    for source in list(_LIVE):
        source._before_fork()


def _reset_live_sources_after_fork() -> None:
    for source in list(_LIVE):
        source._after_fork()


os.register_at_fork(
    before=_quiesce_live_sources_before_fork, after_in_child=_reset_live_sources_after_fork
)


class _Timeout(EntropyUnavailableError):
    """The call's deadline passed (enters the breaker's latency window)."""


def _timeout(timeout_s: float, path: str) -> _Timeout:
    return _Timeout(f"no reply within the {timeout_s * 1000:.0f} ms deadline ({path})")


def _rpc_error(exc: grpc.RpcError, path: str, timeout_s: float) -> EntropyError:
    """Translate a gRPC failure into the documented entropy error."""
    code: grpc.StatusCode | None = None
    details = ""
    if isinstance(exc, grpc.Call):
        code = exc.code()
        details = exc.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _timeout(timeout_s, path)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthenticationError(
            f"server refused the credentials ({name}: {details}); check QR_GRPC_API_KEY "
            "and QR_GRPC_API_KEY_HEADER"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return EntropyReplyError(f"oversized reply ({details})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EntropyUnavailableError(
            f"server rejected the request ({name}: {details}); is "
            "QR_GRPC_MAX_BYTES_PER_REQUEST above the server's cap?"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return EntropyUnavailableError(
            f"server does not implement {path} (UNIMPLEMENTED); check the method paths "
            "and QR_GRPC_MODE"
        )
    return EntropyUnavailableError(f"{name}: {details or 'no details'} ({path})")


def _check_reply(reply: Reply, size: int, seq: int | None) -> Reply:
    got = len(reply.data)
    if got == 0:
        raise EntropyReplyError(f"empty reply: asked for {size} bytes, got none")
    if got < size:
        raise EntropyReplyError(f"short reply: asked for {size} bytes, got {got}")
    if got > size:
        raise EntropyReplyError(f"oversized reply: asked for {size} bytes, got {got}")
    if seq is not None and (reply.sequence_id or 0) != seq:
        raise EntropyReplyError(
            f"wrong sequence id: sent {seq}, reply carries {reply.sequence_id or 0}"
        )
    return reply


class _Waiter:
    """One request in flight on the bidi stream; its fields are guarded by the stream's lock.

    A waiter that parks (waits for another caller to read its reply) is woken
    exactly once, by releasing a lock taken at creation — when its reply or the
    stream's failure arrives, or when it is handed the reading of the stream
    (``promoted``).
    """

    __slots__ = ("error", "parked", "promoted", "reply", "seq", "size", "wake")

    def __init__(self, seq: int, size: int) -> None:
        self.seq = seq
        self.size = size
        self.wake = threading.Lock()
        self.wake.acquire()
        self.reply: Reply | None = None
        self.error: EntropyError | None = None
        self.parked = False
        self.promoted = False

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


class _ReadDeadline:
    """Fails the stream when the caller reading it passes its deadline.

    A reader blocks inside gRPC's response iterator, which has no timeout of its
    own. One thread per stream sleeps until the current read's deadline and is
    woken only when a read starts with an earlier deadline than the one it
    sleeps towards (the first read after an idle spell, or a shorter adaptive
    timeout) — not once per reply. It ends with the stream.
    """

    def __init__(self, stream: _BidiStream) -> None:
        self._stream = stream
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._deadline: float | None = None  # of the read in progress
        self._timeout_s = 0.0
        self._until = math.inf  # when the thread wakes next (while waiting)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="qr-grpc-deadline", daemon=True)
        self._thread.start()

    def arm(self, deadline: float, timeout_s: float) -> None:
        with self._mutex:
            self._deadline = deadline
            self._timeout_s = timeout_s
            if deadline < self._until:
                self._cond.notify()

    def disarm(self) -> None:
        with self._mutex:
            self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def join(self, wait_s: float) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(wait_s)

    def _run(self) -> None:
        with self._cond:
            # ends when stopped (with the stream) or once it has failed the stream;
            # each turn waits for a deadline or a notification
            while not self._stopped:
                now = time.monotonic()
                deadline = self._deadline
                if deadline is not None and now >= deadline:
                    timeout_s = self._timeout_s
                    break
                self._until = math.inf if deadline is None else deadline
                self._cond.wait(None if deadline is None else deadline - now)
                self._until = -math.inf  # awake: it reads the deadline before waiting again
            else:
                return
        self._stream.fail(_timeout(timeout_s, self._stream.path))


class _BidiStream:
    """A persistent bidirectional stream: writes requests, matches replies.

    No thread of its own reads the replies: a caller waiting for a reply reads
    the stream itself when nobody else is reading it (no hand-off between
    threads), resolving whatever replies come — by sequence id for the
    ``qr_entropy`` protocol, in order otherwise — until its own have come; it
    then hands the reading to a parked waiter, if any. A :class:`_ReadDeadline`
    bounds the reader's wait; a parked waiter bounds its own. A reply that
    matches nothing, a malformed reply, a broken stream or a timeout fails every
    waiter and closes the stream; the source then opens a new one on the next
    fetch.
    """

    def __init__(
        self, call_factory: Any, metadata: tuple[tuple[str, str], ...], extended: bool, path: str
    ) -> None:
        self._extended = extended
        self.path = path
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._pending: dict[int, _Waiter] = {}  # insertion-ordered
        self._lock = threading.Lock()
        self._reading = False  # a caller is reading replies
        self.closed = False
        #: the failure that closed the stream
        self.error: EntropyError | None = None
        self._call = call_factory(self._request_iter(), metadata=metadata)
        self._deadline = _ReadDeadline(self)

    def _request_iter(self) -> Iterator[bytes]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    @property
    def usable(self) -> bool:
        """Open, and its call not ended by the server or the network while idle."""
        return not self.closed and bool(self._call.is_active())

    def submit(self, seq: int, size: int, payload: bytes) -> _Waiter:
        waiter = _Waiter(seq, size)
        with self._lock:
            if self.closed:  # e.g. refused at once (bad API key): say why
                if self.error is not None:
                    raise type(self.error)(*self.error.args)
                raise EntropyUnavailableError("stream closed")
            self._pending[seq] = waiter
            self._requests.put(payload)
        return waiter

    def collect(self, waiters: list[_Waiter], deadline: float, timeout_s: float) -> list[Reply]:
        """Wait for the waiters' replies (reading the stream when nobody else is)."""
        replies: list[Reply] = []
        for waiter in waiters:
            # at most three turns: lead (returns with the reply or the failure), or
            # park and be woken with it, or be woken to lead
            for _turn in range(3):
                if waiter.done:  # set once, under the lock, never unset
                    break
                with self._lock:
                    if waiter.done:
                        break
                    lead = waiter.promoted or not self._reading
                    if lead:
                        waiter.promoted = False
                        self._reading = True
                    else:
                        waiter.parked = True
                if lead:
                    self._lead(waiters, deadline, timeout_s)
                elif not waiter.wake.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    with self._lock:
                        timed_out = waiter.parked
                        waiter.parked = False
                    if timed_out:
                        error = _timeout(timeout_s, self.path)
                        self.fail(error)  # a stalled stream is replaced on the next fetch
                        raise error
                    waiter.wake.acquire()  # woken just as the wait timed out: released already
            else:  # unreachable: three turns always settle a waiter
                raise EntropyUnavailableError("bidi stream: a reply was neither read nor failed")
            if waiter.error is not None:  # shared by every waiter of the stream: copy it
                raise type(waiter.error)(*waiter.error.args)
            assert waiter.reply is not None
            replies.append(waiter.reply)
        return replies

    def _lead(self, mine: list[_Waiter], deadline: float, timeout_s: float) -> None:
        """Read replies until every waiter of ``mine`` has its own, or the stream fails."""
        self._deadline.arm(deadline, timeout_s)
        try:
            for waiter in mine:
                # each turn takes one reply off the stream or ends it (failing every
                # waiter); the deadline thread bounds the wait
                while not waiter.done:
                    try:
                        raw = next(self._call)
                    except StopIteration:
                        self.fail(EntropyUnavailableError(f"server ended the stream ({self.path})"))
                    except grpc.RpcError as exc:
                        self.fail(_rpc_error(exc, self.path, 0.0))
                    else:
                        self._on_reply(raw)
        except BaseException as exc:  # never leave the stream half-read
            self.fail(EntropyUnavailableError(f"stream reader failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._deadline.disarm()
            with self._lock:
                self._reading = False
                if not self.closed:  # a closed stream has woken all its waiters
                    for other in self._pending.values():  # oldest first
                        if other.parked:
                            other.parked = False
                            other.promoted = True
                            self._reading = True
                            other.wake.release()
                            break

    def _on_reply(self, raw: bytes) -> None:
        try:
            reply = decode_response(raw, extended=self._extended, copy=False)
        except EntropyReplyError as exc:
            self.fail(exc)
            return
        with self._lock:
            if not self._pending:
                waiter = None
            elif self._extended:
                waiter = self._pending.pop(reply.sequence_id or 0, None)
            else:
                waiter = self._pending.pop(next(iter(self._pending)))
            if waiter is not None:
                waiter.reply = reply
                if waiter.parked:
                    waiter.parked = False
                    waiter.wake.release()
                return
        self.fail(
            EntropyReplyError(
                f"wrong sequence id: reply carries {reply.sequence_id or 0}, "
                "which matches no request in flight"
                if self._extended
                else "unexpected reply: no request in flight"
            )
        )

    def fail(self, error: EntropyError) -> None:
        """Fail every waiter with ``error`` and close the stream."""
        with self._lock:
            waiters = list(self._pending.values())
            self._pending.clear()
            already = self.closed
            self.closed = True
            if self.error is None:
                self.error = error
            for waiter in waiters:
                waiter.error = error
                if waiter.parked:
                    waiter.parked = False
                    waiter.wake.release()
        if not already:
            self._deadline.stop()
            self._requests.put(None)
            self._call.cancel()

    def close(self, wait_s: float = 0.0) -> None:
        """Cancel the stream; wait up to ``wait_s`` for its deadline thread to end."""
        self.fail(EntropyUnavailableError("stream closed by the client"))
        if wait_s > 0:
            self._deadline.join(wait_s)


class _Piece(NamedTuple):
    """One request: its sequence id and byte count."""

    seq: int
    size: int


class QuantumGrpcSource(EntropySource):
    """Entropy from a gRPC server (see the module docstring)."""

    name: ClassVar[str] = "quantum_grpc"

    def __init__(
        self,
        address: str = "localhost:50051",
        *,
        mode: Mode = "bidi_streaming",
        method_path: str = GET_ENTROPY,
        stream_method_path: str = STREAM_ENTROPY,
        server_stream_method_path: str = SERVER_STREAM_ENTROPY,
        max_bytes_per_request: int = 1_048_576,
        retries: int = 0,
        api_key: str = "",
        api_key_header: str = "api-key",
        use_tls: bool = False,
        tls_ca_file: str = "",
        tls_cert_file: str = "",
        tls_key_file: str = "",
        tls_server_name: str = "",
        breaker: CircuitBreaker | None = None,
        health: HealthMonitor | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = check_address(address)
        if mode not in MODES:
            raise ConfigError(
                f"QR_GRPC_MODE: must be 'unary', 'server_streaming' or 'bidi_streaming'; "
                f"got {mode!r}"
            )
        for setting, path, optional in (
            ("QR_GRPC_METHOD_PATH", method_path, False),
            ("QR_GRPC_STREAM_METHOD_PATH", stream_method_path, True),
            ("QR_GRPC_SERVER_STREAM_METHOD_PATH", server_stream_method_path, True),
        ):
            if not (_METHOD_PATH.match(path) or (optional and path == "")):
                raise ConfigError(f"{setting}: must be a method path '/package.Service/Method'")
        if max_bytes_per_request < 1:
            raise ConfigError("QR_GRPC_MAX_BYTES_PER_REQUEST: must be an integer >= 1")
        if retries < 0:
            raise ConfigError("QR_GRPC_RETRIES: must be an integer >= 0")
        if bool(tls_cert_file) != bool(tls_key_file):
            raise ConfigError("QR_GRPC_TLS_CERT_FILE and QR_GRPC_TLS_KEY_FILE must be set together")
        for setting, file in (
            ("QR_GRPC_TLS_CA_FILE", tls_ca_file),
            ("QR_GRPC_TLS_CERT_FILE", tls_cert_file),
            ("QR_GRPC_TLS_KEY_FILE", tls_key_file),
        ):
            if file and not Path(file).is_file():
                raise ConfigError(f"{setting}: no such file: {file!r}")

        streaming_path = {
            "unary": method_path,
            "server_streaming": server_stream_method_path,
            "bidi_streaming": stream_method_path,
        }[mode]
        if not streaming_path:
            logger.warning("no method path for %s mode: using unary calls to %s", mode, method_path)
            mode, streaming_path = "unary", method_path
        self.mode: Mode = mode
        self.method_path = streaming_path
        self.extended = speaks_qr_entropy(streaming_path)
        self.max_bytes_per_request = max_bytes_per_request
        self.retries = retries
        self._api_key = api_key
        self._api_key_header = api_key_header
        self._metadata: tuple[tuple[str, str], ...] = (
            ((api_key_header, api_key),) if api_key else ()
        )
        self._tls = use_tls or bool(tls_ca_file) or bool(tls_cert_file)
        self._tls_files = (tls_ca_file, tls_cert_file, tls_key_file)
        if not tls_server_name and self.address.startswith(("unix:", "unix-abstract:")):
            tls_server_name = "localhost"  # a socket path is no host name to verify
        self.tls_server_name = tls_server_name
        if api_key and not self._tls and not self.address.startswith(("unix:", "unix-abstract:")):
            logger.warning(
                "the gRPC API key goes to %s without TLS: anyone on the path can read it "
                "(set QR_GRPC_TLS_CA_FILE or QR_GRPC_USE_TLS=true)",
                self.address,
            )
        self.breaker = breaker or CircuitBreaker()
        self.health = health
        receive_cap = max(4 * 1024 * 1024, 2 * max_bytes_per_request + 65536)
        self._channel_options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", receive_cap),
            ("grpc.max_send_message_length", 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # a connection of our own: never one inherited through gRPC's global
            # subchannel pool (a forked child must not reuse the parent's socket)
            ("grpc.use_local_subchannel_pool", 1),
            *channel_options,
        ]
        if self._tls and tls_server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        #: counts: ``ok``, ``bytes``, ``requests``, and ``failed:<reason>``
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._pid = os.getpid()
        self._channel: grpc.Channel | None = None
        self._callable: Any = None
        self._stream: _BidiStream | None = None
        self._pool: ThreadPoolExecutor | None = None
        _LIVE.add(self)

    @classmethod
    def from_settings(cls, settings: QRSettings) -> QuantumGrpcSource:
        health = (
            HealthMonitor(settings.health_min_entropy, settings.health_alpha_log2)
            if settings.health_tests != "off"  # 'auto' means on for this source
            else None
        )
        return cls(
            settings.grpc_server_address,
            mode=settings.grpc_mode,
            method_path=settings.grpc_method_path,
            stream_method_path=settings.grpc_stream_method_path,
            server_stream_method_path=settings.grpc_server_stream_method_path,
            max_bytes_per_request=settings.grpc_max_bytes_per_request,
            retries=settings.grpc_retries,
            api_key=settings.grpc_api_key.get_secret_value(),
            api_key_header=settings.grpc_api_key_header,
            use_tls=settings.grpc_use_tls,
            tls_ca_file=settings.grpc_tls_ca_file,
            tls_cert_file=settings.grpc_tls_cert_file,
            tls_key_file=settings.grpc_tls_key_file,
            breaker=CircuitBreaker(BreakerConfig.from_settings(settings)),
            health=health,
        )

    # -- connection management -----------------------------------------------
    def _check_process(self) -> None:
        """In a forked child, forget (never touch) the parent's connection state."""
        if os.getpid() != self._pid:
            self._after_fork()

    def _before_fork(self) -> None:
        # gRPC cannot fork while a call is in flight (its fork handlers are skipped
        # and the child inherits a broken core), and a persistent stream is always
        # in flight: close it; the parent reopens one on its next fetch.
        stream = self._stream
        if stream is not None and os.getpid() == self._pid:
            self._stream = None
            stream.close(wait_s=2.0)

    def _after_fork(self) -> None:
        # Runs in the child before anything else (os.register_at_fork) and again,
        # harmlessly, on the first fetch: the parent's locks may have been held by
        # threads that do not exist here, and its channel belongs to the parent.
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._channel = None
        self._callable = None
        self._stream = None
        self._pool = None
        self.breaker._after_fork()
        if self.health is not None:
            self.health._after_fork()

    def _credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = (Path(f).read_bytes() if f else None for f in self._tls_files)
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def _get_callable(self) -> Any:
        with self._lock:
            if self._callable is None:
                if self._tls:
                    self._channel = grpc.secure_channel(
                        self.address, self._credentials(), options=self._channel_options
                    )
                else:
                    self._channel = grpc.insecure_channel(
                        self.address, options=self._channel_options
                    )
                factory = {
                    "unary": self._channel.unary_unary,
                    "server_streaming": self._channel.unary_stream,
                    "bidi_streaming": self._channel.stream_stream,
                }[self.mode]
                self._callable = factory(
                    self.method_path,
                    request_serializer=_identity,
                    response_deserializer=_identity,
                )
            return self._callable

    def _get_stream(self) -> _BidiStream:
        stream = self._stream
        if stream is not None and stream.usable:
            return stream
        with self._lock:
            stream = self._stream
            if stream is None or not stream.usable:
                if stream is not None:
                    stream.close()  # ended while idle: replace it rather than fail a fetch
                stream = _BidiStream(
                    self._get_callable(), self._metadata, self.extended, self.method_path
                )
                self._stream = stream
            return stream

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                if self._stream is not None:
                    self._stream.close()
                if self._channel is not None:
                    self._channel.close()
                if self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
            self._stream = None
            self._channel = None
            self._callable = None
            self._pool = None

    # -- fetching ------------------------------------------------------------
    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        sizes = list(sizes)
        if not sizes:
            return []
        if min(sizes) < 1:
            raise ValueError(f"every size must be >= 1; got {sizes}")
        self._check_process()
        last_error: EntropyError | None = None
        for _attempt in range(1 + self.retries):
            if not self.breaker.allow():
                self._count("failed:breaker_open")
                raise EntropyUnavailableError(
                    f"circuit breaker open after repeated failures of {self.address}; "
                    f"next probe in {self.breaker.retry_after_s():.1f} s"
                )
            # a new channel's first call includes connecting: give it the maximum
            timeout = (
                self.breaker.config.max_timeout_s
                if self._channel is None
                else self.breaker.timeout_s()
            )
            start = time.perf_counter_ns()
            try:
                chunks = self._attempt(sizes, timeout, start)
            except EntropyError as exc:
                self.breaker.record_failure(timeout if isinstance(exc, _Timeout) else None)
                self._count(f"failed:{exc.reason}")
                last_error = exc
                if isinstance(exc, (AuthenticationError, HealthTestFailure)):
                    break
                continue
            self.breaker.record_success((time.perf_counter_ns() - start) / 1e9)
            with self._lock:
                counters = self.counters
                counters["ok"] += 1
                counters["bytes"] += sum(sizes)
            return chunks
        assert last_error is not None
        raise last_error

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _attempt(self, sizes: list[int], timeout: float, start: int) -> list[EntropyChunk]:
        total = sum(sizes)
        if total <= self.max_bytes_per_request:  # the usual case: one request
            pieces = [_Piece(next(self._seq), total)]
        else:
            cap = self.max_bytes_per_request
            pieces = [_Piece(next(self._seq), n) for n in split_sizes(total, cap)]
        self._count("requests", len(pieces))
        if self.mode == "bidi_streaming":
            replies = self._fetch_bidi(pieces, timeout)
        elif self.mode == "unary":
            replies = self._fetch_unary(pieces, timeout)
        else:
            replies = self._fetch_server_streaming(pieces, timeout)
        health = "off"
        if self.health is not None:
            for reply in replies:
                self.health.test(reply.data)
            health = "ok"
        return self._cut(sizes, replies, health, time.perf_counter_ns() - start)

    def _seq_or_none(self, piece: _Piece) -> int | None:
        return piece.seq if self.extended else None

    def _fetch_unary(self, pieces: list[_Piece], timeout: float) -> list[Reply]:
        call = self._get_callable()
        if len(pieces) == 1:
            # one request: a blocking call in this thread (no hand-off to gRPC's
            # channel thread and back, as a future would need)
            piece = pieces[0]
            seq = self._seq_or_none(piece)
            try:
                raw = call(
                    encode_request(piece.size, seq), timeout=timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                raise _rpc_error(exc, self.method_path, timeout) from None
            reply = decode_response(raw, extended=self.extended, copy=False)
            return [_check_reply(reply, piece.size, seq)]
        futures = [
            (
                piece,
                call.future(
                    encode_request(piece.size, self._seq_or_none(piece)),
                    timeout=timeout,
                    metadata=self._metadata,
                ),
            )
            for piece in pieces
        ]
        replies: list[Reply] = []
        try:
            for piece, future in futures:
                try:
                    raw = future.result()
                except grpc.RpcError as exc:
                    raise _rpc_error(exc, self.method_path, timeout) from None
                reply = decode_response(raw, extended=self.extended, copy=False)
                replies.append(_check_reply(reply, piece.size, self._seq_or_none(piece)))
        except EntropyError:
            for _, future in futures:
                future.cancel()
            raise
        return replies

    def _one_server_stream(self, piece: _Piece, timeout: float) -> Reply:
        call = self._get_callable()(
            encode_request(piece.size, self._seq_or_none(piece)),
            timeout=timeout,
            metadata=self._metadata,
        )
        parts: list[bytes | memoryview] = []
        got = 0
        stamps: list[int] = []
        device: str | None = None
        try:
            for raw in call:
                reply = decode_response(raw, extended=self.extended, copy=False)
                seq = self._seq_or_none(piece)
                if seq is not None and (reply.sequence_id or 0) != seq:
                    raise EntropyReplyError(
                        f"wrong sequence id: sent {seq}, reply carries {reply.sequence_id or 0}"
                    )
                got += len(reply.data)
                if got > piece.size:
                    raise EntropyReplyError(
                        f"oversized reply: asked for {piece.size} bytes, stream sent {got}"
                    )
                parts.append(reply.data)
                if reply.generation_timestamp_ns:
                    stamps.append(reply.generation_timestamp_ns)
                if device is None:
                    device = reply.device_id
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.method_path, timeout) from None
        except EntropyError:
            call.cancel()
            raise
        merged = Reply(
            data=b"".join(parts),
            sequence_id=self._seq_or_none(piece),
            generation_timestamp_ns=min(stamps) if stamps else None,
            device_id=device,
        )
        return _check_reply(merged, piece.size, None)

    def _fetch_server_streaming(self, pieces: list[_Piece], timeout: float) -> list[Reply]:
        if len(pieces) == 1:
            return [self._one_server_stream(pieces[0], timeout)]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="qr-grpc")
            pool = self._pool
        futures = [pool.submit(self._one_server_stream, piece, timeout) for piece in pieces]
        return [future.result() for future in futures]

    def _fetch_bidi(self, pieces: list[_Piece], timeout: float) -> list[Reply]:
        stream = self._get_stream()
        waiters = [
            stream.submit(
                piece.seq, piece.size, encode_request(piece.size, self._seq_or_none(piece))
            )
            for piece in pieces
        ]
        replies = stream.collect(waiters, time.monotonic() + timeout, timeout)
        # matched by sequence id (or order): the size is what is left to check
        return [
            _check_reply(reply, piece.size, None)
            for reply, piece in zip(replies, pieces, strict=True)
        ]

    def _cut(
        self, sizes: list[int], replies: list[Reply], health: str, latency_ns: int
    ) -> list[EntropyChunk]:
        """Cut the replies (in order) into one chunk per row, with provenance.

        The replies' payloads are views of the received messages (never copied
        when decoded): a row inside one reply is one copy out of it (none when it
        is a whole ``bytes`` payload); a row that spans replies joins their pieces."""
        name, extended, address = self.name, self.extended, self.address
        if len(replies) == 1 and len(sizes) == 1:  # one row, one reply: checked sizes match
            head = replies[0]
            data = head.data
            return [
                EntropyChunk(
                    data=data if isinstance(data, bytes) else bytes(data),
                    source=name,
                    device_id=head.device_id or address,
                    generation_timestamp_ns=head.generation_timestamp_ns or 0,
                    sequence_id=head.sequence_id if extended and head.sequence_id else -1,
                    health=health,
                    fetch_latency_ns=latency_ns,
                )
            ]
        chunks: list[EntropyChunk] = []
        index = 0  # the reply holding the row's first byte
        pos = 0  # offset of that byte in it
        for n in sizes:
            head = replies[index]
            buf = head.data
            stamp = head.generation_timestamp_ns or 0
            if pos + n <= len(buf):  # the usual case: within one reply
                part = buf if pos == 0 and n == len(buf) else buf[pos : pos + n]
                data = part if isinstance(part, bytes) else bytes(part)
                pos += n
            else:  # spans replies: join their pieces, keep the earliest stamp
                parts = [buf[pos:]]
                need = n - (len(buf) - pos)
                while need > 0:  # bounded: each turn consumes one more reply
                    index += 1
                    nxt = replies[index]
                    take = min(need, len(nxt.data))
                    parts.append(nxt.data[:take])
                    if nxt.generation_timestamp_ns and (
                        not stamp or nxt.generation_timestamp_ns < stamp
                    ):
                        stamp = nxt.generation_timestamp_ns
                    need -= take
                    pos = take
                data = b"".join(parts)
            if pos == len(replies[index].data) and index + 1 < len(replies):
                index, pos = index + 1, 0
            chunks.append(
                EntropyChunk(
                    data=data,
                    source=name,
                    device_id=head.device_id or address,
                    generation_timestamp_ns=stamp,
                    sequence_id=head.sequence_id if extended and head.sequence_id else -1,
                    health=health,
                    fetch_latency_ns=latency_ns,
                )
            )
        return chunks

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "source": self.name,
            "address": self.address,
            "mode": self.mode,
            "method": self.method_path,
            "protocol": QR_ENTROPY_PACKAGE if self.extended else "foreign (field 1 only)",
            "tls": self._tls,
            "api_key": "set" if self._api_key else "none",
            "api_key_header": self._api_key_header,
            "max_bytes_per_request": self.max_bytes_per_request,
            "retries": self.retries,
            "breaker": self.breaker.snapshot(),
            "health_tests": self.health.cutoffs.describe() if self.health else "off",
        }
        return info


__all__ = [
    "MODES",
    "QR_ENTROPY_PACKAGE",
    "QuantumGrpcSource",
    "check_address",
    "speaks_qr_entropy",
    "split_sizes",
]
