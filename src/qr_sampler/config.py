"""Configuration: process-wide settings and per-request sampling overrides.

Two kinds of fields:

* **infrastructure** — process-wide only, read from ``QR_*`` environment
  variables and a ``.env`` file (entropy source, gRPC transport, fallback,
  circuit breaker, health tests, records, metrics);
* **sampling** — the defaults come from the environment too, and each request
  may override them with ``qr_<field>`` keys (vLLM's ``vllm_xargs``).

Every field carries a type, a range and a one-line description; the README's
configuration table is tested against :func:`field_table`. Every problem is
reported as :class:`~qr_sampler.errors.ConfigError` (a ``ValueError``) whose
message names the field and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qr_sampler.errors import ConfigError

#: exact standard deviation of a uniformly distributed byte: sqrt((256² − 1) / 12)
UNIFORM_BYTE_STD: float = math.sqrt((256**2 - 1) / 12)
#: mean of a uniformly distributed byte
UNIFORM_BYTE_MEAN: float = 127.5
#: largest number of entropy bytes one token may consume
MAX_SAMPLE_COUNT: int = 1_048_576
#: largest top_k accepted (larger than any real vocabulary)
MAX_TOP_K: int = 1_000_000
#: largest temperature accepted
MAX_TEMPERATURE: float = 100.0
#: longest label accepted
MAX_LABEL_LENGTH: int = 256

ENV_PREFIX = "QR_"
REQUEST_PREFIX = "qr_"
#: per-request key that hands a request to vLLM's native sampling (not a sampling field)
BYPASS_KEY = "qr_bypass"


def _f(default: Any, allowed: str, description: str, **constraints: Any) -> Any:
    """A field with its human-readable ``allowed`` text kept for error messages."""
    return Field(
        default,
        description=description,
        json_schema_extra={"allowed": allowed},
        **constraints,
    )


class SamplingConfig(BaseModel):
    """Settings that shape how one token is drawn; overridable per request."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    signal_amplifier_type: Literal["zscore_mean"] = _f(
        "zscore_mean", "'zscore_mean'", "How raw bytes become one uniform u per token."
    )
    sample_count: int = _f(
        20480,
        f"an integer from 1 to {MAX_SAMPLE_COUNT}",
        "Entropy bytes fetched per token.",
        ge=1,
        le=MAX_SAMPLE_COUNT,
    )
    population_mean: float = _f(
        UNIFORM_BYTE_MEAN,
        "a number from 0 to 255",
        "Mean of a byte under the null hypothesis (127.5 for uniform bytes).",
        ge=0.0,
        le=255.0,
    )
    population_std: float = _f(
        UNIFORM_BYTE_STD,
        "a number > 0 and <= 255",
        "Standard deviation of a byte under the null (exact uniform: 73.9003...).",
        gt=0.0,
        le=255.0,
    )
    uniform_clamp_epsilon: float = _f(
        1e-10,
        "a number from 1e-15 to < 0.5",
        "u is clamped to [epsilon, 1 - epsilon] (1e-15 keeps 1 - epsilon below 1.0).",
        ge=1e-15,
        lt=0.5,
    )
    temperature_strategy: Literal["fixed", "edt"] = _f(
        "fixed", "'fixed' or 'edt'", "Fixed temperature, or entropy-dependent (EDT)."
    )
    fixed_temperature: float = _f(
        0.7,
        f"a number from 0 to {MAX_TEMPERATURE:g} (0 = greedy)",
        "Temperature of the 'fixed' strategy.",
        ge=0.0,
        le=MAX_TEMPERATURE,
    )
    edt_base_temp: float = _f(
        0.8,
        f"a number from 0 to {MAX_TEMPERATURE:g}",
        "EDT: T = base * (H / ln V) ** exponent.",
        ge=0.0,
        le=MAX_TEMPERATURE,
    )
    edt_exponent: float = _f(
        0.5, "a number from 0 to 10", "EDT exponent applied to normalised entropy.", ge=0.0, le=10.0
    )
    edt_min_temp: float = _f(
        0.1,
        f"a number from 0 to {MAX_TEMPERATURE:g}",
        "EDT lower clamp.",
        ge=0.0,
        le=MAX_TEMPERATURE,
    )
    edt_max_temp: float = _f(
        2.0,
        f"a number from 0 to {MAX_TEMPERATURE:g}, >= edt_min_temp",
        "EDT upper clamp.",
        ge=0.0,
        le=MAX_TEMPERATURE,
    )
    top_k: int = _f(
        0,
        f"an integer from 0 to {MAX_TOP_K} (0 = off)",
        "Keep only the k most likely tokens.",
        ge=0,
        le=MAX_TOP_K,
    )
    top_p: float = _f(
        1.0,
        "a number > 0 and <= 1 (1 = off)",
        "Keep the smallest set of tokens whose probability reaches p.",
        gt=0.0,
        le=1.0,
    )
    min_p: float = _f(
        0.0,
        "a number from 0 to 1 (0 = off)",
        "Drop tokens below min_p times the top probability.",
        ge=0.0,
        le=1.0,
    )
    log_level: Literal["none", "summary", "full"] = _f(
        "summary", "'none', 'summary' or 'full'", "How much the sampler logs (not records)."
    )
    diagnostic_mode: bool = _f(
        False, "true or false", "Keep recent records in memory for inspection (bounded)."
    )
    label: str = _f(
        "",
        f"a string of at most {MAX_LABEL_LENGTH} characters",
        "Free-form label copied into every record of the request.",
        max_length=MAX_LABEL_LENGTH,
    )

    @model_validator(mode="after")
    def _edt_bounds(self) -> SamplingConfig:
        if self.edt_min_temp > self.edt_max_temp:
            raise ValueError(
                f"edt_min_temp ({self.edt_min_temp}) must be <= edt_max_temp ({self.edt_max_temp})"
            )
        return self


