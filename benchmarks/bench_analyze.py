"""Benchmark: `qr-sampler analyze` on 1,000,000 synthetic records (target: < 30 s).

Writes a temporary JSONL file with the same fields and value shapes as real
records (z and u computed from integer byte sums with the sampler's own
amplifier, so the integrity check passes), then runs the real command line in a
subprocess, end to end (interpreter start, imports, parse, statistics, plot),
and prints the wall time and its ratio to the 30 s target.

    .venv/bin/python benchmarks/bench_analyze.py [--records N] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qr_sampler.config import UNIFORM_BYTE_STD
from qr_sampler.records import RECORD_FIELDS, TokenRecord
from qr_sampler.sampling.amplify import amplify_means

TARGET_S = 30.0
BYTES_PER_TOKEN = 20480


def write_records(path: Path, n: int, seed: int = 1) -> None:
    """``n`` synthetic records, 8 rows per step, three labels, 2% fallback."""
    rng = np.random.default_rng(seed)
    # byte sums of 20480 uniform bytes: normal with the exact mean and variance
    sums = np.rint(
        rng.normal(127.5 * BYTES_PER_TOKEN, UNIFORM_BYTE_STD * math.sqrt(BYTES_PER_TOKEN), n)
    )
    means = sums / BYTES_PER_TOKEN
    amp = amplify_means(means, np.full(n, float(BYTES_PER_TOKEN)), 127.5, UNIFORM_BYTE_STD, 1e-10)
    ranks = np.minimum(rng.geometric(0.6, n) - 1, 4095)
    probs = rng.uniform(0.001, 1.0, n)
    fallback = rng.random(n) < 0.02
    labels = np.array(["control", "intention-high", "intention-low"])[rng.integers(0, 3, n)]
    tokens = rng.integers(0, 32000, n)
    t0 = time.time_ns()
    template = TokenRecord(
        schema=1,
        time_ns=0,
        step_started_ns=0,
        label="",
        request_id="",
        row=0,
        step=0,
        token_id=0,
        rank=0,
        probability=0.0,
        num_candidates=0,
        temperature=0.7,
        temperature_strategy="fixed",
        shannon_entropy=0.0,
        u=0.0,
        z=0.0,
        sample_mean=0.0,
        byte_count=BYTES_PER_TOKEN,
        entropy_source="",
        device_id="",
        server_timestamp_ns=0,
        sequence_id=0,
        fallback=False,
        fallback_reason="",
        health="ok",
        fetch_latency_ns=0,
        sampling_latency_ns=0,
        config_hash="3f2a9c0d11b7e6a4",
    ).to_dict()
    assert tuple(template) == RECORD_FIELDS
    with path.open("w", encoding="utf-8") as fh:
        batch: list[str] = []
        for i in range(n):
            step, row = divmod(i, 8)
            fb = bool(fallback[i])
            rec = dict(template)
            rec.update(
                time_ns=t0 + step * 20_000_000 + 9_000_000,
                step_started_ns=t0 + step * 20_000_000,
                label=str(labels[i]),
                request_id=f"chatcmpl-{step // 64:08x}-{row}",
                row=row,
                step=step + 1,
                token_id=int(tokens[i]),
                rank=int(ranks[i]),
                probability=float(probs[i]),
                num_candidates=4096,
                shannon_entropy=float(probs[i] * 3.0),
                u=float(amp.u[i]),
                z=float(amp.z[i]),
                sample_mean=float(means[i]),
                entropy_source="system" if fb else "quantum_grpc",
                device_id="os.urandom" if fb else "qrng-0",
                server_timestamp_ns=t0 + step * 20_000_000 + 2_000_000,
                sequence_id=-1 if fb else step,
                fallback=fb,
                fallback_reason="unavailable: deadline exceeded" if fb else "",
                health="off" if fb else "ok",
                fetch_latency_ns=1_800_000,
                sampling_latency_ns=8_500_000,
            )
            batch.append(json.dumps(rec, separators=(",", ":")))
            if len(batch) == 10_000:
                fh.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            fh.write("\n".join(batch) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="also keep the records file here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qr-bench-analyze-") as tmp:
        path = args.keep or Path(tmp) / "records.jsonl"
        t = time.perf_counter()
        write_records(path, args.records)
        gen_s = time.perf_counter() - t
        size_mb = path.stat().st_size / 1e6
        print(f"generated {args.records:,} records ({size_mb:,.0f} MB) in {gen_s:.1f} s")
        plot = Path(tmp) / "walk.png"
        cmd = [sys.executable, "-m", "qr_sampler.cli", "analyze", str(path)]
        cmd += ["--by", "label", "--plot", str(plot)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr)
            print(f"analyze exited with status {proc.returncode}")
            return 1
        print(proc.stdout.splitlines()[1])
        print(
            f"analyze (end to end, --by label --plot): {wall:.2f} s for {args.records:,} records; "
            f"{wall / TARGET_S:.2f}x the {TARGET_S:.0f} s target "
            f"({args.records / wall:,.0f} records/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
