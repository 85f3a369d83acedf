"""Configurations the plugin cannot serve stop the real vLLM server at start-up
with one clear line (the ``vllm.general_plugins`` start-up check)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support_vllm import tiny_model

from qr_sampler.vllm.startup import _speculative_in_argv

pytestmark = pytest.mark.engine


def test_speculative_flags_are_recognised() -> None:
    assert _speculative_in_argv(["vllm", "--speculative-config", "{}"])
    assert _speculative_in_argv(["vllm", "--speculative_config={}"])
    assert _speculative_in_argv(["vllm", "-sc", "{}"])
    assert _speculative_in_argv(["vllm", "--speculative-config.method", "ngram"])
    assert not _speculative_in_argv(["vllm", "--model", "m", "--max-model-len", "256"])


def test_speculative_decoding_refuses_to_start_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QR_")}
    env.update({"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    spec = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}'
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model()),
         "--host", "127.0.0.1", "--port", "1", "--max-model-len", "256", "--dtype", "float32",
         "--enforce-eager", "--speculative-config", spec],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if "qr-sampler" in x]
    assert lines == [
        "qr-sampler: cannot run with speculative decoding (draft tokens would be "
        "accepted without entropy); remove --speculative-config"
    ]
    assert "Traceback" not in proc.stderr
