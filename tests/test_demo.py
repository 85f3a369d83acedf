"""`make demo`'s script, run for real: urandom entropy server + CPU vLLM + plugin.

The model hub is unreachable on these machines (and HF_HUB_OFFLINE is set by
conftest), so the demo must fall back to the tiny local model and say so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    max_tokens = 6
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--workdir",
            str(tmp_path),
            "--max-tokens",
            str(max_tokens),
        ],
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "THE MODEL HUB IS UNREACHABLE" in out and "TINY RANDOM LOCAL MODEL" in out
    assert "text:" in out
    assert "sources: quantum_grpc (urandom@" in out
    assert "fallback tokens: 0" in out
    records = [
        json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines() if line
    ]
    assert len(records) == max_tokens
    assert {r["label"] for r in records} == {"make-demo"}
    assert all(r["fallback"] is False and r["entropy_source"] == "quantum_grpc" for r in records)
    assert f"tokens: {max_tokens} " in out
    # the demo ended what it started
    stopped = re.findall(r"stopped (.+) \(pid (\d+)\)", out)
    assert {name for name, _ in stopped} == {"vLLM", "entropy server"}
    for _, pid in stopped:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still running"
