"""Configuration: every field's bad values give a ConfigError (a ValueError) that
names the field and what it allows, in both spellings — the environment
(``QR_X`` through ``load_settings``) and per request (``qr_x`` through
``parse_request_options``).

Bad values are derived from each field's type and constraints, so a new field is
covered automatically; a new field for which no bad value can be derived fails
``test_every_field_has_bad_values_or_is_listed`` until it is listed on purpose.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import SecretStr

from qr_sampler.config import (
    BYPASS_KEY,
    INFRASTRUCTURE_FIELDS,
    SAMPLING_FIELDS,
    UNIFORM_BYTE_STD,
    QRSettings,
    SamplingConfig,
    field_table,
    load_settings,
    parse_request_options,
)
from qr_sampler.errors import ConfigError

#: fields that accept any string from the environment, so no bad env value exists
#: (adding a field here is a decision: say why in a comment)
ANY_STRING_OK = {
    "grpc_api_key",  # any secret
    "grpc_tls_ca_file",  # paths: checked when the transport opens them
    "grpc_tls_cert_file",
    "grpc_tls_key_file",
    "records_path",
}

SECRET = "sk-live-0123456789abcdef"


def _constraints(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in QRSettings.model_fields[name].metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(m, attr, None)
            if value is not None:
                out[attr] = value
    return out


def _allowed(name: str) -> str:
    extra = QRSettings.model_fields[name].json_schema_extra
    assert isinstance(extra, dict)
    return str(extra["allowed"])


def _literal_options(name: str) -> tuple[str, ...] | None:
    ann = QRSettings.model_fields[name].annotation
    if get_origin(ann) is typing.Literal:
        return tuple(get_args(ann))
    return None


def _bad_env_values(name: str) -> list[str]:
    """Strings that must be refused for ``QR_<NAME>``, derived from the field."""
    ann = QRSettings.model_fields[name].annotation
    c = _constraints(name)
    bad: list[str] = []
    options = _literal_options(name)
    if options is not None:
        bad += ["bogus", options[0].upper() + "X", "", f"[{options[0]!r}]"]
    elif ann is int:
        bad += ["1.5", "abc", "true", "", "[1]", "1e400", "9" * 40, "nan"]
        if "ge" in c:
            bad.append(str(c["ge"] - 1))
        if "le" in c:
            bad.append(str(c["le"] + 1))
    elif ann is float:
        bad += ["nan", "NaN", "inf", "-inf", "1e400", "abc", "", "[0.5]", "true"]
        if "ge" in c:
            bad.append(repr(c["ge"] - max(1e-6, abs(c["ge"]) * 1e-6)))
        if "gt" in c:
            bad.append(repr(float(c["gt"])))
        if "le" in c:
            bad.append(repr(c["le"] + max(1e-6, abs(c["le"]) * 1e-6)))
        if "lt" in c:
            bad.append(repr(float(c["lt"])))
    elif ann is bool:
        bad += ["maybe", "2", "", "[true]", "nan"]
    elif ann is str:
        if "min_length" in c:
            bad.append("")
        if "max_length" in c:
            bad.append("x" * (c["max_length"] + 1))
        if "pattern" in c:
            bad += ["no spaces allowed!", "/Bad Path/", "UPPER case"]
    return bad


def _bad_request_values(name: str) -> list[Any]:
    """Python values that must be refused for ``qr_<name>`` per request."""
    ann = SamplingConfig.model_fields[name].annotation
    c = _constraints(name)
    bad: list[Any] = [None, [1], {"a": 1}]
    options = _literal_options(name)
    if options is not None:
        bad += ["bogus", options[0].upper() + "X", 1, True]
    elif ann is int:
        bad += [True, False, 1.5, 2.0, "5", 10**30, -(10**30), float("nan")]
        if "ge" in c:
            bad.append(c["ge"] - 1)
        if "le" in c:
            bad.append(c["le"] + 1)
    elif ann is float:
        bad += [float("nan"), float("inf"), float("-inf"), True, "0.5", 10**400]
        if "ge" in c:
            bad.append(c["ge"] - max(1e-6, abs(c["ge"]) * 1e-6))
        if "gt" in c:
            bad.append(c["gt"])
        if "le" in c:
            bad.append(c["le"] + max(1e-6, abs(c["le"]) * 1e-6))
        if "lt" in c:
            bad.append(c["lt"])
    elif ann is bool:
        # 1 and 0 are accepted: vLLM's HTTP layer turns JSON true/false into 1/0
        bad += [2, -1, 1.0, "true", "yes"]
    elif ann is str:
        bad += [5, 1.5, True, b"bytes"]
        if "max_length" in c:
            bad.append("x" * (c["max_length"] + 1))
    return bad


ENV_CASES = [(n, v) for n in QRSettings.model_fields for v in _bad_env_values(n)]
REQUEST_CASES = [(n, v) for n in sorted(SAMPLING_FIELDS) for v in _bad_request_values(n)]


def test_every_field_has_bad_values_or_is_listed() -> None:
    without = {n for n in QRSettings.model_fields if not _bad_env_values(n)}
    assert without == ANY_STRING_OK
    for name in SAMPLING_FIELDS:
        assert len(_bad_request_values(name)) >= 4


@pytest.mark.parametrize(
    ("name", "value"), ENV_CASES, ids=[f"{n}={v!r}"[:60] for n, v in ENV_CASES]
)
def test_bad_env_value_names_field_and_allowed(name: str, value: str) -> None:
    env = {"QR_" + name.upper(): value}
    with pytest.raises(ConfigError) as info:
        load_settings(env=env, env_file=None)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("QR_" + name.upper() + ":"), message
    assert _allowed(name) in message


@pytest.mark.parametrize(
    ("name", "value"), REQUEST_CASES, ids=[f"{n}={v!r}"[:60] for n, v in REQUEST_CASES]
)
def test_bad_request_value_names_key_and_allowed(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_request_options({"qr_" + name: value}, SamplingConfig())
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("qr_" + name + ":"), message
    assert _allowed(name) in message


def _spellings(bound: float) -> set[str]:
    out = {str(bound), f"{bound:g}"}
    if float(bound).is_integer():
        out.add(str(int(bound)))
    if bound == 2**63 - 1:
        out.add("2**63-1")
    return out


#: settings that must move together so an endpoint of another field is valid
_COMPANIONS: dict[tuple[str, str], dict[str, str]] = {
    ("edt_min_temp", "le"): {"QR_EDT_MAX_TEMP": "100"},
    ("edt_max_temp", "ge"): {"QR_EDT_MIN_TEMP": "0"},
    ("cb_recovery_s", "le"): {"QR_CB_MAX_RECOVERY_S": "86400"},
}


@pytest.mark.parametrize("name", list(QRSettings.model_fields))
def test_documented_range_is_the_enforced_range(name: str) -> None:
    """Every numeric bound appears in the field's 'allowed' text, and inclusive
    endpoints are accepted in both spellings."""
    c = _constraints(name)
    allowed = _allowed(name)
    for kind in ("ge", "gt", "le", "lt"):
        if kind not in c:
            continue
        assert _spellings(c[kind]) & {w.strip("(),") for w in allowed.split()}, (kind, allowed)
        if kind in ("ge", "le"):
            env = {"QR_" + name.upper(): str(c[kind]), **_COMPANIONS.get((name, kind), {})}
            settings = load_settings(env=env, env_file=None)
            assert getattr(settings, name) == c[kind]
            if name in SAMPLING_FIELDS:
                extra = {"qr_" + k[3:].lower(): float(v) for k, v in env.items()}
                extra["qr_" + name] = c[kind]
                cfg = parse_request_options(extra, SamplingConfig()).config
                assert getattr(cfg, name) == c[kind]


def test_cross_field_rules_name_both_fields() -> None:
    cases = [
        ({"QR_EDT_MIN_TEMP": "3"}, ["QR_EDT_MIN_TEMP", "QR_EDT_MAX_TEMP"]),
        ({"QR_CB_RECOVERY_S": "500"}, ["QR_CB_RECOVERY_S", "QR_CB_MAX_RECOVERY_S"]),
        ({"QR_GRPC_TLS_CERT_FILE": "c.pem"}, ["QR_GRPC_TLS_CERT_FILE", "QR_GRPC_TLS_KEY_FILE"]),
        ({"QR_GRPC_TLS_KEY_FILE": "k.pem"}, ["QR_GRPC_TLS_CERT_FILE", "QR_GRPC_TLS_KEY_FILE"]),
    ]
    for env, names in cases:
        with pytest.raises(ConfigError) as info:
            load_settings(env=env, env_file=None)
        for n in names:
            assert n in str(info.value), (env, str(info.value))
    with pytest.raises(ConfigError) as info:
        parse_request_options({"qr_edt_min_temp": 2.5}, SamplingConfig())
    assert "qr_edt_min_temp" in str(info.value) and "qr_edt_max_temp" in str(info.value)
    # the same pair is fine when both move together
    ok = parse_request_options({"qr_edt_min_temp": 2.5, "qr_edt_max_temp": 3.0}, SamplingConfig())
    assert ok.config.edt_min_temp == 2.5


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^QR_TOPK: unknown setting"):
        load_settings(env={"QR_TOPK": "5"}, env_file=None)
    with pytest.raises(ConfigError) as info:
        parse_request_options({"qr_topk": 5}, SamplingConfig())
    message = str(info.value)
    assert message.startswith("qr_topk: unknown")
    for name in SAMPLING_FIELDS:
        assert "qr_" + name in message
    assert BYPASS_KEY in message
    # keys of other plugins are none of our business
    assert parse_request_options({"other_plugin_x": 1}, SamplingConfig()).config == SamplingConfig()
    # variables without the prefix are ignored
    assert load_settings(env={"PATH": "/bin", "QRX": "1"}, env_file=None).top_k == 0


def test_misspelled_prefix_case_is_refused_not_ignored() -> None:
    """'QR_TOP_K' or 'Qr_top_k' in vllm_xargs is a typo of ours, not another
    plugin's key: ignoring it would silently run the request with other settings."""
    for key in ("QR_TOP_K", "Qr_top_k", "qR_top_k"):
        with pytest.raises(ConfigError, match="qr_top_k"):
            parse_request_options({key: 3}, SamplingConfig())