SAMPLING_FIELDS: frozenset[str] = frozenset(SamplingConfig.model_fields)


def _same(name: str) -> Any:
    """The SamplingConfig field ``name``, reused as the process-wide default."""
    return SamplingConfig.model_fields[name]


class QRSettings(BaseSettings):
    """Process-wide settings from ``QR_*`` environment variables and ``.env``.

    Sampling fields here are the defaults each request starts from.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        case_sensitive=False,
    )

    # --- entropy source -------------------------------------------------
    entropy_source_type: str = _f(
        "quantum_grpc",
        "a registered source: quantum_grpc, system, timing_noise, mock_uniform, or a plugin",
        "Primary entropy source.",
        min_length=1,
    )
    fallback_mode: Literal["system", "mock_uniform", "error"] = _f(
        "system",
        "'system', 'mock_uniform' or 'error'",
        "What serves a token when the primary source fails (every fallback is labelled).",
    )
    mock_seed: int = _f(
        0, "an integer from 0 to 2**63-1", "Seed of the mock_uniform source.", ge=0, le=2**63 - 1
    )
    mock_bias: float = _f(
        0.0,
        "a number from -127.5 to 127.5",
        "Explicit per-byte mean bias of mock_uniform (tests only).",
        ge=-127.5,
        le=127.5,
    )

    # --- gRPC transport -------------------------------------------------
    grpc_server_address: str = _f(
        "localhost:50051",
        "'host:port' or 'unix:///path'",
        "Address of the gRPC entropy server.",
        min_length=1,
    )
    grpc_mode: Literal["unary", "server_streaming", "bidi_streaming"] = _f(
        "bidi_streaming",
        "'unary', 'server_streaming' or 'bidi_streaming'",
        "Transport mode (bidi keeps one persistent stream).",
    )
    grpc_method_path: str = _f(
        "/qr_entropy.EntropyService/GetEntropy",
        "a method path '/package.Service/Method'",
        "Unary method path.",
        pattern=r"^/[\w.]+/\w+$",
    )
    grpc_stream_method_path: str = _f(
        "/qr_entropy.EntropyService/StreamEntropy",
        "a method path '/package.Service/Method', or empty to disable streaming",
        "Bidirectional streaming method path.",
        pattern=r"^(/[\w.]+/\w+)?$",
    )
    grpc_server_stream_method_path: str = _f(
        "/qr_entropy.EntropyService/ServerStreamEntropy",
        "a method path '/package.Service/Method', or empty to disable",
        "Server-streaming method path.",
        pattern=r"^(/[\w.]+/\w+)?$",
    )
    grpc_timeout_ms: float = _f(
        5000.0,
        "a number > 0 and <= 600000",
        "Maximum per-call deadline; the adaptive timeout never exceeds it.",
        gt=0.0,
        le=600_000.0,
    )
    grpc_max_bytes_per_request: int = _f(
        1_048_576,
        "an integer from 1 to 4000000",
        "Largest byte count asked in one request; larger needs are split.",
        ge=1,
        le=4_000_000,
    )
    grpc_retries: int = _f(
        0, "an integer from 0 to 10", "Retries per fetch before falling back.", ge=0, le=10
    )
    grpc_api_key: SecretStr = _f(
        SecretStr(""), "any string (never logged)", "API key sent as metadata."
    )
    grpc_api_key_header: str = _f(
        "api-key",
        "a lowercase gRPC metadata key",
        "Metadata header that carries the API key.",
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
    )
    grpc_use_tls: bool = _f(False, "true or false", "Use TLS (on when a CA file is given).")
    grpc_tls_ca_file: str = _f("", "a path or empty", "CA bundle to verify the server.")
    grpc_tls_cert_file: str = _f("", "a path or empty", "Client certificate (mutual TLS).")
    grpc_tls_key_file: str = _f("", "a path or empty", "Client private key (mutual TLS).")

    # --- circuit breaker -----------------------------------------------
    cb_window_size: int = _f(
        100,
        "an integer from 1 to 100000",
        "Latencies kept for the adaptive timeout.",
        ge=1,
        le=100_000,
    )
    cb_timeout_multiplier: float = _f(
        1.5,
        "a number from 1 to 100",
        "Adaptive timeout = p99 latency x multiplier.",
        ge=1.0,
        le=100.0,
    )
    cb_min_timeout_ms: float = _f(
        50.0,
        "a number > 0 and <= 600000",
        "Lower clamp of the adaptive timeout.",
        gt=0.0,
        le=600_000.0,
    )
    cb_failure_threshold: int = _f(
        3, "an integer from 1 to 1000", "Consecutive failures that open the breaker.", ge=1, le=1000
    )
    cb_recovery_s: float = _f(
        5.0, "a number > 0 and <= 3600", "First wait before a half-open probe.", gt=0.0, le=3600.0
    )
    cb_max_recovery_s: float = _f(
        300.0,
        "a number > 0 and <= 86400",
        "Cap of the doubling recovery wait.",
        gt=0.0,
        le=86_400.0,
    )

    # --- continuous health tests (SP 800-90B 4.4) -----------------------
    health_tests: Literal["auto", "on", "off"] = _f(
        "auto", "'auto', 'on' or 'off'", "Continuous health tests (auto = on for quantum_grpc)."
    )
    health_min_entropy: float = _f(
        6.0,
        "a number > 0 and <= 8",
        "Assumed min-entropy per byte (bits) for the health-test cutoffs.",
        gt=0.0,
        le=8.0,
    )
    health_alpha_log2: int = _f(
        30,
        "an integer from 10 to 60",
        "False-alarm probability per test is 2**-alpha_log2.",
        ge=10,
        le=60,
    )

    # --- records, diagnostics, metrics --------------------------------
    records_path: str = _f("", "a file path or empty (off)", "JSONL provenance records file.")
    diagnostics_max: int = _f(
        10_000,
        "an integer from 0 to 1000000",
        "Records kept in memory when diagnostic_mode is on (ring buffer).",
        ge=0,
        le=1_000_000,
    )
    metrics_port: int = _f(
        0, "an integer from 0 to 65535 (0 = off)", "Prometheus metrics port.", ge=0, le=65535
    )
    fused_kernels: Literal["auto", "on", "off"] = _f(
        "auto",
        "'auto', 'on' or 'off'",
        "torch.compile the sampling step (auto = on CUDA only; on = also on the CPU).",
    )
    cuda_graphs: Literal["auto", "off"] = _f(
        "auto",
        "'auto' or 'off'",
        "Replay the CUDA sampling step as CUDA graphs once a batch shape repeats "
        "(auto = on CUDA; off = always launch kernel by kernel).",
    )

    # --- sampling defaults (overridable per request) ---------------------
    signal_amplifier_type: Literal["zscore_mean"] = _same("signal_amplifier_type")
    sample_count: int = _same("sample_count")
    population_mean: float = _same("population_mean")
    population_std: float = _same("population_std")
    uniform_clamp_epsilon: float = _same("uniform_clamp_epsilon")
    temperature_strategy: Literal["fixed", "edt"] = _same("temperature_strategy")
    fixed_temperature: float = _same("fixed_temperature")
    edt_base_temp: float = _same("edt_base_temp")
    edt_exponent: float = _same("edt_exponent")
    edt_min_temp: float = _same("edt_min_temp")
    edt_max_temp: float = _same("edt_max_temp")
    top_k: int = _same("top_k")
    top_p: float = _same("top_p")
    min_p: float = _same("min_p")
    log_level: Literal["none", "summary", "full"] = _same("log_level")
    diagnostic_mode: bool = _same("diagnostic_mode")
    label: str = _same("label")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() reads the environment and the .env file itself, so that
        # unknown QR_* names are refused by name and other variables are ignored.
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_checks(self) -> QRSettings:
        if self.cb_max_recovery_s < self.cb_recovery_s:
            raise ValueError("cb_max_recovery_s must be >= cb_recovery_s")
        if bool(self.grpc_tls_cert_file) != bool(self.grpc_tls_key_file):
            raise ValueError("grpc_tls_cert_file and grpc_tls_key_file must be set together")
        self.sampling()  # the sampling defaults must form a valid SamplingConfig
        return self

    def sampling(self) -> SamplingConfig:
        """The process-wide sampling defaults as a :class:`SamplingConfig`."""
        return SamplingConfig(**{name: getattr(self, name) for name in SAMPLING_FIELDS})

    @property
    def tls_enabled(self) -> bool:
        return self.grpc_use_tls or bool(self.grpc_tls_ca_file)

    @property
    def health_tests_enabled(self) -> bool:
        if self.health_tests == "auto":
            return self.entropy_source_type == "quantum_grpc"
        return self.health_tests == "on"

    def public_dict(self) -> dict[str, Any]:
        """All settings with secrets redacted (safe for logs, records, health output)."""
        data = self.model_dump(mode="json")
        data["grpc_api_key"] = "***" if self.grpc_api_key.get_secret_value() else ""
        return data

    def config_hash(self) -> str:
        """Short stable hash of the settings, computed without secrets."""
        data = self.model_dump(mode="json")
        data.pop("grpc_api_key", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


INFRASTRUCTURE_FIELDS: frozenset[str] = frozenset(QRSettings.model_fields) - SAMPLING_FIELDS


# ---------------------------------------------------------------------------
# error formatting


def _allowed(model: type[BaseModel], name: str) -> str:
    field = model.model_fields.get(name)
    if field is None or not isinstance(field.json_schema_extra, dict):
        return ""
    return str(field.json_schema_extra.get("allowed", ""))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_errors(
    exc: ValidationError, model: type[BaseModel], spell: Any, secret_fields: frozenset[str]
) -> str:
    parts: list[str] = []
    for err in exc.errors():
        loc = err.get("loc", ())
        name = str(loc[0]) if loc else ""
        if not name:
            msg = str(err.get("msg", "invalid configuration")).removeprefix("Value error, ")
            parts.append(re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", lambda m: spell(m[0]), msg))
            continue
        allowed = _allowed(model, name)
        got = "" if name in secret_fields else f"; got {_short(err.get('input'))}"
        if err.get("type") == "extra_forbidden":
            parts.append(f"{spell(name)}: unknown setting")
        else:
            parts.append(f"{spell(name)}: must be {allowed or err.get('msg')}{got}")
    return "; ".join(parts)


_SECRETS = frozenset({"grpc_api_key"})


# ---------------------------------------------------------------------------
# process-wide loading


def load_settings(
    env: Mapping[str, str] | None = None, env_file: str | Path | None = ".env", **overrides: Any
) -> QRSettings:
    """Read settings: ``overrides`` > ``QR_*`` variables of ``env`` (default: the
    process environment) > ``env_file`` (if it exists) > defaults.

    Unknown ``QR_*`` names are refused, as are bad values; the error names the
    variable and what it allows. Variables without the prefix are ignored.
    """
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if not key.upper().startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in QRSettings.model_fields:
            raise ConfigError(f"{key}: unknown setting; see the configuration reference")
        values[name] = value
    values.update(overrides)
    try:
        return QRSettings(**values)
    except ValidationError as exc:
        raise ConfigError(
            _format_errors(exc, QRSettings, lambda n: ENV_PREFIX + n.upper(), _SECRETS)
        ) from None


# ---------------------------------------------------------------------------
# per-request overrides

_SCALARS = (str, int, float, bool)


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What one request asked for: its sampling config, or bypass."""

    config: SamplingConfig
    bypass: bool = False


