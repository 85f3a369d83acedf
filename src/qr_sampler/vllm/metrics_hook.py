"""Connects the pipeline to the metrics exporter, on the rank that samples only."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qr_sampler.config import QRSettings

if TYPE_CHECKING:
    from qr_sampler.metrics import MetricsRecorder, MetricsServer

logger = logging.getLogger("qr_sampler")

_server: MetricsServer | None = None
_recorder: MetricsRecorder | None = None


def metrics_recorder(settings: QRSettings) -> MetricsRecorder | None:
    """The process's metrics recorder; its HTTP server starts on first call.

    Returns None when ``QR_METRICS_PORT`` is 0 or the port cannot be bound (the
    engine keeps serving; the reason is logged at ERROR).
    """
    global _server, _recorder
    if not settings.metrics_port:
        return None
    if _recorder is None:
        from qr_sampler.metrics import MetricsRecorder, MetricsRegistry, start_metrics_server

        registry = MetricsRegistry()
        try:
            _server = start_metrics_server(settings.metrics_port, registry)
        except Exception as exc:
            logger.error("metrics disabled: %s", exc)
            return None
        _recorder = MetricsRecorder(registry, config_hash=settings.config_hash())
        logger.warning("qr-sampler metrics on %s", _server.url)
    return _recorder
