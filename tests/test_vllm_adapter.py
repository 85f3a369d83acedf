"""In-process contract tests of the vLLM adapter against vLLM's real interfaces.

Both model runners are driven the way vLLM drives them, with vLLM's own
classes: V1 with the real ``BatchUpdate`` dataclass and its tuple-shaped
entries; V2 with the real ``LogitsProcRequestState`` and ``LogitsContext``
dataclasses. The only stand-in is the ``vllm_config`` object: a namespace
carrying the three attributes the adapter reads (building a real VllmConfig
needs a model and an engine; the real-engine tests cover that path).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsContext,
    LogitsProcRequestState,
)

from qr_sampler import hostmem
from qr_sampler.records import TokenRecord
from qr_sampler.vllm import adapter as adapter_mod
from qr_sampler.vllm.adapter import QRSamplerLogitsProcessor
from qr_sampler.vllm.compat import UnsupportedVLLMError, check_vllm_config, check_vllm_version

VOCAB = 512
EOS = 7


@pytest.fixture(autouse=True)
def _mock_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("QR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("QR_ENTROPY_SOURCE_TYPE", "mock_uniform")
    monkeypatch.setenv("QR_FALLBACK_MODE", "error")
    monkeypatch.setenv("QR_SAMPLE_COUNT", "64")
    monkeypatch.chdir(__import__("tempfile").gettempdir())
    adapter_mod.reset_process_settings()


def _config(**extra: Any) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_text_config=SimpleNamespace(eos_token_id=EOS)),
        speculative_config=extra.get("speculative_config"),
        parallel_config=SimpleNamespace(
            enable_batch_sharded_sampling=extra.get("batch_sharded", False)
        ),
    )


def _params(**xargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=4, extra_args=dict(xargs) if xargs else None)


class _Capture:
    def __init__(self, proc: QRSamplerLogitsProcessor) -> None:
        self.steps: list[list[TokenRecord]] = []
        proc.pipeline.listeners.append(self.steps.append)

    def last(self) -> dict[int, TokenRecord]:
        return {r.row: r for r in self.steps[-1]}


def _forced_token(row: torch.Tensor) -> int:
    finite = torch.isfinite(row).nonzero().flatten().tolist()
    assert len(finite) == 1, "a controlled row must keep exactly one finite entry"
    assert row[finite[0]].item() == 0.0
    return int(finite[0])


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


# ---------------------------------------------------------------- V1 runner


def _v1() -> QRSamplerLogitsProcessor:
    return QRSamplerLogitsProcessor(_config(), torch.device("cpu"), False)


def test_v1_is_not_argmax_invariant() -> None:
    assert _v1().is_argmax_invariant() is False


def test_v1_rows_follow_requests_through_removed_added_moved() -> None:
    proc = _v1()
    cap = _Capture(proc)
    proc.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, _params(qr_label="A"), [1, 2], []),
                (1, _params(qr_bypass=1), [1, 2], []),
                (2, _params(qr_label="C", qr_top_k=1), [1, 2], []),
            ],
            moved=[],
        )
    )
    logits = _logits(3)
    before = logits.clone()
    proc.apply(logits)
    assert torch.equal(logits[1], before[1]), "a bypassed row must stay bit-for-bit"
    recs = cap.last()
    assert sorted(recs) == [0, 2]
    assert recs[0].label == "A" and recs[2].label == "C"
    assert _forced_token(logits[0]) == recs[0].token_id
    # qr_top_k=1 is greedy: the argmax of the original row
    assert _forced_token(logits[2]) == int(before[2].argmax()) == recs[2].token_id

    # batch unchanged: same rows, same labels
    proc.update_state(None)
    proc.apply(_logits(3, 1))
    assert {r: x.label for r, x in cap.last().items()} == {0: "A", 2: "C"}

    # remove row 1 (the bypassed one), move 2 -> 1
    proc.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[1],
            added=[],
            moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)],
        )
    )
    proc.apply(_logits(2, 2))
    assert {r: x.label for r, x in cap.last().items()} == {0: "A", 1: "C"}

    # swap 0 <-> 1
    proc.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)])
    )
    proc.apply(_logits(2, 3))
    assert {r: x.label for r, x in cap.last().items()} == {0: "C", 1: "A"}

    # a new request replaces row 0 (order: removed, added, moved)
    proc.update_state(
        BatchUpdate(
            batch_size=2, removed=[0], added=[(0, _params(qr_label="D"), None, [])], moved=[]
        )
    )
    proc.apply(_logits(2, 4))
    assert {r: x.label for r, x in cap.last().items()} == {0: "D", 1: "A"}

    # swap with a bypassed request: the bypass moves too
    proc.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[(2, _params(qr_bypass=True), None, [])],
            moved=[(2, 0, MoveDirectionality.SWAP)],
        )
    )
    logits = _logits(3, 5)
    before = logits.clone()
    proc.apply(logits)
    assert {r: x.label for r, x in cap.last().items()} == {1: "A", 2: "D"}
    assert torch.equal(logits[0], before[0])


def test_v1_error_mode_forces_eos_and_records_failure() -> None:
    proc = _v1()
    cap = _Capture(proc)

    class Down:
        name = "down"

        def fetch(self, sizes: list[int]) -> list[Any]:
            from qr_sampler.errors import EntropyUnavailableError

            raise EntropyUnavailableError("test: device unplugged")

        def close(self) -> None:
            pass

    proc.pipeline.source = Down()  # type: ignore[assignment]
    proc.update_state(
        BatchUpdate(batch_size=1, removed=[], added=[(0, _params(), None, [])], moved=[])
    )
    logits = _logits(1)
    proc.apply(logits)  # must not raise
    assert _forced_token(logits[0]) == EOS
    rec = cap.last()[0]
    assert rec.failed and rec.token_id == EOS and "unplugged" in rec.fallback_reason


def test_v1_unexpected_bug_never_reaches_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _v1()
    proc.update_state(
        BatchUpdate(batch_size=1, removed=[], added=[(0, _params(), None, [])], moved=[])
    )

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(proc.pipeline, "sample", boom)
    logits = _logits(1)
    proc.apply(logits)
    assert _forced_token(logits[0]) == EOS  # the request is ended, not sampled natively
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))


# ---------------------------------------------------------------- V2 runner


def _v2(max_reqs: int = 8) -> QRSamplerLogitsProcessor:
    state = LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=max_reqs,
        vocab_size=VOCAB,
        all_token_ids=None,  # type: ignore[arg-type]
        prompt_len=None,  # type: ignore[arg-type]
        prefill_len=None,  # type: ignore[arg-type]
        total_len=None,  # type: ignore[arg-type]
    )
    return QRSamplerLogitsProcessor(_config(), state)


def _ctx(slots: list[int], seq_lens: list[int] | None = None) -> LogitsContext:
    n = len(slots)
    mapping = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(
        expanded_idx_mapping=mapping,
        idx_mapping=mapping,
        idx_mapping_np=np.array(slots, dtype=np.int32),
        expanded_local_pos=torch.zeros(n, dtype=torch.int32),
        input_ids=torch.zeros(n, dtype=torch.int64),
        pos=torch.zeros(n, dtype=torch.int64),
        seq_lens_upper_bound_np=np.array(seq_lens or [1] * n, dtype=np.int32),
    )


def test_v2_is_a_v2_processor_and_loader_accepts_it() -> None:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Base
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

    assert issubclass(QRSamplerLogitsProcessor, V2Base)
    assert QRSamplerLogitsProcessor in _load_v2_logitsprocs_plugins()


def test_v2_rows_map_to_slots_through_the_context() -> None:
    proc = _v2()
    cap = _Capture(proc)
    assert proc.add_request(3, _params(qr_label="A")) is True
    assert proc.add_request(5, _params(qr_bypass=1)) is False  # declined: native sampling
    assert proc.add_request(1, _params(qr_label="B", qr_top_k=1)) is True

    logits = _logits(3)
    before = logits.clone()
    proc.apply(logits, _ctx([5, 1, 3]))
    assert torch.equal(logits[0], before[0])
    recs = cap.last()
    assert {r: x.label for r, x in recs.items()} == {1: "B", 2: "A"}
    assert _forced_token(logits[1]) == int(before[1].argmax())

    # rows reordered next step
    logits = _logits(3, 1)
    before = logits.clone()
    proc.apply(logits, _ctx([3, 1, 5]))
    assert {r: x.label for r, x in cap.last().items()} == {0: "A", 1: "B"}
    assert torch.equal(logits[2], before[2])
    assert _forced_token(logits[1]) == int(before[1].argmax())


def test_v2_recycled_slot_is_fully_reinitialised() -> None:
    proc = _v2()
    cap = _Capture(proc)
    proc.add_request(2, _params(qr_label="old", qr_top_k=1, qr_temperature_strategy="edt"))
    proc.apply(_logits(1), _ctx([2]))
    assert cap.last()[0].temperature_strategy == "edt"
    # slot 2 recycled for a request with default settings
    proc.add_request(2, _params(qr_label="new"))
    proc.apply(_logits(1, 1), _ctx([2]))
    rec = cap.last()[0]
    assert rec.label == "new" and rec.temperature_strategy == "fixed"
    assert rec.temperature == pytest.approx(0.7)
    # recycled again for a bypassed request: left untouched
    proc.add_request(2, _params(qr_bypass=1))
    logits = _logits(1, 2)
    before = logits.clone()
    steps = len(cap.steps)
    proc.apply(logits, _ctx([2]))
    assert torch.equal(logits, before) and len(cap.steps) == steps


def test_v2_partial_prefill_chunks_draw_no_entropy() -> None:
    """Under chunked prefill vLLM discards the token sampled for a request whose
    prompt is not fully computed yet: such rows must not draw entropy or leave a
    record. (``prefill_len`` is a UvaBackedTensor in vLLM, which needs CUDA; the
    stand-in exposes the same host view, ``.np``.)"""
    proc = _v2()
    proc._req_states = SimpleNamespace(prefill_len=SimpleNamespace(np=np.array([0, 100, 0, 5])))
    cap = _Capture(proc)
    proc.add_request(1, _params(qr_label="long-prompt"))
    proc.add_request(3, _params(qr_label="short"))
    for seen in (32, 64, 96):  # three partial chunks of the long prompt
        logits = _logits(2, seen)
        before = logits.clone()
        proc.apply(logits, _ctx([1, 3], [seen, 5 + seen // 32]))
        assert torch.equal(logits[0], before[0]), "a partial-prefill row must be left alone"
        assert {r: x.label for r, x in cap.last().items()} == {1: "short"}
    logits = _logits(2, 7)
    proc.apply(logits, _ctx([3, 1], [9, 100]))  # prefill complete: a real token
    assert {r: x.label for r, x in cap.last().items()} == {0: "short", 1: "long-prompt"}
    _forced_token(logits[1])


def test_v2_per_request_settings_follow_their_request() -> None:
    proc = _v2(16)
    cap = _Capture(proc)
    settings = {
        s: {"qr_label": f"r{s}", "qr_top_k": s + 1, "qr_fixed_temperature": 0.1 * s}
        for s in range(10)
    }
    for slot, xargs in settings.items():
        proc.add_request(slot, _params(**xargs))
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    proc.apply(_logits(10), _ctx(order))
    for row, rec in cap.last().items():
        slot = order[row]
        assert rec.label == f"r{slot}"
        assert rec.num_candidates <= slot + 1
        assert rec.temperature == pytest.approx(0.1 * slot, abs=1e-6)


# ------------------------------------------------------ admission and compat


@pytest.mark.parametrize(
    "xargs, key",
    [
        ({"qr_top_k": -1}, "qr_top_k"),
        ({"qr_top_p": 0}, "qr_top_p"),
        ({"qr_grpc_server_address": "x:1"}, "qr_grpc_server_address"),
        ({"qr_nonsense": 1}, "qr_nonsense"),
        ({"qr_bypass": "yes"}, "qr_bypass"),
    ],
)
def test_validate_params_rejects_with_the_key(xargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        QRSamplerLogitsProcessor.validate_params(_params(**xargs))


def test_validate_params_accepts_good_and_foreign_keys() -> None:
    QRSamplerLogitsProcessor.validate_params(_params(qr_top_k=3, other_plugin_key=[1, 2]))
    QRSamplerLogitsProcessor.validate_params(_params())


def test_unsupported_versions_and_modes_are_refused() -> None:
    check_vllm_version("0.32.0+cpu")
    check_vllm_version("0.33.1")
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM 0\.32\.x, 0\.33\.x"):
        check_vllm_version("0.31.2")
    with pytest.raises(UnsupportedVLLMError, match="speculative decoding"):
        check_vllm_config(_config(speculative_config=object()))
    with pytest.raises(UnsupportedVLLMError, match="batch-sharded"):
        check_vllm_config(_config(batch_sharded=True))


def test_host_allocator_tuning_runs_once_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(hostmem._state, "checked", False)
    monkeypatch.setenv(hostmem.MALLOC_TUNING_ENV, "0")
    assert hostmem.tune_host_allocator() is False
    assert hostmem._state["checked"]
    monkeypatch.setitem(hostmem._state, "checked", False)
    monkeypatch.delenv(hostmem.MALLOC_TUNING_ENV)
    hostmem.tune_host_allocator()  # glibc here: thresholds raised (True), else False
    assert hostmem.tune_host_allocator() is False  # once per process