def _check_type(key: str, name: str, value: object) -> None:
    field = SamplingConfig.model_fields[name]
    allowed = _allowed(SamplingConfig, name)
    ann = field.annotation
    bad = False
    if ann is bool:
        # vLLM's HTTP layer has no boolean in vllm_xargs: JSON true/false arrive as 1/0
        bad = not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)))
    elif ann is int:
        bad = isinstance(value, bool) or not isinstance(value, int)
    elif ann is float:
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
    elif ann is str:
        bad = not isinstance(value, str)
    else:  # Literal[...] of strings
        bad = not isinstance(value, str)
    if bad:
        raise ConfigError(f"{key}: must be {allowed}; got {_short(value)} ({type(value).__name__})")


def parse_request_options(
    extra_args: Mapping[str, Any] | None, defaults: SamplingConfig
) -> RequestOptions:
    """Validate a request's ``qr_*`` keys (vLLM ``extra_args``) over ``defaults``.

    Keys without the ``qr_`` prefix belong to other plugins and are ignored.
    Raises :class:`ConfigError` naming the key and what it allows.
    """
    if not extra_args:
        return RequestOptions(config=defaults)
    overrides: dict[str, Any] = {}
    bypass = False
    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.lower().startswith(REQUEST_PREFIX):
            continue
        if not key.startswith(REQUEST_PREFIX):
            # 'QR_TOP_K' is a typo of ours, not another plugin's key: never ignore it
            raise ConfigError(f"{key}: qr-sampler keys are lowercase; use {key.lower()!r}")
        if key == BYPASS_KEY:
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                bypass = bool(value)
                continue
            raise ConfigError(f"{key}: must be true, false, 0 or 1; got {_short(value)}")
        name = key[len(REQUEST_PREFIX) :]
        if name in INFRASTRUCTURE_FIELDS:
            raise ConfigError(
                f"{key}: {name} is a process-wide setting and cannot be set per request; "
                f"set {ENV_PREFIX}{name.upper()} in the server's environment"
            )
        if name not in SAMPLING_FIELDS:
            allowed = ", ".join(
                sorted([BYPASS_KEY, *(REQUEST_PREFIX + n for n in SAMPLING_FIELDS)])
            )
            raise ConfigError(f"{key}: unknown qr-sampler key; allowed keys: {allowed}")
        if not isinstance(value, _SCALARS):
            raise ConfigError(
                f"{key}: must be a single value ({_allowed(SamplingConfig, name)}); "
                f"got {type(value).__name__}"
            )
        _check_type(key, name, value)
        if SamplingConfig.model_fields[name].annotation is bool:
            value = bool(value)  # 1/0 from vLLM's HTTP layer
        overrides[name] = value
    if not overrides:
        return RequestOptions(config=defaults, bypass=bypass)
    try:
        merged = defaults.model_copy(update=overrides)
        config = SamplingConfig.model_validate(merged.model_dump())
    except ValidationError as exc:
        raise ConfigError(
            _format_errors(exc, SamplingConfig, lambda n: REQUEST_PREFIX + n, frozenset())
        ) from None
    return RequestOptions(config=config, bypass=bypass)


