"""Target 1: the sampling pipeline against native sampling on identical logits.

Vocabulary 151,936, batch 1 / 8 / 64 / 256, random logits (N(0, 1) * 3, the
scale of the issue's orientation numbers), two settings: the defaults
(T = 0.7, no truncation) and top_k = 50, top_p = 0.9. Entropy comes from an
in-memory pool (:class:`benchmarks.common.PoolSource`), so the step measures math.

Baseline ("native"): temperature, then vLLM's own sampler functions from the
installed vllm (``vllm/v1/sample/ops/topk_topp_sampler.py``: ``apply_top_k_top_p``,
softmax, ``random_sample`` -- the exponential race of ``forward_native``) where
they import; otherwise an equivalent torch sampler written here (the GPU machine
has no vLLM). Both end with the chosen ids on the host (vLLM copies them every
step), the pipeline with its one result copy.

Columns (median ms per step): ``native``; ``math`` = the pipeline's device stage
(``choose`` + ``force_tokens``, the u values given); ``step`` = the whole
``SamplingPipeline.sample`` (entropy from the pool, amplification, records to a
null sink). Ratios are against ``native`` of the same run. On CUDA the number of
host<->device syncs of one step is counted with torch's sync debug mode, and
``fallback`` is the mean number of rows per step the chunked head could not
resolve (each such step costs a second, small sync).

Run: ``python -m benchmarks.bench_sampling [--device cuda] [--batches 1,8,64,256]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import PoolSource, machine, median_ms, verdict
from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
from qr_sampler.sampling.select import (
    SelectionParams,
    effective_temperature,
    force_tokens,
    row_stats,
    select_chunked,
)

VOCAB = 151_936
SETTINGS = {
    "default": {},
    "top_k=50,top_p=0.9": {"top_k": 50, "top_p": 0.9},
}

NativeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], Any]


def _torch_native() -> NativeFn:
    """An equivalent of vLLM's native path in plain torch (used without vLLM)."""

    def apply_top_k_top_p(
        logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> torch.Tensor:
        if k is None and p is None:
            return logits
        vals, idx = logits.sort(dim=-1, descending=False)
        if k is not None:
            cut = vals.gather(1, (vals.size(1) - k.long()).unsqueeze(1))
            vals.masked_fill_(vals < cut, float("-inf"))
        if p is not None:
            cum = vals.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1 - p.unsqueeze(1)
            drop[:, -1] = False
            vals.masked_fill_(drop, float("-inf"))
        return logits.scatter_(-1, idx, vals)

    def sample(
        logits: torch.Tensor, temp: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> Any:
        logits.div_(temp.unsqueeze(1))
        logits = apply_top_k_top_p(logits, k, p)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        q = torch.empty_like(probs).exponential_()
        return probs.div_(q).argmax(dim=-1).cpu()

    return sample


def native_sampler() -> tuple[str, NativeFn]:
    """vLLM's native sampler functions when vllm imports, else the torch equivalent."""
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, random_sample
    except Exception:
        return "torch equivalent of vLLM forward_native", _torch_native()

    def sample(
        logits: torch.Tensor, temp: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> Any:
        logits.div_(temp.unsqueeze(1))
        logits = apply_top_k_top_p(logits, k, p)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        return random_sample(probs, {}).cpu()

    return "vllm.v1.sample.ops.topk_topp_sampler (forward_native path)", sample


def vllm_cpu_forward() -> NativeFn | None:
    """vLLM's CPU sampler as it runs on x86 (fused Gumbel argmax), for information."""
    try:
        import vllm._C  # noqa: F401  (registers the fused CPU kernels)
        from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

        sampler = TopKTopPSampler()
        if sampler.forward != sampler.forward_cpu:  # type: ignore[comparison-overlap]
            return None
        probe = torch.zeros(1, 8)
        sampler.forward_cpu(probe, {}, None, None)
    except Exception:
        return None

    def sample(
        logits: torch.Tensor, temp: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> Any:
        logits.div_(temp.unsqueeze(1))
        return sampler.forward_cpu(logits, {}, k, p)[0].cpu()

    return sample


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host<->device synchronisations ``fn`` performs (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run(device: torch.device, batches: list[int], iters: int, budget_s: float) -> list[dict[str, Any]]:
    native_name, native = native_sampler()
    cpu_forward = vllm_cpu_forward() if device.type == "cpu" else None
    print(f"machine: {machine()}")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")
    print(f"baseline: {native_name}")
    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    results: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for batch in batches:
        n_sets = 3 if device.type == "cuda" else 1
        sources = [(torch.randn(batch, VOCAB, generator=gen) * 3).to(device) for _ in range(n_sets)]
        work = torch.empty_like(sources[0])
        turn = [0]

        def refill(work: torch.Tensor = work, sources: list[torch.Tensor] = sources) -> None:
            work.copy_(sources[turn[0] % len(sources)])
            turn[0] += 1
            if device.type == "cuda":
                torch.cuda.synchronize()

        for label, overrides in SETTINGS.items():
            config = SamplingConfig(**overrides)
            rows = [RowState.of(config, f"r{i}") for i in range(batch)]
            pipe = SamplingPipeline(settings, source=PoolSource(), sink=RecordSink(None))
            temp = torch.full((batch,), config.fixed_temperature, device=device)
            k = torch.full((batch,), config.top_k, device=device) if config.top_k else None
            p = torch.full((batch,), config.top_p, device=device) if config.top_p < 1 else None
            u = np.random.default_rng(batch).random(batch)

            def math_step(
                pipe: SamplingPipeline = pipe, rows: list[RowState] = rows, u: np.ndarray = u
            ) -> None:
                ids, _ = pipe.choose(work, None, rows, u)
                force_tokens(work, None, ids)

            cells: dict[str, Any] = {"batch": batch, "settings": label}
            cells["native_ms"] = median_ms(
                lambda temp=temp, k=k, p=p: native(work, temp, k, p),
                setup=refill,
                iters=iters,
                budget_s=budget_s,
            )
            if cpu_forward is not None:
                cells["vllm_cpu_fused_ms"] = median_ms(
                    lambda temp=temp, k=k, p=p: cpu_forward(work, temp, k, p),
                    setup=refill,
                    iters=iters,
                    budget_s=budget_s,
                )
            cells["math_ms"] = median_ms(math_step, setup=refill, iters=iters, budget_s=budget_s)
            cells["step_ms"] = median_ms(
                lambda pipe=pipe, rows=rows: pipe.sample(work, rows),
                setup=refill,
                iters=iters,
                budget_s=budget_s,
            )
            cells["math_ratio"] = cells["math_ms"] / cells["native_ms"]
            cells["step_ratio"] = cells["step_ms"] / cells["native_ms"]
            cells["fallback_rows"] = _unresolved_rows(sources, config, u)
            if device.type == "cuda":
                refill()
                cells["syncs_native"] = count_syncs(lambda temp=temp, k=k, p=p: native(work, temp, k, p))
                refill()
                cells["syncs_step"] = count_syncs(lambda pipe=pipe, rows=rows: pipe.sample(work, rows))
            pipe.close()
            results.append(cells)
            print(_row(cells), flush=True)
        del sources, work
    return results


def _unresolved_rows(sources: list[torch.Tensor], config: SamplingConfig, u: np.ndarray) -> float:
    """Mean rows per step that the chunked head leaves to the full sort."""
    total = 0
    for logits in sources:
        b = logits.shape[0]
        dev = logits.device
        params = SelectionParams(
            temperature=torch.full((b,), config.fixed_temperature, device=dev),
            top_k=torch.full((b,), config.top_k, dtype=torch.long, device=dev),
            top_p=torch.full((b,), config.top_p, dtype=torch.float64, device=dev),
            min_p=torch.full((b,), config.min_p, dtype=torch.float64, device=dev),
            u=torch.from_numpy(u).to(dev),
        )
        stats = row_stats(logits, effective_temperature(params))
        assert stats.lse is not None
        _, resolved = select_chunked(logits, params, stats.lse, stats.num_finite)
        total += int((~resolved).sum())
    return total / len(sources)


def _row(c: dict[str, Any]) -> str:
    extra = ""
    if "vllm_cpu_fused_ms" in c:
        extra += f"  (vLLM fused CPU sampler {c['vllm_cpu_fused_ms']:.2f} ms)"
    if "syncs_step" in c:
        extra += f"  syncs/step {c['syncs_step']} (native {c['syncs_native']})"
    return (
        f"batch {c['batch']:>3} {c['settings']:<18} native {c['native_ms']:8.3f} ms  "
        f"math {c['math_ms']:8.3f} ms ({c['math_ratio']:.2f}x)  "
        f"step {c['step_ms']:8.3f} ms ({c['step_ratio']:.2f}x)  "
        f"fallback rows {c['fallback_rows']:.1f}{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=8.0, help="time bound per cell")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    results = run(device, batches, args.iters, args.budget_s)
    limit, floor = (2.0, 8) if device.type == "cpu" else (1.5, 64)
    print()
    for c in results:
        if c["batch"] >= floor:
            name = f"target 1 {device.type} batch {c['batch']} {c['settings']} step/native"
            print(verdict(name, c["step_ratio"], limit, higher_is_better=False))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
