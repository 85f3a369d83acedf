"""Probe: the exact radix search on a GPU -- the Triton kernel
(:mod:`qr_sampler.sampling.radix_kernel`) against the native exponential-race
draw on the same logits, and its answers against the full sort.

Times ``row statistics (``--stats``) + kernel`` per call with the results brought
to the host (one sync), like the native draw. Not a target (``bench_sampling``
measures the whole pipeline); run on the device tool:
``python -m benchmarks.probe_radix --device cuda``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import interleaved_ms, machine
from qr_sampler.sampling.select import (
    SelectionParams,
    effective_temperature,
    row_stats,
    select_sorted,
)

VOCAB = 151_936


def main(argv: list[str] | None = None) -> int:
    from qr_sampler.sampling import radix_kernel
    from qr_sampler.sampling.radix_kernel import select_radix_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--schedule",
        default=",".join(map(str, radix_kernel.SCHEDULE)),
        help="key bits decided by each pass, comma-separated (32 in all)",
    )
    ap.add_argument("--block", type=int, default=radix_kernel.BLOCK, help="ids per iteration")
    ap.add_argument("--warps", type=int, default=radix_kernel.WARPS, help="warps per program")
    ap.add_argument(
        "--per-sm", type=int, default=radix_kernel.PROGRAMS_PER_SM, help="programs per SM"
    )
    ap.add_argument(
        "--stats",
        default="kernel",
        choices=["kernel", "torch"],
        help="row statistics: the Triton kernels (the pipeline's on CUDA) or compiled torch",
    )
    args = ap.parse_args(argv)
    radix_kernel.SCHEDULE = tuple(int(b) for b in args.schedule.split(","))
    radix_kernel.BLOCK = args.block
    radix_kernel.WARPS, radix_kernel.PROGRAMS_PER_SM = args.warps, args.per_sm
    dev = torch.device(args.device)
    print(
        f"machine: {machine()}; logits {args.dtype}; schedule {args.schedule}, block {args.block}, "
        f"warps {args.warps}, programs per SM {args.per_sm}; row statistics: {args.stats}"
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        logits = (torch.randn(batch, VOCAB, generator=gen) * 3).to(getattr(torch, args.dtype))
        logits = logits.to(dev)
        params = SelectionParams(
            temperature=torch.full((batch,), 0.7, device=dev),
            top_k=torch.zeros(batch, dtype=torch.int64, device=dev),
            top_p=torch.ones(batch, dtype=torch.float64, device=dev),
            min_p=torch.zeros(batch, dtype=torch.float64, device=dev),
            u=torch.rand(batch, generator=gen, dtype=torch.float64).to(dev),
        )
        work = torch.empty(batch, VOCAB, device=dev)

        def native(work: torch.Tensor = work, logits: torch.Tensor = logits) -> Any:
            work.copy_(logits)
            work.div_(0.7)
            probs = work.softmax(dim=-1, dtype=torch.float32)
            q = torch.empty_like(probs).exponential_()
            return probs.div_(q).argmax(dim=-1).cpu()

        def kernel(logits: torch.Tensor = logits, params: SelectionParams = params) -> Any:
            t = effective_temperature(params)
            if args.stats == "kernel":
                max_logit, _entropy, _finite, lse = radix_kernel.row_stats_kernel(logits, t)
            else:
                stats = row_stats(logits, t)
                assert stats.lse is not None
                max_logit, lse = stats.max_logit, stats.lse
            sel = select_radix_kernel(logits, params, lse, max_logit)
            return sel.token_ids.cpu()

        got = kernel()
        ref = select_sorted(logits, params).token_ids.cpu()
        same = int((got == ref).sum())
        times = interleaved_ms({"native": native, "kernel": kernel}, iters=args.iters)
        print(
            f"batch {batch}: native {times['native']:.3f} ms, stats+kernel "
            f"{times['kernel']:.3f} ms ({times['kernel'] / times['native']:.2f}x); "
            f"{same}/{batch} rows equal the full sort"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
