"""`qr-sampler probe` against real gRPC servers on loopback: the package's own
server around os.urandom, stuck and biased generators, a foreign unary-only
appliance protocol, and an address where nothing listens."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support_grpc import (
    FOREIGN_CAP,
    FOREIGN_KEY_HEADER,
    FOREIGN_METHOD,
    ForeignServer,
    compile_foreign_proto,
    entropy_server,
    free_port,
)

from qr_sampler.cli import main as cli_main
from qr_sampler.probe import chi2_sf, ks_uniform

# each statistical check fails a fair source with probability alpha; five of them
STRICT = ["--alpha", "1e-7"]


def probe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    status = cli_main(["probe", *args, "--json"])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def biased(n: int) -> bytes:
    """os.urandom with 1/256 of the bytes forced to 0xff: twice the expected
    count of 0xff, yet runs of six 0xff (the repetition-count cutoff) stay rarer
    than 1 in 10,000 probes."""
    data = np.frombuffer(os.urandom(n), dtype=np.uint8).copy()
    flip = np.frombuffer(os.urandom(n), dtype=np.uint8) == 0
    data[flip] = 0xFF
    return data.tobytes()


@pytest.fixture(scope="module")
def urandom_server() -> Iterator[str]:
    with entropy_server(os.urandom) as server:
        yield server.address


def test_urandom_server_passes_in_every_mode(
    urandom_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report, err = probe(
        capsys, urandom_server, "--requests", "40", "--sample-count", "1024", *STRICT
    )
    assert status == 0, report["reason"]
    assert report["result"] == "pass" and report["reason"] == ""
    assert [m["mode"] for m in report["modes"]] == ["unary", "server_streaming", "bidi_streaming"]
    for m in report["modes"]:
        assert m["requests"] == 40 and m["bytes"] == 40 * 20480 and not m["error"]
        assert 0 < m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"] <= m["max_ms"]
        assert m["mb_per_s"] > 0 and m["device_id"].startswith("test@")
    assert report["bytes_tested"] == 3 * 40 * 20480
    names = [c["name"] for c in report["checks"]]
    assert names == [
        "stuck output",
        "SP 800-90B repetition count",
        "SP 800-90B adaptive proportion",
        "byte frequency (chi-square)",
        "bit frequency (monobit)",
        "runs (bits)",
        "KS of u (amplified tokens)",
    ]
    assert all(c["passed"] for c in report["checks"])
    ks = report["checks"][-1]
    assert ks["detail"].startswith("2,400 tokens of 1,024 bytes")
    assert "unary: 40 requests" in err  # plain progress when stderr is not a terminal


def test_readable_report(urandom_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["probe", urandom_server, "--mode", "unary", "--requests", "10", *STRICT])
    out = capsys.readouterr().out
    assert status == 0
    assert "unary" in out and "p99 ms" in out and "byte frequency (chi-square)" in out
    assert out.rstrip().endswith("RESULT: PASS - every check passed")
    assert "server_streaming" not in out


def test_stuck_server_fails_as_stuck(capsys: pytest.CaptureFixture[str]) -> None:
    """All zeros, served by a server whose own health tests are off."""
    with entropy_server(lambda n: bytes(n), health_tests=False) as server:
        status, report, err = probe(capsys, server.address, "--requests", "5", *STRICT)
    assert status == 1
    assert report["reason"].startswith("stuck output: stuck: all 307,200 bytes are 0x00")
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert {"stuck output", "SP 800-90B repetition count", "byte frequency (chi-square)"} <= failed
    rct = next(c for c in report["checks"] if c["name"] == "SP 800-90B repetition count")
    assert rct["detail"].startswith("repetition count test failed")
    assert "stuck" in err


def test_biased_server_fails_the_frequency_test(capsys: pytest.CaptureFixture[str]) -> None:
    with entropy_server(biased, health_tests=False) as server:
        status, report, _ = probe(capsys, server.address, "--requests", "20", *STRICT)
    assert status == 1
    assert report["reason"].startswith("byte frequency (chi-square): chi2 = ")
    assert "most common byte 0xff" in report["reason"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["stuck output"]["passed"]
    assert checks["SP 800-90B repetition count"]["passed"]
    assert checks["SP 800-90B adaptive proportion"]["passed"]
    assert checks["byte frequency (chi-square)"]["p_value"] < 1e-7


def test_server_refusing_unhealthy_bytes_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """The same stuck device behind a server with its health tests on: the server
    refuses to serve, and the probe says why."""
    with entropy_server(lambda n: bytes(n)) as server:
        status, report, _ = probe(capsys, server.address, "--requests", "5")
    assert status == 3
    assert "entropy device unhealthy" in report["reason"]
    assert "repetition count test failed" in report["reason"]


def test_unreachable_address_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    status, report, err = probe(capsys, address, "--requests", "50")
    assert status == 3
    assert report["reason"].startswith("unreachable: ")
    assert len(report["modes"]) == 1  # stopped at the first mode's first request
    assert report["modes"][0]["requests"] == 0
    assert report["checks"] == []
    assert "qr-sampler probe: unreachable: " in err


def test_api_key_from_environment_and_never_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with entropy_server(os.urandom, api_key="probe-secret-77") as server:
        status, report, _ = probe(capsys, server.address, "--requests", "3", "--mode", "unary")
        assert status == 3 and "credentials" in report["reason"]
        monkeypatch.setenv("MY_QRNG_KEY", "probe-secret-77")
        status, report, err = probe(
            capsys, server.address, "--requests", "8", "--api-key-env", "MY_QRNG_KEY", *STRICT
        )
        assert status == 0, report["reason"]
        assert report["settings"]["api_key"] == "set"
        assert "probe-secret-77" not in json.dumps(report) + err


def test_foreign_unary_only_appliance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pb2, pb2_grpc = compile_foreign_proto(tmp_path / "proto")
    monkeypatch.setenv("APPLIANCE_KEY", "appliance-secret")
    with ForeignServer(pb2, pb2_grpc) as server:
        status, report, _ = probe(
            capsys,
            server.address,
            "--method-path",
            FOREIGN_METHOD,
            "--api-key-env",
            "APPLIANCE_KEY",
            "--api-key-header",
            FOREIGN_KEY_HEADER,
            "--bytes",
            str(FOREIGN_CAP),
            "--requests",
            "30",
            "--sample-count",
            "2048",
            *STRICT,
        )
    assert status == 0, report["reason"]
    modes = {m["mode"]: m for m in report["modes"]}
    assert modes["unary"]["requests"] == 30
    assert modes["bidi_streaming"]["error_kind"] == "unimplemented"  # noted, not fatal
    assert modes["server_streaming"]["error_kind"] == "unimplemented"


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["probe", "not an address"]) == 2
    assert "ADDRESS: must be 'host:port'" in capsys.readouterr().err
    assert cli_main(["probe", "127.0.0.1:1", "--api-key-env", "QR_PROBE_NO_SUCH_VAR"]) == 2
    assert "environment variable QR_PROBE_NO_SUCH_VAR is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["probe", "127.0.0.1:1", "--requests", "0"])
    assert "--requests: must be an integer from 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["probe", "127.0.0.1:1", "--mode", "carrier-pigeon"])


def test_statistics_fallbacks_agree_with_scipy() -> None:
    """The numpy-only p-values used when scipy is absent."""
    from scipy import stats

    import qr_sampler.probe as probe_mod

    rng = np.random.default_rng(5)
    u = rng.random(3000)
    d_scipy, p_scipy = ks_uniform(u)
    assert chi2_sf(300.0, 255) == pytest.approx(stats.chi2.sf(300.0, 255))
    import sys

    saved = sys.modules.get("scipy")
    sys.modules["scipy"] = None  # type: ignore[assignment]
    try:
        d, p = probe_mod.ks_uniform(u)
        assert d == pytest.approx(d_scipy, rel=1e-12)
        assert p == pytest.approx(p_scipy, abs=0.02)
        assert probe_mod.chi2_sf(300.0, 255) == pytest.approx(stats.chi2.sf(300.0, 255), rel=0.02)
    finally:
        if saved is None:
            del sys.modules["scipy"]
        else:
            sys.modules["scipy"] = saved


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    """A StringIO that claims to be a terminal stands in for one."""
    from qr_sampler.probe import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress(tty)
    for i in range(11):
        bar.update("unary", i, 10)
    text = tty.getvalue()
    assert text.count("\r") == 11 and text.endswith("[" + "#" * 30 + "] 10/10\n")
    plain = io.StringIO()
    lines = Progress(plain)
    for i in range(101):
        lines.update("bidi_streaming", i, 100)
    assert plain.getvalue().splitlines() == [
        "bidi_streaming: 100 requests",
        "bidi_streaming: 25/100",
        "bidi_streaming: 50/100",
        "bidi_streaming: 75/100",
        "bidi_streaming: 100/100",
    ]
    silent = io.StringIO()
    Progress(silent, enabled=False).update("unary", 1, 2)
    assert silent.getvalue() == ""
