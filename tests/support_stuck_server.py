"""A misbehaving entropy device for the reliability tests.

By default it is *stuck*: it serves all-zero bytes. With the environment
variable ``QRSAMPLER_TEST_SLOW_S`` set it is instead *slow*: good bytes
(os.urandom), each request taking that many seconds (graceful-shutdown tests).

It speaks the real ``qr_entropy`` protocol through the package's reusable
server (``run_with_generator``), so a client cannot tell it from a healthy
server until it looks at the bytes. Run the stuck device with
``--health-tests off``, or the server's own health tests refuse to serve the
zeros (that path is tested in test_entropy_server.py); the chaos soak checks
that the *client* detects it. Takes the standard server flags.
"""

from __future__ import annotations

import os
import sys
import time


def zeros(n: int) -> bytes:
    return bytes(n)


def slow(n: int) -> bytes:
    time.sleep(float(os.environ["QRSAMPLER_TEST_SLOW_S"]))
    return os.urandom(n)


if __name__ == "__main__":
    from qr_sampler.server.cli import run_with_generator

    is_slow = bool(os.environ.get("QRSAMPLER_TEST_SLOW_S"))
    sys.exit(
        run_with_generator(
            slow if is_slow else zeros,
            description="misbehaving entropy device (stuck or slow), for tests",
            source_name="slow" if is_slow else "stuck",
            offload=is_slow,
        )
    )
