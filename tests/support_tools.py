"""Helpers for the researcher-tooling tests: real records from the real pipeline."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from qr_sampler.config import QRSettings, load_settings
from qr_sampler.entropy.base import EntropyChunk, EntropySource
from qr_sampler.errors import EntropyUnavailableError
from qr_sampler.pipeline import RowState, SamplingPipeline
from qr_sampler.records import RecordSink, TokenRecord


class DownSource(EntropySource):
    """A primary source whose server is down: every fetch raises
    EntropyUnavailableError (the real FallbackSource then labels its bytes)."""

    name: ClassVar[str] = "down"

    def fetch(self, sizes: Sequence[int]) -> list[EntropyChunk]:
        raise EntropyUnavailableError("connection refused (test source)")


def mock_settings(records_path: Path | None = None, **overrides: object) -> QRSettings:
    values: dict[str, object] = {
        "entropy_source_type": "mock_uniform",
        "fallback_mode": "system",
        "sample_count": 2048,
    }
    if records_path is not None:
        values["records_path"] = str(records_path)
    values.update(overrides)
    return load_settings(env={}, env_file=None, **values)


def run_pipeline(
    settings: QRSettings,
    steps: int,
    labels: Sequence[str] = ("a", "b"),
    vocab: int = 64,
    source: EntropySource | None = None,
    sink: RecordSink | None = None,
    listeners: Sequence[object] = (),
    seed: int = 0,
) -> list[TokenRecord]:
    """Sample ``steps`` steps of a batch with one row per label; return the records."""
    gen = torch.Generator().manual_seed(seed)
    base = settings.sampling()
    rows = [
        RowState.of(base.model_copy(update={"label": lab}), request_id=f"req-{i}")
        for i, lab in enumerate(labels)
    ]
    pipe = SamplingPipeline(
        settings,
        source=source,
        sink=sink,
        eos_token_id=0,
        listeners=list(listeners),  # type: ignore[arg-type]
    )
    out: list[TokenRecord] = []
    try:
        for _ in range(steps):
            logits = torch.randn(len(rows), vocab, generator=gen) * 3.0
            out.extend(pipe.sample(logits, rows).records)
    finally:
        pipe.close()
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the signature and CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, "first chunk is not IHDR"
    body = data[16 : 16 + 13]
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(kind + body) == crc, "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG does not end with IEND"
    width, height = struct.unpack(">II", body[:8])
    return width, height
