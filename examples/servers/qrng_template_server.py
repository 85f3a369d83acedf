#!/usr/bin/env python3
"""Template: serve YOUR hardware random number generator to qr-sampler.

Copy this file, fill in the four methods of ``MyQRNG`` — ``open``,
``generate``, ``close``, ``is_healthy`` — and run it:

    python my_qrng_server.py --address 0.0.0.0:50051 --api-key-file /etc/qr/key

Everything else comes from the reusable server (``qr_sampler.server``):
the ``qr_entropy.EntropyService`` protocol (unary, server-streaming and
bidirectional streaming), just-in-time generation (one ``generate`` call per
request; nothing is pooled or cached), sequence-id echo, generation
timestamps and device id in every reply, per-request byte cap and stream
limit, optional API key (``--api-key-env`` / ``--api-key-file``) and TLS,
continuous SP 800-90B health tests on your bytes, the standard gRPC health
service (NOT_SERVING while ``is_healthy()`` is False or a health test
failed), server reflection, and graceful shutdown on SIGTERM/SIGINT.
``--help`` lists every flag.

As shipped, the template reads os.urandom so that it runs; it says so in its
device id and logs a warning. Replace that before using it for experiments.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from qr_sampler.server.cli import run_with_generator

logger = logging.getLogger("qrng_template")


class MyQRNG:
    """One physical device. The server calls ``generate`` from worker threads,
    possibly concurrently: keep the device access behind a lock (below)."""

    #: shows up in every reply and every qr-sampler provenance record
    device_id = "TEMPLATE-os.urandom-not-a-qrng"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle: object | None = None

    def open(self) -> None:
        """Open the device: find it, claim it, run its self-test.

        Raise an exception if the device cannot be used: the server then does
        not start. Example: ``self._handle = vendor_sdk.open(serial="...")``.
        """
        logger.warning("qrng_template_server: serving os.urandom — fill in MyQRNG first")
        self._handle = "placeholder"

    def generate(self, n: int) -> bytes:
        """Return exactly ``n`` fresh random bytes from the device, read now.

        Do not return bytes read earlier (no buffers kept between calls): the
        just-in-time rule is what lets the records prove the bytes came after
        the logits. Raise an exception on a device error: the client sees
        UNAVAILABLE and falls back, labelled.
        Example: ``return self._handle.read(n)``.
        """
        with self._lock:
            return os.urandom(n)

    def is_healthy(self) -> bool:
        """The device's own view of its health (polled about once a second).

        Return False while it is not fit to serve (laser off, temperature out
        of range, failed self-test...): the gRPC health service then reports
        NOT_SERVING, and load balancers / Docker health checks can react.
        """
        return self._handle is not None

    def close(self) -> None:
        """Release the device; called once after the server stopped."""
        with self._lock:
            self._handle = None


def main() -> int:
    device = MyQRNG()
    device.open()
    return run_with_generator(
        device.generate,
        description="qr-sampler entropy server for a hardware QRNG (template)",
        source_name="qrng",
        is_healthy=device.is_healthy,
        close=device.close,
        offload=True,  # device reads block: run them in worker threads
        default_device_id=MyQRNG.device_id,
    )


if __name__ == "__main__":
    sys.exit(main())
