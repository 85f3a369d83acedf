"""qr-sampler: LLM token sampling driven by external physical entropy.

Importing this package is cheap: torch, grpc and vLLM are imported only when
the names that need them are first used (vLLM imports plugins in its API-server
process too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qr_sampler.config import (
    QRSettings,
    RequestOptions,
    SamplingConfig,
    load_settings,
    parse_request_options,
)
from qr_sampler.errors import (
    AuthenticationError,
    ConfigError,
    EntropyError,
    EntropyReplyError,
    EntropyUnavailableError,
    HealthTestError,
    QRSamplerError,
)

if TYPE_CHECKING:
    from qr_sampler.entropy.base import EntropyChunk, EntropySource
    from qr_sampler.pipeline import RowState, SamplingPipeline, StepResult
    from qr_sampler.records import RecordSink, TokenRecord

__version__ = "0.1.0"

_LAZY = {
    "EntropyChunk": "qr_sampler.entropy.base",
    "EntropySource": "qr_sampler.entropy.base",
    "RowState": "qr_sampler.pipeline",
    "SamplingPipeline": "qr_sampler.pipeline",
    "StepResult": "qr_sampler.pipeline",
    "RecordSink": "qr_sampler.records",
    "TokenRecord": "qr_sampler.records",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qr_sampler' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AuthenticationError",
    "ConfigError",
    "EntropyChunk",
    "EntropyError",
    "EntropyReplyError",
    "EntropySource",
    "EntropyUnavailableError",
    "HealthTestError",
    "QRSamplerError",
    "QRSettings",
    "RecordSink",
    "RequestOptions",
    "RowState",
    "SamplingConfig",
    "SamplingPipeline",
    "StepResult",
    "TokenRecord",
    "__version__",
    "load_settings",
    "parse_request_options",
]
