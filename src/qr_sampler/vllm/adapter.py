"""The vLLM adapter: one logits-processor class for both model runners.

vLLM loads :class:`QRSamplerLogitsProcessor` from the ``vllm.logits_processors``
entry point. It subclasses both interfaces:

* **model runner V1** (CPU builds; ``VLLM_USE_V2_MODEL_RUNNER=0`` on GPU):
  ``__init__(vllm_config, device, is_pin_memory)``, ``update_state(batch_update)``
  with tuple-shaped entries processed removed -> added -> moved,
  ``apply(logits)``; rows are persistent-batch rows.
* **model runner V2** (GPU default): ``__init__(vllm_config, req_states)``,
  ``add_request(slot, params)`` (slots are recycled: all slot state is
  replaced), ``apply(logits, ctx)`` where row i belongs to slot
  ``ctx.idx_mapping_np[i]`` (rows are reordered every step).

Per step, for the rows qr-sampler controls, the engine-agnostic
:class:`~qr_sampler.pipeline.SamplingPipeline` fetches entropy, selects and
forces one token per row. Bypassed requests (``qr_bypass``) are never touched.

Nothing raised inside ``update_state``/``add_request``/``apply`` reaches vLLM:
it would kill the engine for every user. Per-request arguments are validated
up front in :meth:`validate_params` (a ``ValueError`` there is HTTP 400).

Tensor parallelism: every TP rank calls ``apply`` with identical logits and
appends its own sampled token to its own history, so all ranks must force the
same tokens. TP rank 0 alone draws entropy (once per step), samples, writes
records and metrics, and broadcasts the chosen ids through vLLM's TP group;
every rank makes that call on every ``apply``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor.interface import (
    LogitsProcessor as V1LogitsProcessor,
)
from vllm.v1.sample.logits_processor.interface import MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

from qr_sampler.config import (
    QRSettings,
    RequestOptions,
    SamplingConfig,
    load_settings,
    parse_request_options,
)
from qr_sampler.errors import ConfigError
from qr_sampler.hostmem import tune_host_allocator
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.sampling.select import force_tokens
from qr_sampler.vllm.compat import check_vllm_config, check_vllm_version

if TYPE_CHECKING:
    from vllm.sampling_params import SamplingParams

logger = logging.getLogger("qr_sampler")

#: directory where each TP rank appends the ids it forced per step (tests only)
RANK_TRACE_ENV = "QRSAMPLER_RANK_TRACE_DIR"

_request_counter = itertools.count(1)


def _ensure_visible_logging() -> None:
    """vLLM's workers drop INFO from third-party loggers; give ours a handler
    so WARNING/ERROR lines (start-up config, degradation) always show."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s qr-sampler: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_settings: QRSettings | None = None


def process_settings() -> QRSettings:
    """The process-wide settings, loaded once."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def reset_process_settings() -> None:
    """Forget cached settings (tests that change the environment)."""
    global _settings
    _settings = None


@dataclass(frozen=True, slots=True)
class _Tp:
    """This process's place in the tensor-parallel group."""

    size: int = 1
    rank: int = 0
    group: Any = None

    @classmethod
    def detect(cls) -> _Tp:
        try:
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()
        except Exception:  # not initialised: single process (tests, offline)
            return cls()
        return cls(size=int(group.world_size), rank=int(group.rank_in_group), group=group)


class QRSamplerLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    """Forces every controlled row to a token chosen with external entropy."""

    # ------------------------------------------------------------------ setup
    def __init__(self, vllm_config: Any, *args: Any) -> None:
        _ensure_visible_logging()
        check_vllm_version()
        check_vllm_config(vllm_config)
        self.settings = process_settings()
        self.defaults: SamplingConfig = self.settings.sampling()
        # V1 passes (device, is_pin_memory); V2 passes (req_states,)
        v1 = len(args) == 2 and isinstance(args[0], torch.device)
        self.runner = "v1" if v1 else "v2"
        self._req_states: Any = None if v1 or not args else args[0]
        self.tp = _Tp.detect()
        self.draws_entropy = self.tp.rank == 0
        self.rows: dict[int, RowState | None] = {}  # V1 row / V2 slot -> state (None = bypass)
        self._pipeline: SamplingPipeline | None = None
        self._eos = _eos_token_id(vllm_config)
        self._trace = _rank_trace(self.tp.rank)
        if self.draws_entropy:
            info = {
                k: v
                for k, v in self.settings.public_dict().items()
                if k.startswith(
                    (
                        "entropy_source",
                        "grpc_server_address",
                        "grpc_mode",
                        "fallback",
                        "sample_count",
                    )
                )
            }
            logger.warning(
                "qr-sampler active (%s model runner, TP %d/%d): %s",
                self.runner,
                self.tp.rank,
                self.tp.size,
                json.dumps(info, sort_keys=True),
            )

    @property
    def pipeline(self) -> SamplingPipeline:
        """Built on first use, on the rank that draws entropy only."""
        if self._pipeline is None:
            from qr_sampler.vllm.metrics_hook import metrics_recorder

            recorder = metrics_recorder(self.settings)
            self._pipeline = SamplingPipeline(
                self.settings, eos_token_id=self._eos, listeners=[recorder] if recorder else []
            )
            if recorder is not None:
                recorder.watch_pipeline(self._pipeline)
        return self._pipeline

    # ------------------------------------------------------ request admission
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Check every ``qr_*`` key of ``vllm_xargs``; ValueError -> HTTP 400."""
        parse_request_options(sampling_params.extra_args, process_settings().sampling())

    def _row_state(self, params: SamplingParams) -> RowState | None:
        try:
            options = parse_request_options(params.extra_args, self.defaults)
        except ConfigError as exc:  # validated at admission; never raise here
            logger.error("unexpected invalid qr_* arguments (%s); using defaults", exc)
            options = RequestOptions(config=self.defaults)
        if options.bypass:
            return None
        return RowState.of(options.config, request_id=f"{os.getpid()}-{next(_request_counter)}")

    # ------------------------------------------------------------- V1 runner
    def is_argmax_invariant(self) -> bool:
        return False  # greedy requests must pass through us too

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        try:
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for added in batch_update.added:
                index, params = added[0], added[1]
                self.rows[index] = self._row_state(params)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    self.rows[a], self.rows[b] = self.rows.get(b), self.rows.get(a)
                else:
                    self.rows[b] = self.rows.pop(a, None)
        except Exception:
            logger.exception("qr-sampler: failed to apply a batch update")

    # ------------------------------------------------------------- V2 runner
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        try:
            state = self._row_state(sampling_params)
        except Exception:
            logger.exception("qr-sampler: failed to add a request; it is bypassed")
            state = None
        self.rows[req_idx] = state
        return state is not None

    def apply_staged_writes(self) -> None:
        return None

    # ----------------------------------------------------------------- apply
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        started = time.time_ns()
        row_keys: Sequence[int]
        partial: frozenset[int] = frozenset()
        if ctx is None:  # V1: row i is persistent-batch row i
            row_keys = range(logits.shape[0])
        else:  # V2: row i belongs to slot idx_mapping_np[i]
            row_keys = [int(s) for s in ctx.idx_mapping_np[: logits.shape[0]]]
            partial = self._partial_prefill_rows(ctx, row_keys)
        indices: list[int] = []
        states: list[RowState] = []
        for i, key in enumerate(row_keys):
            state = self.rows.get(key)
            if state is not None and i not in partial:
                indices.append(i)
                states.append(state)
        chosen: list[int] = []
        if logits.device.type == "cpu":
            tune_host_allocator()
        if self.draws_entropy and states:
            chosen = self._sample(logits, indices, states, started)
        if self.tp.size > 1:
            chosen = self._exchange(indices, chosen, logits)
        elif self._trace is not None and indices:
            self._trace.write(indices, chosen)
        return logits

    def _partial_prefill_rows(self, ctx: Any, slots: Sequence[int]) -> frozenset[int]:
        """V2: rows of requests still in a chunked prefill. vLLM discards the token
        sampled for them, so they draw no entropy and leave no record (on the host,
        no device sync: tokens visible this step < tokens to prefill)."""
        try:
            seen = ctx.seq_lens_upper_bound_np
            prefill = self._req_states.prefill_len.np
            return frozenset(i for i, s in enumerate(slots) if int(seen[i]) < int(prefill[s]))
        except Exception:  # fields missing in this vLLM: treat every row as complete
            return frozenset()

    def _sample(
        self, logits: torch.Tensor, indices: list[int], states: list[RowState], started: int
    ) -> list[int]:
        all_rows = len(indices) == logits.shape[0]
        try:
            result = self.pipeline.sample(
                logits, states, row_indices=None if all_rows else indices, step_started_ns=started
            )
            return result.token_ids
        except Exception:
            # A bug, not an entropy failure (those are handled inside the pipeline):
            # end the affected requests rather than emit tokens without provenance.
            logger.exception("qr-sampler: sampling step failed; ending %d request(s)", len(indices))
            eos = self._eos if self._eos is not None else 0
            try:
                ids = torch.tensor(indices, dtype=torch.long, device=logits.device)
                force_tokens(logits, ids, torch.full_like(ids, eos))
            except Exception:
                logger.exception("qr-sampler: could not force EOS")
            return [eos] * len(indices)

    def _exchange(self, indices: list[int], chosen: list[int], logits: torch.Tensor) -> list[int]:
        """TP: rank 0's chosen ids go to every rank, which forces them too."""
        payload = (indices, chosen) if self.draws_entropy else None
        try:
            received = self.tp.group.broadcast_object(payload, src=0)
        except Exception:
            logger.exception("qr-sampler: TP broadcast failed")
            return chosen
        r_indices, r_chosen = received
        if not self.draws_entropy and r_indices:
            if r_indices != indices:
                logger.error(
                    "qr-sampler: TP rank %d controls rows %s but rank 0 sent %s",
                    self.tp.rank,
                    indices,
                    r_indices,
                )
            rows = torch.tensor(r_indices, dtype=torch.long, device=logits.device)
            tokens = torch.tensor(r_chosen, dtype=torch.long, device=logits.device)
            force_tokens(logits, rows, tokens)
        if self._trace is not None and r_indices:
            self._trace.write(list(r_indices), list(r_chosen))
        return list(r_chosen)


def _eos_token_id(vllm_config: Any) -> int | None:
    try:
        cfg = vllm_config.model_config.hf_text_config
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return int(eos) if eos is not None else None
    except Exception:
        return None


class _RankTrace:
    """Test mode: append the ids this rank forced per step to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step = 0

    def write(self, indices: list[int], chosen: list[int]) -> None:
        self.step += 1
        line = json.dumps({"step": self.step, "rows": indices, "tokens": chosen})
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _rank_trace(rank: int) -> _RankTrace | None:
    folder = os.environ.get(RANK_TRACE_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return _RankTrace(Path(folder) / f"rank{rank}-pid{os.getpid()}.jsonl")
