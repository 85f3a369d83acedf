"""Connects the pipeline to the metrics exporter (on the rank that samples)."""

from __future__ import annotations

from collections.abc import Callable

from qr_sampler.config import QRSettings
from qr_sampler.records import TokenRecord


def listeners_for(settings: QRSettings) -> list[Callable[[list[TokenRecord]], None]]:
    """Pipeline listeners for this process; the metrics server starts here, once."""
    if not settings.metrics_port:
        return []
    from qr_sampler import metrics

    return [metrics.start_for_settings(settings)]
