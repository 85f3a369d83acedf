"""Probe: cost of the tensor primitives a selection design could use (CUDA or CPU).

Not a target benchmark: it informs the design of ``qr_sampler.sampling.select``.
Run: ``python -m benchmarks.probe_gpu_primitives [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, iters: int = 30) -> float:
    """Median milliseconds of ``fn`` (device events on CUDA, wall clock otherwise)."""
    for _ in range(3):
        fn()
    times = []
    deadline = time.monotonic() + 5.0
    for _ in range(iters):
        if device.type == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.monotonic() > deadline:
            break
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--vocab", type=int, default=151_936)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"device {dev} torch {torch.__version__}")
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(dev))
    for b in [int(s) for s in args.batches.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(b, args.vocab, generator=g) * 3).to(dev)
        temp = torch.full((b,), 0.7, device=dev)
        rows: dict[str, Callable[[], object]] = {}

        def native() -> object:
            y = x.clone()  # noqa: B023
            y.div_(temp.unsqueeze(1))  # noqa: B023
            p = y.softmax(-1, dtype=torch.float32)
            q = torch.empty_like(p).exponential_()
            return p.div_(q).argmax(-1)

        rows["native (clone,div,softmax,exp,argmax)"] = native
        rows["clone"] = lambda: x.clone()  # noqa: B023
        rows["amax"] = lambda: x.amax(-1)  # noqa: B023
        rows["softmax"] = lambda: x.softmax(-1)  # noqa: B023
        rows["logsumexp"] = lambda: torch.logsumexp(x, -1)  # noqa: B023
        rows["exp"] = lambda: x.exp()  # noqa: B023
        rows["sum"] = lambda: x.sum(-1)  # noqa: B023
        rows["exponential_"] = lambda: torch.empty_like(x).exponential_()  # noqa: B023
        rows["ge-count (x>=v).sum"] = lambda: (x >= 1.0).sum(-1)  # noqa: B023
        rows["where+sum"] = lambda: torch.where(x >= 1.0, x, 0.0).sum(-1)  # noqa: B023
        rows["vecdot"] = lambda: torch.linalg.vecdot(x, x)  # noqa: B023
        rows["cumsum f32"] = lambda: x.cumsum(-1)  # noqa: B023
        rows["cumsum bool->int32"] = lambda: (x > 2.0).cumsum(-1, dtype=torch.int32)  # noqa: B023
        for k in (64, 256, 1024, 4096):
            rows[f"topk {k}"] = lambda k=k: torch.topk(x, k, -1)  # noqa: B023
        rows["sort"] = lambda: torch.sort(x, -1, descending=True)  # noqa: B023
        rows["sort stable"] = lambda: torch.sort(x, -1, descending=True, stable=True)  # noqa: B023
        for nb in (256, 2048):
            m = x.amax(-1, keepdim=True)

            def hist(nb: int = nb, m: torch.Tensor = m) -> object:
                idx = ((m - x) * 16).clamp_(0, nb - 1).long()  # noqa: B023
                h = torch.zeros(b, nb, device=dev)  # noqa: B023
                h.scatter_add_(1, idx, x.exp())  # noqa: B023
                return h

            rows[f"hist scatter_add nb={nb}"] = hist

            def hist_idx_only(nb: int = nb, m: torch.Tensor = m) -> object:
                return ((m - x) * 16).clamp_(0, nb - 1).long()  # noqa: B023

            rows[f"  (index part nb={nb})"] = hist_idx_only
        print(f"\nbatch {b}, vocab {args.vocab}")
        for name, fn in rows.items():
            try:
                ms = timed(fn, dev)
                print(f"  {name:40s} {ms:8.3f} ms")
            except Exception as exc:  # a probe reports, never stops
                print(f"  {name:40s} failed: {type(exc).__name__}: {exc}"[:160])


if __name__ == "__main__":
    main()
