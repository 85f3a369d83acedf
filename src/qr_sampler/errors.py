"""The qr-sampler exception hierarchy, documented in one place.

``QRSamplerError``
    Base of everything this package raises on purpose.

``ConfigError`` (also a ``ValueError``)
    A configuration value (environment, ``.env`` or a per-request ``qr_*`` key)
    has the wrong type, is out of range, or is unknown. The message names the
    field and what is allowed. vLLM turns a ``ValueError`` raised during request
    admission into HTTP 400.

``EntropyError``
    An entropy source could not deliver the requested bytes. Subclasses say why:

    ``EntropyUnavailableError``  the source cannot be reached (connection refused,
                                 deadline exceeded, circuit breaker open).
    ``EntropyReplyError``        a reply arrived but is not entropy: short, empty,
                                 oversized, malformed, wrong sequence id.
    ``HealthTestError``          the bytes failed a continuous health test
                                 (SP 800-90B repetition count / adaptive proportion).
    ``AuthenticationError``      the server refused our credentials.
"""

from __future__ import annotations


class QRSamplerError(Exception):
    """Base class for every error qr-sampler raises on purpose."""


class ConfigError(QRSamplerError, ValueError):
    """Bad configuration: names the field and the allowed values."""


class EntropyError(QRSamplerError):
    """An entropy source failed to deliver valid bytes."""

    #: short machine-readable reason used in records and metrics labels
    reason: str = "error"


class EntropyUnavailableError(EntropyError):
    """The source could not be reached (refused, timed out, breaker open)."""

    reason = "unavailable"


class EntropyReplyError(EntropyError):
    """A reply arrived but was not valid entropy (wrong length, malformed...)."""

    reason = "bad_reply"


class HealthTestError(EntropyError):
    """Incoming bytes failed a continuous health test."""

    reason = "health_test"


class AuthenticationError(EntropyError):
    """The entropy server rejected our credentials."""

    reason = "auth"


__all__ = [
    "AuthenticationError",
    "ConfigError",
    "EntropyError",
    "EntropyReplyError",
    "EntropyUnavailableError",
    "HealthTestError",
    "QRSamplerError",
]
