"""Run every benchmark (``make bench``) and print each target's verdict at the end.

Each benchmark runs in its own process (clean memory, no shared torch state),
one after the other. Speed is never a test: nothing here fails a build; the exit
status is 0 unless a benchmark itself crashed. The GPU variant of target 1 runs
only where CUDA is available (see benchmarks/RESULTS.md for the device runs).

Run: ``python -m benchmarks.run_all [--only sampling,naive,...]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BENCHMARKS: dict[str, list[str]] = {
    "sampling": ["benchmarks.bench_sampling", "--batches", "1,8,64,256"],
    "naive": ["benchmarks.bench_naive"],
    "memory": ["benchmarks.bench_memory"],
    "transport": ["benchmarks.bench_transport"],
    "e2e": ["benchmarks.bench_e2e"],
}


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    args = ap.parse_args(argv)
    chosen = [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; allowed: {', '.join(BENCHMARKS)}")
    jobs = [(name, BENCHMARKS[name]) for name in chosen]
    if "sampling" in chosen and _cuda():
        jobs.append(("sampling-cuda", [*BENCHMARKS["sampling"], "--device", "cuda"]))
    verdicts: list[str] = []
    crashed: list[str] = []
    for name, cmd in jobs:
        print(f"\n=== {name}: python -m {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True, check=False
        )
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            crashed.append(name)
            sys.stdout.write(proc.stderr[-4000:])
        verdicts += [line for line in proc.stdout.splitlines() if line.startswith("target ")]
        print(f"=== {name}: {time.monotonic() - start:.0f} s, exit {proc.returncode}", flush=True)
    print("\nSummary (ratios against baselines measured in the same run):")
    for line in verdicts:
        print("  " + line)
    for name in crashed:
        print(f"  {name}: the benchmark crashed (see its output above)")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