@pytest.mark.parametrize("name", sorted(INFRASTRUCTURE_FIELDS))
def test_infrastructure_fields_cannot_be_set_per_request(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_request_options({"qr_" + name: SECRET}, SamplingConfig())
    message = str(info.value)
    assert message.startswith("qr_" + name + ":")
    assert "QR_" + name.upper() in message and "process-wide" in message
    assert SECRET not in message


def test_bypass_key() -> None:
    assert parse_request_options({BYPASS_KEY: True}, SamplingConfig()).bypass is True
    assert parse_request_options({BYPASS_KEY: 0}, SamplingConfig()).bypass is False
    for bad in (2, "yes", None, 1.0):
        with pytest.raises(ConfigError, match=r"^qr_bypass: must be"):
            parse_request_options({BYPASS_KEY: bad}, SamplingConfig())


def test_good_request_overrides_apply_over_defaults() -> None:
    defaults = load_settings(env={"QR_TOP_K": "50", "QR_LABEL": "base"}, env_file=None).sampling()
    opts = parse_request_options(
        {"qr_top_p": 0.9, "qr_temperature_strategy": "edt", "qr_label": "run-7", "x": 1}, defaults
    )
    assert opts.config.top_p == 0.9 and opts.config.temperature_strategy == "edt"
    assert opts.config.label == "run-7" and opts.config.top_k == 50
    assert parse_request_options(None, defaults).config is defaults
    assert parse_request_options({}, defaults).config is defaults
    # JSON true/false reach us from vLLM's HTTP layer as 1/0
    assert parse_request_options({"qr_diagnostic_mode": 1}, defaults).config.diagnostic_mode is True
    assert (
        parse_request_options({"qr_diagnostic_mode": 0}, defaults).config.diagnostic_mode is False
    )
    # ints are numbers too
    assert parse_request_options({"qr_top_p": 1}, defaults).config.top_p == 1.0


def test_defaults_match_the_brief() -> None:
    s = load_settings(env={}, env_file=None)
    assert s.sample_count == 20480
    assert s.population_mean == 127.5
    assert s.population_std == math.sqrt((256**2 - 1) / 12) == UNIFORM_BYTE_STD
    assert abs(s.population_std - 73.9003) < 1e-4
    assert s.uniform_clamp_epsilon == 1e-10
    assert (s.temperature_strategy, s.fixed_temperature) == ("fixed", 0.7)
    assert (s.edt_base_temp, s.edt_exponent, s.edt_min_temp, s.edt_max_temp) == (
        0.8,
        0.5,
        0.1,
        2.0,
    )
    assert (s.top_k, s.top_p, s.min_p) == (0, 1.0, 0.0)
    assert s.sampling() == SamplingConfig()


def test_field_table_describes_every_field() -> None:
    rows = {r.name: r for r in field_table()}
    assert set(rows) == set(QRSettings.model_fields)
    for name, row in rows.items():
        assert row.env == "QR_" + name.upper()
        assert row.request_key == ("qr_" + name if name in SAMPLING_FIELDS else "")
        assert row.type and row.allowed and row.description, name
        assert "\n" not in row.description
    assert rows["grpc_api_key"].default == "''"
    assert set(SamplingConfig.model_fields) == SAMPLING_FIELDS
    assert INFRASTRUCTURE_FIELDS.isdisjoint(SAMPLING_FIELDS)


# ---------------------------------------------------------------------------
# .env file and precedence


def test_dotenv_file_and_precedence(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment line\n"
        "QR_TOP_K=5\n"
        "QR_LABEL='from file'\n"
        "export QR_MIN_P=0.05\n"
        "OTHER_TOOL_SETTING=ignored\n",
        encoding="utf-8",
    )
    s = load_settings(env={}, env_file=dotenv)
    assert (s.top_k, s.label, s.min_p) == (5, "from file", 0.05)
    s = load_settings(env={"QR_TOP_K": "7"}, env_file=dotenv)
    assert (s.top_k, s.label) == (7, "from file")  # env beats .env
    s = load_settings(env={"QR_TOP_K": "7"}, env_file=dotenv, top_k=9)
    assert s.top_k == 9  # explicit overrides beat both
    assert load_settings(env={}, env_file=tmp_path / "missing.env").top_k == 0
    assert load_settings(env={}, env_file=None).top_k == 0

    dotenv.write_text("QR_TOP_K=many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^QR_TOP_K: must be an integer"):
        load_settings(env={}, env_file=dotenv)
    dotenv.write_text("QR_NOT_A_SETTING=1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^QR_NOT_A_SETTING: unknown setting"):
        load_settings(env={}, env_file=dotenv)


def test_process_environment_is_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("QR_TOP_K=3\nQR_TOP_P=0.5\n", encoding="utf-8")
    monkeypatch.setenv("QR_TOP_K", "11")
    s = load_settings()
    assert (s.top_k, s.top_p) == (11, 0.5)
    monkeypatch.setenv("qr_min_p", "0.25")  # names are case-insensitive
    assert load_settings().min_p == 0.25


# ---------------------------------------------------------------------------
# the API key never leaks


def test_api_key_never_appears_in_public_output() -> None:
    s = load_settings(env={"QR_GRPC_API_KEY": SECRET}, env_file=None)
    assert s.grpc_api_key.get_secret_value() == SECRET
    assert SECRET not in json.dumps(s.public_dict())
    assert s.public_dict()["grpc_api_key"] == "***"
    assert load_settings(env={}, env_file=None).public_dict()["grpc_api_key"] == ""
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in json.dumps(s.model_dump(mode="json"))
    # the hash ignores the key entirely, yet sees every other setting
    other = load_settings(env={"QR_GRPC_API_KEY": "something-else"}, env_file=None)
    none = load_settings(env={}, env_file=None)
    assert s.config_hash() == other.config_hash() == none.config_hash()
    assert none.config_hash() != load_settings(env={"QR_TOP_K": "1"}, env_file=None).config_hash()


def test_api_key_never_appears_in_errors() -> None:
    env = {"QR_GRPC_API_KEY": SECRET}
    for extra in ({"QR_TOP_K": "-1"}, {"QR_EDT_MIN_TEMP": "3"}, {"QR_GRPC_TLS_CERT_FILE": "c"}):
        with pytest.raises(ConfigError) as info:
            load_settings(env={**env, **extra}, env_file=None)
        assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(env={"QR_GRPC_API_KEYS": SECRET}, env_file=None)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, env_file=None, grpc_api_key=[SECRET])
    assert "QR_GRPC_API_KEY" in str(info.value) and SECRET not in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings(env={}, env_file=None)
    with pytest.raises(ValueError):
        s.top_k = 3  # type: ignore[misc]
    assert isinstance(s.grpc_api_key, SecretStr)
