"""Entropy-source registry: built-ins and third-party plugins alike come from
the entry-point group ``qr_sampler.entropy_sources``."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from qr_sampler.entropy.base import EntropySource
from qr_sampler.errors import ConfigError

if TYPE_CHECKING:
    from qr_sampler.config import QRSettings

GROUP = "qr_sampler.entropy_sources"

_extra: dict[str, type[EntropySource]] = {}


def register(name: str, cls: type[EntropySource]) -> None:
    """Register a source class in-process (entry points are the usual way)."""
    _extra[name] = cls


def available() -> list[str]:
    """Names of every source that can be built."""
    return sorted({ep.name for ep in entry_points(group=GROUP)} | set(_extra))


def get_source_class(name: str) -> type[EntropySource]:
    if name in _extra:
        return _extra[name]
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, EntropySource)):
                raise ConfigError(
                    f"QR_ENTROPY_SOURCE_TYPE: entry point {name!r} is not an EntropySource"
                )
            return cls
    raise ConfigError(
        f"QR_ENTROPY_SOURCE_TYPE: unknown source {name!r}; available: {', '.join(available())}"
    )


def build_source(settings: QRSettings, name: str | None = None) -> EntropySource:
    """Build one source by name (default: the configured primary)."""
    return get_source_class(name or settings.entropy_source_type).from_settings(settings)


def build_entropy(settings: QRSettings) -> EntropySource:
    """The configured primary, wrapped with the configured fallback."""
    from qr_sampler.entropy.fallback import FallbackSource

    primary = build_source(settings)
    if settings.fallback_mode == "error":
        return FallbackSource(primary, None)
    if settings.fallback_mode == primary.name:
        return primary
    return FallbackSource(primary, build_source(settings, settings.fallback_mode))
