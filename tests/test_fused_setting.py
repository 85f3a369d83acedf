"""QR_FUSED_KERNELS switches torch.compile of the sampling step for the process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qr_sampler.config import load_settings
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink
from qr_sampler.sampling import select


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    saved = dict(select._COMPILE)
    yield
    select.set_fused_kernels(
        saved["enabled"], dynamic=saved["dynamic"], mode=saved["mode"], devices=saved["devices"]
    )


def _pipeline(mode: str) -> SamplingPipeline:
    env = {"QR_ENTROPY_SOURCE_TYPE": "mock_uniform", "QR_FUSED_KERNELS": mode}
    return SamplingPipeline(load_settings(env=env, env_file=None), sink=RecordSink(None))


def test_off_disables_compilation_and_sampling_still_works() -> None:
    p = _pipeline("off")
    assert select._COMPILE["enabled"] is False
    logits = torch.randn(4, 300)
    rows = [RowState.of(p.settings.sampling(), f"r{i}") for i in range(4)]
    out = p.sample(logits, rows)
    assert len(out.token_ids) == 4
    for i, tok in enumerate(out.token_ids):
        assert logits[i, tok] == 0.0 and int(torch.isfinite(logits[i]).sum()) == 1


def test_on_includes_the_cpu_and_auto_keeps_cuda_only() -> None:
    _pipeline("on")
    assert select._COMPILE["enabled"] is True
    assert select._COMPILE["devices"] == frozenset({"cuda", "cpu"})
    select.set_fused_kernels(True)
    _pipeline("auto")
    assert select._COMPILE["devices"] == frozenset({"cuda"})


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="QR_FUSED_KERNELS"):
        load_settings(env={"QR_FUSED_KERNELS": "maybe"}, env_file=None)
