"""Bad process configuration stops the real vLLM server at start-up with one
clear line naming the variable — no traceback, no engine started.

The check is the plugin's ``vllm.general_plugins`` entry point
(``qr_sampler.vllm.startup``), loaded by vLLM itself; the configuration comes
from the environment or from a ``.env`` file in the server's working directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support_vllm import VLLMServer, tiny_model

pytestmark = pytest.mark.engine

SECRET = "startup-secret-9fJq2"

CASES: list[tuple[str, dict[str, str], str, str]] = [
    # id, environment, .env file content, variable the line must name
    ("out-of-range", {"QR_TOP_K": "-1"}, "", "QR_TOP_K"),
    ("unknown-choice", {"QR_FALLBACK_MODE": "sometimes"}, "", "QR_FALLBACK_MODE"),
    ("unknown-variable", {"QR_TEMPRATURE": "0.5"}, "", "QR_TEMPRATURE"),
    ("dotenv-file", {}, "QR_SAMPLE_COUNT=0\n", "QR_SAMPLE_COUNT"),
    (
        "secret-stays-secret",
        {"QR_GRPC_API_KEY": SECRET, "QR_GRPC_TIMEOUT_MS": "soon"},
        "",
        "QR_GRPC_TIMEOUT_MS",
    ),
]


@pytest.mark.parametrize("case, env, dotenv, variable", CASES, ids=[c[0] for c in CASES])
def test_bad_configuration_refuses_to_start_with_one_line(
    tmp_path: Path, case: str, env: dict[str, str], dotenv: str, variable: str
) -> None:
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    server = VLLMServer(tiny_model(), env, log_path=tmp_path / "vllm.log")
    try:
        code = server.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"{case}: the server kept running with bad configuration")
    finally:
        server.stop()
    log = server.log_text()
    lines = [line for line in log.splitlines() if line.startswith("qr-sampler:")]
    assert code != 0
    assert len(lines) == 1, log[-3000:]
    assert "invalid configuration" in lines[0] and variable in lines[0], lines[0]
    assert "Traceback" not in log, log[-3000:]
    assert SECRET not in log
    assert "EngineCore" not in log, "an engine was started despite the bad configuration"
