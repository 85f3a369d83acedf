"""Secrets and transport security, with real servers on 127.0.0.1.

* The API key never appears in what qr-sampler produces: errors, fallback
  reasons, provenance records, ``describe()``, settings dumps and hashes,
  config errors, logs, the server's own log, ``qr-sampler probe`` output — with
  the right key, a wrong key, and no key. (The chaos soak repeats the search
  through the real engine, including a metrics scrape and health replies.)
* With TLS configured, certificates are verified by default and there is no
  setting to turn verification off: a client without the right CA, or talking
  plaintext to a TLS server, fails — and every token it served is labelled
  fallback with its reason.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import support_grpc
import torch
from support_grpc import Certs, ServerProcess, make_certs
from support_reliability import find_secret

from qr_sampler.config import QRSettings, load_settings
from qr_sampler.entropy.fallback import FallbackSource
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
from qr_sampler.entropy.registry import build_entropy
from qr_sampler.entropy.system import SystemEntropySource
from qr_sampler.errors import ConfigError, EntropyError
from qr_sampler.pipeline import RowState, SamplingPipeline

KEY_VAR = "RELIABILITY_TEST_ENTROPY_KEY"


@pytest.fixture(scope="module")
def key() -> str:
    return "qrkey-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def keyed_server(key: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    env = {**os.environ, KEY_VAR: key}
    with ServerProcess(["--api-key-env", KEY_VAR], env=env, log_path=log) as proc:
        yield proc


def _env(address: str, **extra: str) -> dict[str, str]:
    return {
        "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
        "QR_GRPC_SERVER_ADDRESS": address,
        "QR_GRPC_MODE": "unary",
        "QR_GRPC_TIMEOUT_MS": "10000",
        "QR_CB_MIN_TIMEOUT_MS": "5000",
        "QR_SAMPLE_COUNT": "1024",
        **extra,
    }


def _sample(settings: QRSettings, label: str, steps: int = 3) -> list[str]:
    """Run the real pipeline for a few steps; returns fallback reasons seen."""
    pipe = SamplingPipeline(settings)
    rows = [RowState.of(settings.sampling().model_copy(update={"label": label}), f"r{i}")
            for i in range(2)]  # fmt: skip
    reasons = []
    try:
        for _ in range(steps):
            out = pipe.sample(torch.randn(2, 64), rows)
            reasons += [r.fallback_reason for r in out.records]
    finally:
        pipe.close()
    return reasons


@pytest.mark.parametrize("sent", ["right", "wrong", "none"])
def test_api_key_appears_in_no_output(
    keyed_server: ServerProcess,
    key: str,
    sent: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "qrwrong-" + secrets.token_hex(16)
    client_key = {"right": key, "wrong": wrong, "none": ""}[sent]
    records = tmp_path / "records.jsonl"
    env = _env(keyed_server.address, QR_RECORDS_PATH=str(records), QR_GRPC_API_KEY=client_key)
    settings = load_settings(env=env, env_file=None)
    reasons = _sample(settings, label=sent)
    if sent == "right":
        assert reasons == ["", "", "", "", "", ""]
    else:
        assert all(r.startswith("auth: ") for r in reasons), reasons

    source = QuantumGrpcSource.from_settings(settings)
    texts: dict[str, str] = {
        "reasons": "\n".join(reasons),
        "settings": repr(settings) + str(settings) + repr(settings.public_dict()),
        "hash": settings.config_hash(),
        "describe": repr(source.describe()) + repr(source.breaker.snapshot()),
    }
    try:
        source.fetch([16])
    except EntropyError as exc:
        texts["error"] = f"{exc!r} {exc}"
    source.close()
    # a config error raised while the key is set
    with pytest.raises(ConfigError) as info:
        load_settings(env={**env, "QR_TOP_P": "2"}, env_file=None)
    texts["config_error"] = str(info.value)
    # the probe, with the key in the environment the way an operator runs it
    probe = subprocess.run(
        [sys.executable, "-m", "qr_sampler.cli", "probe", keyed_server.address,
         "--requests", "2", "--bytes", "4096", "--mode", "unary", "--api-key-env", KEY_VAR],
        env={**os.environ, KEY_VAR: client_key}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    texts["probe"] = probe.stdout + probe.stderr
    assert (probe.returncode in (0, 1)) == (sent == "right"), texts["probe"][-2000:]
    texts["logs"] = caplog.text
    captured = capsys.readouterr()
    texts["stdio"] = captured.out + captured.err
    texts["server_log"] = "".join(keyed_server.log)
    for secret in {key, wrong}:
        assert find_secret(secret, texts, [records]) == []
    assert len(records.read_text().splitlines()) == 6


def test_no_setting_turns_certificate_verification_off() -> None:
    names = " ".join(QRSettings.model_fields)
    assert "verify" not in names and "insecure" not in names and "skip" not in names


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    log = tmp_path_factory.mktemp("tls") / "server.log"
    proc = ServerProcess(args, log_path=log)
    # ServerProcess.start waits for SERVING with a plaintext health check: give it the CA
    ca = certs.ca.read_bytes()
    plain = support_grpc.health_status
    support_grpc.health_status = lambda address, service="", **_: plain(  # type: ignore[assignment]
        address, service, root_certificates=ca
    )
    try:
        proc.start()
    finally:
        support_grpc.health_status = plain  # type: ignore[assignment]
    yield proc, certs
    proc.stop_kill()


def _localhost(address: str) -> str:
    return address.replace("127.0.0.1", "localhost")


def test_tls_with_the_right_ca_is_served(tls_server: tuple[ServerProcess, Certs]) -> None:
    proc, certs = tls_server
    env = _env(_localhost(proc.address), QR_GRPC_TLS_CA_FILE=str(certs.ca))
    source = build_entropy(load_settings(env=env, env_file=None))
    chunk = source.fetch([256])[0]
    source.close()
    assert not chunk.fallback and chunk.source == "quantum_grpc" and len(chunk.data) == 256


@pytest.mark.parametrize("client", ["system-roots", "other-ca", "plaintext"])
def test_tls_is_verified_by_default_and_failures_are_labelled(
    tls_server: tuple[ServerProcess, Certs], client: str, tmp_path: Path
) -> None:
    proc, _ = tls_server
    extra: dict[str, str] = {}
    if client == "system-roots":  # TLS on, no CA given: the system's CA bundle
        extra["QR_GRPC_USE_TLS"] = "true"
    elif client == "other-ca":  # a CA that did not sign the server's certificate
        extra["QR_GRPC_TLS_CA_FILE"] = str(make_certs(tmp_path / "other").ca)
    env = _env(_localhost(proc.address), QR_GRPC_TIMEOUT_MS="3000", **extra)
    settings = load_settings(env=env, env_file=None)
    primary = QuantumGrpcSource.from_settings(settings)
    with pytest.raises(EntropyError) as info:
        primary.fetch([64])
    assert info.value.reason == "unavailable", info.value
    source = FallbackSource(primary, SystemEntropySource())
    chunks = source.fetch([64, 64])
    source.close()
    assert all(c.fallback and c.fallback_reason.startswith("unavailable: ") for c in chunks)
    assert all(c.source == "system" and len(c.data) == 64 for c in chunks)
