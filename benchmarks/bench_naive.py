"""Target 2: the batched pipeline against the naive design, on the CPU.

The naive design (written here as the comparison, never shipped): row by row on
the host in numpy -- one entropy fetch per row, amplify that row's bytes,
temperature, softmax, a full stable sort, top-k / top-p, the CDF pick, force the
row, build its record. The pipeline does the same work batched: one fetch for
the batch, vectorised amplification, tensor selection with the chunked head.

Both use the same in-memory entropy pool, the same logits (vocab 151,936,
N(0, 1) * 3) and the default settings; both produce one record per row (the
pipeline writes its records to a null sink). Target: >= 20x at batch 32.

Run: ``python -m benchmarks.bench_naive [--batch 32]``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

from benchmarks.common import PoolSource, interleaved_ms, machine, verdict
from qr_sampler.config import UNIFORM_BYTE_MEAN, UNIFORM_BYTE_STD, SamplingConfig, load_settings
from qr_sampler.hostmem import tune_host_allocator
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
from qr_sampler.sampling.select import set_fused_kernels

VOCAB = 151_936


def naive_step(
    logits: torch.Tensor, configs: list[SamplingConfig], source: PoolSource
) -> list[dict[str, Any]]:
    """Row by row on the host: fetch, amplify, select, force, record."""
    records = []
    for i, cfg in enumerate(configs):
        chunk = source.fetch([cfg.sample_count])[0]
        mean = float(np.frombuffer(chunk.data, dtype=np.uint8).mean())
        z = (mean - UNIFORM_BYTE_MEAN) / (UNIFORM_BYTE_STD / math.sqrt(len(chunk.data)))
        u = min(max(0.5 * math.erfc(-z / math.sqrt(2.0)), 1e-10), 1 - 1e-10)
        t = cfg.fixed_temperature if cfg.fixed_temperature > 0 else 1.0
        x = logits[i].numpy().astype(np.float64) / t
        order = np.argsort(-x, kind="stable")
        xs = x[order]
        k = cfg.top_k if 0 < cfg.top_k < len(xs) else len(xs)
        xs = xs[:k]
        p = np.exp(xs - xs.max())
        p /= p.sum()
        p = np.where(p >= cfg.min_p * p[0], p, 0.0)
        p /= p.sum()
        cum = np.cumsum(p)
        if cfg.top_p < 1.0:
            n = int(np.searchsorted(cum - p, cfg.top_p, side="left"))
            p = p[: max(n, 1)] / cum[max(n, 1) - 1]
            cum = np.cumsum(p)
        rank = min(int(np.searchsorted(cum, u, side="right")), len(p) - 1)
        token = int(order[rank])
        logits[i].fill_(float("-inf"))
        logits[i, token] = 0.0
        records.append(
            {
                "row": i,
                "token_id": token,
                "rank": rank,
                "probability": float(p[rank]),
                "u": u,
                "z": z,
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--compile-cpu", action="store_true", help="torch.compile the device step")
    ap.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's default malloc thresholds (the vLLM adapter raises them)",
    )
    args = ap.parse_args(argv)
    tuned = False if args.no_malloc_tuning else tune_host_allocator()
    if args.compile_cpu:
        set_fused_kernels(True, devices=("cuda", "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {machine()}; torch.compile on the CPU: {args.compile_cpu}; "
        f"malloc thresholds raised as in the vLLM worker: {tuned}"
    )
    gen = torch.Generator().manual_seed(7)
    pristine = torch.randn(args.batch, VOCAB, generator=gen) * 3
    work = torch.empty_like(pristine)
    config = SamplingConfig()
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    pipe = SamplingPipeline(settings, source=PoolSource(seed=1), sink=RecordSink(None))
    rows = [RowState.of(config, f"r{i}") for i in range(args.batch)]
    naive_source = PoolSource(seed=1)
    # measured one after the other, not interleaved: interleaving the naive
    # version's many small numpy arrays with the pipeline's large temporaries
    # made the allocator return and re-fault memory on every call (5x slower)
    times: dict[str, float] = {}
    for name, fn in (
        ("naive", lambda: naive_step(work, [config] * args.batch, naive_source)),
        ("pipeline", lambda: pipe.sample(work, rows)),
    ):
        times.update(
            interleaved_ms(
                {name: fn},
                setup=lambda: work.copy_(pristine),
                iters=args.iters,
                warmup=1,
                budget_s=args.budget_s,
            )
        )
    pipe.close()
    speedup = times["naive"] / times["pipeline"]
    print(
        f"batch {args.batch}: naive {times['naive']:.1f} ms/step, "
        f"pipeline {times['pipeline']:.1f} ms/step, speed-up {speedup:.1f}x"
    )
    print(
        verdict(
            f"target 2 cpu batch {args.batch} naive/pipeline", speedup, 20, higher_is_better=True
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
