"""The Open WebUI filter: its inlet puts qr-sampler settings into `vllm_xargs`,
and the body it produces passes vLLM's own request model and qr-sampler's
admission check with exactly those settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt

from qr_sampler.config import SAMPLING_FIELDS, SamplingConfig, parse_request_options

HERE = Path(__file__).resolve().parents[1] / "examples" / "open-webui"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def filt() -> ModuleType:
    return _load("qr_sampler_owui_filter", HERE / "qr_sampler_filter.py")


def chat_body() -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a short story."}],
        "stream": True,
        "temperature": 0.8,
        "vllm_xargs": {"other_plugin_key": "kept", "qr_label": "overridden"},
        "metadata": {"chat_id": "c1"},
    }


def test_inlet_copies_admin_and_user_valves(filt: ModuleType) -> None:
    f = filt.Filter()
    f.valves = f.Valves(
        label="condition-A", temperature_strategy="edt", top_k=50, sample_count=4096
    )
    user = {"id": "u1", "valves": f.UserValves(label="participant-7", fixed_temperature=0.3)}
    body = f.inlet(chat_body(), __user__=user)
    assert body["vllm_xargs"] == {
        "other_plugin_key": "kept",
        "qr_label": "participant-7",  # the user's valve wins over the admin's
        "qr_temperature_strategy": "edt",
        "qr_fixed_temperature": 0.3,
        "qr_top_k": 50,
        "qr_sample_count": 4096,
    }
    assert body["messages"] == chat_body()["messages"]  # nothing else touched
    assert body["temperature"] == 0.8


def test_body_passes_vllm_request_model_and_admission(filt: ModuleType) -> None:
    """vLLM's real ChatCompletionRequest → SamplingParams.extra_args → the
    plugin's real validate_params, then the parsed per-request config."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from qr_sampler.vllm import QRSamplerLogitsProcessor

    f = filt.Filter()
    f.valves = f.Valves(
        label="exp-1",
        temperature_strategy="fixed",
        fixed_temperature=0.55,
        top_p=0.9,
        min_p=0.05,
        sample_count=1024,
        log_level="none",
        bypass=False,
    )
    body = f.inlet(chat_body(), __user__={"id": "u", "valves": {"top_k": 7}})
    body.pop("metadata")  # Open WebUI strips its metadata before forwarding
    request = ChatCompletionRequest.model_validate(body)
    params = request.to_sampling_params(max_tokens=16, default_sampling_params={})
    assert params.extra_args is not None
    QRSamplerLogitsProcessor.validate_params(params)  # raises ValueError -> HTTP 400
    options = parse_request_options(params.extra_args, SamplingConfig())
    cfg = options.config
    assert not options.bypass
    assert (cfg.label, cfg.temperature_strategy, cfg.fixed_temperature) == ("exp-1", "fixed", 0.55)
    assert (cfg.top_p, cfg.min_p, cfg.top_k, cfg.sample_count) == (0.9, 0.05, 7, 1024)
    assert cfg.log_level == "none"

    f.valves = f.Valves(bypass=True)
    request = ChatCompletionRequest.model_validate(f.inlet({"model": "m", "messages": []}))
    params = request.to_sampling_params(max_tokens=4, default_sampling_params={})
    assert parse_request_options(params.extra_args, SamplingConfig()).bypass


def test_empty_disabled_or_other_model_leaves_the_body_alone(filt: ModuleType) -> None:
    f = filt.Filter()
    assert "vllm_xargs" not in f.inlet({"model": "m", "messages": []})  # nothing set
    f.valves = f.Valves(label="x", models="big-model, other")
    assert "vllm_xargs" not in f.inlet({"model": "tiny", "messages": []})
    assert f.inlet({"model": "other", "messages": []})["vllm_xargs"] == {"qr_label": "x"}
    f.valves = f.Valves(label="x", enabled=False)
    assert "vllm_xargs" not in f.inlet({"model": "tiny", "messages": []})


def test_valves_mirror_the_sampling_settings(filt: ModuleType) -> None:
    """Every setting the filter sends is a per-request qr-sampler setting, and
    its bounds in the Valves form are the sampler's own bounds."""
    valves = filt.SamplingValves
    assert set(filt.SETTINGS) == set(valves.model_fields)
    assert set(filt.SETTINGS) <= SAMPLING_FIELDS
    for name in filt.SETTINGS:
        mine = {type(m): m for m in valves.model_fields[name].metadata}
        theirs = {type(m): m for m in SamplingConfig.model_fields[name].metadata}
        for kind in (Ge, Gt, Le, Lt):
            assert mine.get(kind) == theirs.get(kind), f"{name}: {kind.__name__} differs"
    with pytest.raises(ValueError):
        filt.Filter.Valves(top_p=0.0)


def test_export_json_is_importable_and_in_sync(filt: ModuleType) -> None:
    export = json.loads((HERE / "qr_sampler_filter.json").read_text(encoding="utf-8"))
    assert isinstance(export, list) and len(export) == 1
    fn = export[0]
    assert fn["type"] == "filter" and fn["id"] == "qr_sampler"
    assert fn["content"] == (HERE / "qr_sampler_filter.py").read_text(encoding="utf-8")
    assert fn["meta"]["manifest"]["title"] == "qr-sampler"
    maker = _load("qr_sampler_owui_make_export", HERE / "make_export.py")
    assert maker.build() == (HERE / "qr_sampler_filter.json").read_text(encoding="utf-8"), (
        "stale export: run python examples/open-webui/make_export.py"
    )
    # loaded the way Open WebUI loads a function: exec'd into a fresh module
    module = ModuleType("function_qr_sampler_export")
    sys.modules[module.__name__] = module
    exec(compile(fn["content"], module.__name__, "exec"), module.__dict__)
    assert module.Filter().inlet({"model": "m", "messages": []}) == {"model": "m", "messages": []}