@dataclass(frozen=True, slots=True)
class FieldInfoRow:
    """One row of the configuration reference."""

    name: str
    env: str
    request_key: str  # "" for infrastructure fields
    type: str
    default: str
    allowed: str
    description: str


def field_table() -> list[FieldInfoRow]:
    """Every setting with its type, default, range and description."""
    rows = []
    for name, field in QRSettings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = ""
        ann = field.annotation
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        if name == "grpc_api_key":
            type_name = "secret str"
        rows.append(
            FieldInfoRow(
                name=name,
                env=ENV_PREFIX + name.upper(),
                request_key=REQUEST_PREFIX + name if name in SAMPLING_FIELDS else "",
                type=type_name,
                default=repr(default) if isinstance(default, str) else str(default),
                allowed=_allowed(QRSettings, name),
                description=field.description or "",
            )
        )
    return rows


__all__ = [
    "BYPASS_KEY",
    "INFRASTRUCTURE_FIELDS",
    "MAX_SAMPLE_COUNT",
    "SAMPLING_FIELDS",
    "UNIFORM_BYTE_MEAN",
    "UNIFORM_BYTE_STD",
    "FieldInfoRow",
    "QRSettings",
    "RequestOptions",
    "SamplingConfig",
    "field_table",
    "load_settings",
    "parse_request_options",
]
