"""Which vLLM versions and configurations the plugin supports."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("qr_sampler")

#: (major, minor) releases the adapter is written and tested against
SUPPORTED_VLLM: tuple[tuple[int, int], ...] = ((0, 32), (0, 33))


class UnsupportedVLLMError(RuntimeError):
    """vLLM version or configuration the plugin cannot serve correctly."""


def _fail(message: str) -> None:
    logger.error(message)
    raise UnsupportedVLLMError(message)


def parse_version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (-1, -1)


def check_vllm_version(version: str | None = None) -> None:
    """Refuse with one clear line on a vLLM release we do not support."""
    if version is None:
        import vllm

        version = str(vllm.__version__)
    if parse_version(version) not in SUPPORTED_VLLM:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        _fail(f"qr-sampler supports vLLM {supported}; this is vLLM {version}")


def check_vllm_config(vllm_config: Any) -> None:
    """Refuse configurations where forcing one token per row is wrong."""
    if getattr(vllm_config, "speculative_config", None):
        _fail(
            "qr-sampler cannot run with speculative decoding: draft tokens would be "
            "accepted without entropy; disable --speculative-config"
        )
    parallel = getattr(vllm_config, "parallel_config", None)
    if getattr(parallel, "enable_batch_sharded_sampling", False):
        _fail(
            "qr-sampler cannot run with batch-sharded sampling: TP ranks would sample "
            "different rows; disable enable_batch_sharded_sampling"
        )
