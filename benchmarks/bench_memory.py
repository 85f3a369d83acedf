"""Target 5: no memory growth over 100,000 sampled tokens through the pipeline.

Records go to a real JSONL file (a temporary folder), diagnostic mode is on so
the in-memory ring fills to its bound (``QR_DIAGNOSTICS_MAX``, default 10,000),
entropy comes from the seeded mock source. Resident set size (VmRSS) is read at
1,000 tokens, when the ring is full, and at the end; the verdict compares the
end with the point where the ring had filled (after that nothing may grow).

The vocabulary is smaller than a real model's (default 8,192) so the run takes
minutes on a small CPU; memory held per step does not depend on it after the
first step. Run: ``python -m benchmarks.bench_memory [--tokens 100000]``.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, verdict
from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.entropy.mock import MockUniformSource
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop early after this")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.jsonl"
        settings = load_settings(
            env={}, env_file=None, entropy_source_type="mock_uniform", records_path=str(path)
        )
        sink = RecordSink(path, ring_size=settings.diagnostics_max)
        pipe = SamplingPipeline(settings, source=MockUniformSource(seed=9), sink=sink)
        rows = [
            RowState.of(SamplingConfig(diagnostic_mode=True), f"r{i}") for i in range(args.batch)
        ]
        gen = torch.Generator().manual_seed(3)
        pristine = torch.randn(args.batch, args.vocab, generator=gen) * 3
        logits = torch.empty_like(pristine)
        marks: dict[str, float] = {}
        ring_full_at = settings.diagnostics_max + 2 * args.batch
        tokens = 0
        started = time.monotonic()
        while tokens < args.tokens:
            logits.copy_(pristine)
            pipe.sample(logits, rows)
            tokens += args.batch
            if "1k" not in marks and tokens >= 1000:
                sink.flush()
                gc.collect()
                marks["1k"] = rss_mib()
            if "ring_full" not in marks and tokens >= ring_full_at:
                sink.flush()
                gc.collect()
                marks["ring_full"] = rss_mib()
            if time.monotonic() - started > args.max_seconds:
                print(f"stopped after {args.max_seconds:.0f} s (time bound)")
                break
        sink.flush()
        gc.collect()
        marks["end"] = rss_mib()
        written = sink.stats().get("written", 0)
        file_mib = path.stat().st_size / 2**20
        pipe.close()
    elapsed = time.monotonic() - started
    print(
        f"{tokens} tokens in {elapsed:.0f} s; records written {written} ({file_mib:.1f} MiB); "
        f"diagnostic ring {len(sink.recent)} (bound {settings.diagnostics_max})"
    )
    print(
        f"RSS at 1k tokens {marks.get('1k', float('nan')):.1f} MiB, ring full "
        f"({ring_full_at} tokens) {marks.get('ring_full', float('nan')):.1f} MiB, "
        f"at {tokens} tokens {marks['end']:.1f} MiB"
    )
    base = marks.get("ring_full", marks.get("1k", marks["end"]))
    growth = marks["end"] - base
    print(
        verdict(
            "target 5 RSS growth after the ring filled (MiB)", growth, 16, higher_is_better=False
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
