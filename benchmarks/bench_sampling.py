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
resolve (each such step costs a second, small sync; 0 where the radix search
answers those rows: no top-k/top-p on CUDA, unless ``--radix off``).

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

from benchmarks.common import PoolSource, interleaved_ms, machine, verdict
from qr_sampler.config import SamplingConfig, load_settings
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
from qr_sampler.sampling.select import (
    DEFAULT_CHUNK,
    DEFAULT_HEAD,
    SelectionParams,
    effective_temperature,
    force_tokens,
    row_stats,
    select_chunked,
    set_fused_kernels,
)

VOCAB = 151_936
HEAD = DEFAULT_HEAD  # chunks ordered by the pipeline's head (--head)
CHUNK = 0  # token ids per chunk (--chunk; 0: the pipeline's default for the device)
RADIX = "auto"  # selection of rows without top-k/top-p (--radix)
GRAPHS = "on"  # CUDA graphs of the device step: on, off, or both (--graphs)


def _randn3(batch: int, gen: torch.Generator) -> torch.Tensor:
    """N(0, 1) * 3: the issue's random logits (a heavy, flat tail)."""
    return torch.randn(batch, VOCAB, generator=gen) * 3


def _zipf_bf16(batch: int, gen: torch.Generator) -> torch.Tensor:
    """A language-model-like row: logit -1.1 ln(rank) plus noise at random token
    ids, rounded to bf16 (many exact ties, as a bf16 model's logits have)."""
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    out = torch.empty(batch, VOCAB)
    for i in range(batch):
        base = -1.1 * torch.log(ranks) + 0.3 * torch.randn(VOCAB, generator=gen)
        out[i, torch.randperm(VOCAB, generator=gen)] = base
    return (out + 20).to(torch.bfloat16).float()


LOGITS = {"randn3": _randn3, "zipf_bf16": _zipf_bf16}
MAKE_LOGITS = _randn3
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

    def race(probs: torch.Tensor) -> torch.Tensor:
        return probs.div_(torch.empty_like(probs).exponential_()).argmax(dim=-1)

    return _native_step(apply_top_k_top_p, race)


