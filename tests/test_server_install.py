"""The server side installs and runs in a clean venv without torch or vLLM.

A fresh ``python -m venv`` (no system site-packages) gets the package from
this checkout without extras — pip resolves the core dependencies from the
machine's configured indexes and its cache. From that venv the example
urandom server and the ``qr-sampler serve`` command run, and this test's own
client fetches bytes from them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support_grpc import REPO, ServerProcess

from qr_sampler.entropy.breaker import BreakerConfig, CircuitBreaker
from qr_sampler.entropy.grpc_client import QuantumGrpcSource
from qr_sampler.entropy.health import HealthMonitor


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("server-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # copy what the build needs, so it never writes into the checkout
    src = root / "pkg"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "src",
        src / "src",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    out = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    yield venv


def run_in(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120
    )


def test_no_torch_no_vllm_but_the_server_imports(server_venv: Path) -> None:
    for heavy in ("torch", "vllm"):
        out = run_in(server_venv, f"import {heavy}")
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, heavy
    out = run_in(
        server_venv,
        "import sys, qr_sampler.server, qr_sampler.server.healthcheck, qr_sampler.entropy; "
        "assert 'torch' not in sys.modules; print(qr_sampler.__file__)",
    )
    assert out.returncode == 0, out.stderr
    assert str(server_venv) in out.stdout  # the installed copy, not this checkout


def fetch_from(address: str) -> int:
    s = QuantumGrpcSource(
        address,
        health=HealthMonitor(),
        breaker=CircuitBreaker(BreakerConfig(min_timeout_s=20, max_timeout_s=30)),
    )
    try:
        chunks = s.fetch([20480, 20480])
        assert all(c.health == "ok" and not c.fallback for c in chunks)
        return sum(len(c.data) for c in chunks)
    finally:
        s.close()


def test_example_server_runs_from_the_clean_venv(server_venv: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qri-") as d:
        proc = ServerProcess(
            address=f"unix://{d}/e.sock",
            script=str(REPO / "examples" / "servers" / "simple_urandom_server.py"),
            python=str(server_venv / "bin" / "python"),
        ).start()
        try:
            assert fetch_from(proc.address) == 40960
            health = subprocess.run(
                [str(server_venv / "bin" / "python"), "-m", "qr_sampler.server.healthcheck",
                 proc.address],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert health.returncode == 0 and health.stdout.strip() == "SERVING"
            assert proc.signal(signal.SIGTERM) == 0
        finally:
            proc.stop_kill()


def test_serve_command_runs_from_the_clean_venv(server_venv: Path) -> None:
    script = server_venv / "bin" / "qr-sampler"
    assert script.is_file()
    proc = ServerProcess(address="127.0.0.1:0", prefix=[str(script), "serve"]).start()
    try:
        assert fetch_from(proc.address) == 40960
        assert proc.signal(signal.SIGINT) == 0
    finally:
        proc.stop_kill()
