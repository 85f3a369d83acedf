"""Reusable gRPC entropy server (``qr_entropy.EntropyService``) and its CLI.

Runs without torch or vLLM: only grpcio (+ health checking, reflection),
protobuf, numpy and pydantic are imported.

* :class:`EntropyServer` / :func:`serve` — wrap any ``generate(n) -> bytes``;
* ``qr-sampler serve`` / ``python -m qr_sampler.server`` — the command line;
* ``python -m qr_sampler.server.healthcheck ADDRESS`` — exit 0 when SERVING.
"""

from __future__ import annotations

from qr_sampler.server.service import EntropyServer, Generate, ServerOptions, serve

__all__ = ["EntropyServer", "Generate", "ServerOptions", "serve"]
