"""Fuzzing request validation (``parse_request_options``) and process settings
(``load_settings``, environment and ``.env``) with hypothesis.

Properties:

* any mapping of keys to JSON-like values yields a valid ``RequestOptions`` or a
  ``ConfigError`` (a ``ValueError``, i.e. HTTP 400) whose message names one of
  the keys that were sent — never another exception;
* what is accepted is exactly what was asked, within the documented ranges;
* keys of other plugins (no ``qr_`` prefix in any case) are ignored;
* any ``QR_*`` environment (strings, as the OS gives them) or ``.env`` file
  yields settings or a ``ConfigError`` naming a variable that was set, and the
  API key's value never appears in the message.

A coverage-guided atheris run (tests/support_atheris.py ``request``) checks the
first property too, from libFuzzer-chosen mappings.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qr_sampler.config import (
    BYPASS_KEY,
    INFRASTRUCTURE_FIELDS,
    SAMPLING_FIELDS,
    QRSettings,
    SamplingConfig,
    load_settings,
    parse_request_options,
)
from qr_sampler.errors import ConfigError

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULTS = SamplingConfig()

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-3, max_value=300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-1, max_value=3)
    | st.text(max_size=20)
    | st.sampled_from(["fixed", "edt", "zscore_mean", "none", "full", "true", "1", ""])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
OUR_KEYS = sorted(
    [BYPASS_KEY, *("qr_" + n for n in SAMPLING_FIELDS), *("qr_" + n for n in INFRASTRUCTURE_FIELDS)]
)
KEYS = (
    st.sampled_from(OUR_KEYS)
    | st.sampled_from(OUR_KEYS).map(str.upper)
    | st.text(alphabet=string.ascii_letters + "_", max_size=16).map(lambda s: "qr_" + s)
    | st.text(max_size=16)
)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_request_is_valid_options_or_a_config_error_naming_a_key(
    xargs: dict[str, Any],
) -> None:
    try:
        options = parse_request_options(xargs, DEFAULTS)
    except ConfigError as exc:
        assert isinstance(exc, ValueError)
        message = str(exc)
        sent = [k for k in xargs if k.lower().startswith("qr_")]
        assert any(k in message for k in sent), (xargs, message)
        return
    ours = {k: v for k, v in xargs.items() if k.startswith("qr_") and k != BYPASS_KEY}
    config = options.config
    SamplingConfig.model_validate(config.model_dump())  # within every documented range
    for key, value in ours.items():
        got = getattr(config, key[3:])
        if isinstance(got, float):
            assert math.isfinite(got) and got == float(value)
        else:
            assert got == value
    if BYPASS_KEY in xargs:
        assert options.bypass == bool(xargs[BYPASS_KEY])
    if not ours:
        assert config == DEFAULTS


@FUZZ
@given(st.dictionaries(st.text(max_size=16).filter(lambda k: not k.lower().startswith("qr_")),
                       VALUES, max_size=5))  # fmt: skip
def test_other_plugins_keys_are_ignored(xargs: dict[str, Any]) -> None:
    options = parse_request_options(xargs, DEFAULTS)
    assert options.config == DEFAULTS and not options.bypass


SECRET = "fuzz-secret-Zq8u1x"
ENV_NAMES = st.sampled_from(sorted("QR_" + n.upper() for n in QRSettings.model_fields))
ENV_VALUES = st.text(max_size=24) | st.sampled_from(
    ["-1", "0", "1", "1e400", "nan", "inf", "true", "unix:///x", "2147483647", " 5 ", ""]
)


@FUZZ
@given(st.dictionaries(ENV_NAMES | st.just("QR_NOT_A_SETTING"), ENV_VALUES, max_size=5))
def test_any_environment_is_settings_or_a_config_error_naming_a_variable(
    env: dict[str, str],
) -> None:
    env = {k: v.replace("\x00", "") for k, v in env.items()}
    env["QR_GRPC_API_KEY"] = SECRET
    try:
        loaded = load_settings(env=env, env_file=None)
    except ConfigError as exc:
        message = str(exc)
        assert SECRET not in message
        assert any(name in message for name in env), (env, message)
        return
    assert loaded.grpc_api_key.get_secret_value() == SECRET
    assert SECRET not in repr(loaded) and SECRET not in str(loaded.public_dict())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(ENV_NAMES, ENV_VALUES.filter(lambda v: "\n" not in v and "\r" not in v)),
        max_size=5,
    ),
    st.text(max_size=80),
)
def test_any_env_file_is_settings_or_a_config_error(
    tmp_path: Path, lines: list[tuple[str, str]], junk: str
) -> None:
    path = tmp_path / "fuzz.env"
    body = "".join(f"{k}={v!r}\n" for k, v in lines) + junk
    path.write_text(f"QR_GRPC_API_KEY={SECRET}\n" + body, encoding="utf-8")
    try:
        load_settings(env={}, env_file=path)
    except ConfigError as exc:
        assert SECRET not in str(exc)
        assert "QR_" in str(exc)


def test_atheris_request_validation() -> None:
    from test_fuzz_wire import run_atheris

    out = run_atheris("request", runs=30_000, max_len=512)
    assert "cov:" in out