def _native_step(
    apply_top_k_top_p: Callable[..., torch.Tensor], draw: Callable[[torch.Tensor], torch.Tensor]
) -> NativeFn:
    """vLLM's native order: temperature, top-k/top-p, softmax, the draw, ids to the host."""

    def sample(
        logits: torch.Tensor, temp: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> Any:
        logits.div_(temp.unsqueeze(1))
        logits = apply_top_k_top_p(logits, k, p)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        return draw(probs).cpu()

    return sample


def native_sampler() -> tuple[str, NativeFn]:
    """vLLM's native sampler functions when vllm imports, else the torch equivalent."""
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p, random_sample
    except Exception:
        return "torch equivalent of vLLM forward_native", _torch_native()

    return "vllm.v1.sample.ops.topk_topp_sampler (forward_native path)", _native_step(
        apply_top_k_top_p, lambda probs: random_sample(probs, {})
    )


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
    return sum("called a synchronizing" in str(w.message) for w in caught)


def run(
    device: torch.device, batches: list[int], iters: int, budget_s: float
) -> list[dict[str, Any]]:
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
        sources = [MAKE_LOGITS(batch, gen).to(device) for _ in range(n_sets)]
        for label, overrides in SETTINGS.items():
            cells = _measure(
                Case(device, sources, SamplingConfig(**overrides), settings),
                native,
                cpu_forward,
                iters,
                budget_s,
            )
            cells["settings"] = label
            results.append(cells)
            print(_row(cells), flush=True)
        del sources
    return results


class Case:
    """One batch size and setting: pristine logits, a work buffer, the pipeline."""

    def __init__(
        self,
        device: torch.device,
        sources: list[torch.Tensor],
        config: SamplingConfig,
        settings: Any,
    ) -> None:
        self.device = device
        self.sources = sources
        self.config = config
        self.batch = sources[0].shape[0]
        self.work = torch.empty_like(sources[0])
        self.turn = 0
        self.rows = [RowState.of(config, f"r{i}") for i in range(self.batch)]
        self.pipe = self._pipeline(settings, GRAPHS != "off")
        # --graphs both: the same step without graphs, timed in the same rounds
        self.eager = self._pipeline(settings, False) if GRAPHS == "both" else None
        b = self.batch
        self.temp = torch.full((b,), config.fixed_temperature, device=device)
        self.k = torch.full((b,), config.top_k, device=device) if config.top_k else None
        self.p = torch.full((b,), config.top_p, device=device) if config.top_p < 1 else None
        self.u = np.random.default_rng(b).random(b)

    @staticmethod
    def _pipeline(settings: Any, graphs: bool) -> SamplingPipeline:
        pipe = SamplingPipeline(
            settings, source=PoolSource(), sink=RecordSink(None), head_size=HEAD
        )
        pipe.chunk = CHUNK or None
        pipe.radix = None if RADIX == "auto" else RADIX
        pipe.graphs.enabled = graphs
        return pipe

    def refill(self) -> None:
        self.work.copy_(self.sources[self.turn % len(self.sources)])
        self.turn += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def math_step(self, pipe: SamplingPipeline | None = None) -> None:
        ids, _ = (pipe or self.pipe).choose(self.work, None, self.rows, self.u)
        force_tokens(self.work, None, ids)

    def step(self, pipe: SamplingPipeline | None = None) -> None:
        (pipe or self.pipe).sample(self.work, self.rows)


def _measure(
    case: Case, native: NativeFn, cpu_forward: NativeFn | None, iters: int, budget_s: float
) -> dict[str, Any]:
    fns: dict[str, Callable[[], Any]] = {
        "native_ms": lambda: native(case.work, case.temp, case.k, case.p),
        "math_ms": case.math_step,
        "step_ms": case.step,
    }
    eager = case.eager
    if eager is not None:
        fns["math_eager_ms"] = lambda: case.math_step(eager)
        fns["step_eager_ms"] = lambda: case.step(eager)
    if cpu_forward is not None:
        fns["vllm_cpu_fused_ms"] = lambda: cpu_forward(case.work, case.temp, case.k, case.p)
    cells: dict[str, Any] = {"batch": case.batch}
    cells.update(interleaved_ms(fns, setup=case.refill, iters=iters, budget_s=budget_s))
    cells["math_ratio"] = cells["math_ms"] / cells["native_ms"]
    cells["step_ratio"] = cells["step_ms"] / cells["native_ms"]
    radix_rows = case.config.top_k <= 0 and case.config.top_p >= 1.0
    if radix_rows and case.pipe._radix_mode(case.device) != "off":
        cells["fallback_rows"] = 0.0  # the radix search answers every row in the one pass
    else:
        cells["fallback_rows"] = _unresolved_rows(case.sources, case.config, case.u)
    if case.device.type == "cuda":
        case.refill()
        cells["syncs_native"] = count_syncs(fns["native_ms"])
        case.refill()
        cells["syncs_step"] = count_syncs(case.step)
    cells["graphs_captured"] = case.pipe.graphs.captures
    case.pipe.close()
    if eager is not None:
        eager.close()
    return cells


def _unresolved_rows(sources: list[torch.Tensor], config: SamplingConfig, u: np.ndarray) -> float:
    """Mean rows per step that the chunked head leaves to the exact fallback."""
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
        chunk = CHUNK or (4 if dev.type == "cpu" else DEFAULT_CHUNK)
        _, resolved = select_chunked(logits, params, stats.lse, stats.num_finite, HEAD, chunk)
        total += int((~resolved).sum())
    return total / len(sources)


def _row(c: dict[str, Any]) -> str:
    extra = ""
    if "vllm_cpu_fused_ms" in c:
        extra += f"  (vLLM fused CPU sampler {c['vllm_cpu_fused_ms']:.2f} ms)"
    if "step_eager_ms" in c:
        m, st = c["math_eager_ms"], c["step_eager_ms"]
        extra += f"  no graphs: math {m:.3f} ms ({m / c['native_ms']:.2f}x)"
        extra += f" step {st:.3f} ms ({st / c['native_ms']:.2f}x)"
    if c.get("graphs_captured"):
        extra += f"  graphs {c['graphs_captured']}"
    if "syncs_step" in c:
        extra += f"  syncs/step {c['syncs_step']} (native {c['syncs_native']})"
    return (
        f"batch {c['batch']:>3} {c['settings']:<18} native {c['native_ms']:8.3f} ms  "
        f"math {c['math_ms']:8.3f} ms ({c['math_ratio']:.2f}x)  "
        f"step {c['step_ms']:8.3f} ms ({c['step_ratio']:.2f}x)  "
        f"fallback rows {c['fallback_rows']:.1f}{extra}"
    )


def profile_step(device: torch.device, batch: int) -> None:
    """torch.profiler table of one pipeline math step and one native step."""
    from torch.profiler import ProfilerActivity, profile

    settings = load_settings(env={}, env_file=None, entropy_source_type="mock_uniform")
    logits = MAKE_LOGITS(batch, torch.Generator().manual_seed(0)).to(device)
    case = Case(device, [logits], SamplingConfig(top_k=50, top_p=0.9), settings)
    _, native = native_sampler()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in (("pipeline math", case.math_step), ("native", None)):
        for _ in range(3):
            case.refill()
            if fn is None:
                native(case.work, case.temp, case.k, case.p)
            else:
                fn()
        case.refill()
        with profile(activities=acts) as prof:
            if fn is None:
                native(case.work, case.temp, case.k, case.p)
            else:
                fn()
        print(f"\n{name}, batch {batch}, top_k=50, top_p=0.9:")
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            if key == "self_cuda_time_total" and device.type != "cuda":
                continue
            print(prof.key_averages().table(sort_by=key, row_limit=10))
    case.pipe.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=20.0, help="time bound per cell")
    ap.add_argument("--head", type=int, default=DEFAULT_HEAD, help="chunks in the head")
    ap.add_argument(
        "--compile",
        choices=["dynamic", "auto", "static", "off"],
        default="auto",
        help="torch.compile of the device step on CUDA",
    )
    ap.add_argument("--chunk", type=int, default=0, help="token ids per chunk (0: default)")
    ap.add_argument("--compile-cpu", action="store_true", help="torch.compile on the CPU too")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--logits", choices=sorted(LOGITS), default="randn3")
    ap.add_argument(
        "--radix",
        choices=["auto", "off", "kernel", "torch"],
        default="auto",
        help="rows without top-k/top-p: the pipeline's default (auto: the radix kernel "
        "on CUDA, the chunked head on the CPU), the chunked head (off) or the exact "
        "radix search",
    )
    ap.add_argument(
        "--graphs",
        choices=["on", "off", "both"],
        default="on",
        help="CUDA graphs of the device step (both: also time the step without them)",
    )
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one step")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile != "off":
        dyn = {"dynamic": True, "auto": None, "static": False}[args.compile]
        devices = ("cuda", "cpu") if args.compile_cpu else ("cuda",)
        set_fused_kernels(True, dynamic=dyn, mode=args.mode, devices=devices)
    else:
        set_fused_kernels(False)
    global MAKE_LOGITS
    MAKE_LOGITS = LOGITS[args.logits]
    print(
        f"logits: {args.logits}; torch.compile: {args.compile} mode {args.mode} "
        f"(CPU too: {args.compile_cpu}); "
        f"head {args.head} chunks of {args.chunk}; radix search {args.radix}"
    )
    global HEAD, CHUNK, RADIX, GRAPHS
    HEAD, CHUNK, RADIX, GRAPHS = args.head, args.chunk, args.radix, args.graphs
    batches = [int(b) for b in args.batches.split(",")]
    results = run(device, batches, args.iters, args.budget_s)
    limit, floor = (2.0, 8) if device.type == "cpu" else (1.5, 64)
    print()
    for c in results:
        if c["batch"] >= floor:
            name = f"target 1 {device.type} batch {c['batch']} {c['settings']} step/native"
            print(verdict(name, c["step_ratio"], limit, higher_is_better=False))
    if args.profile:
        profile_step(device, batches[-1])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
