"""A "stuck" entropy device for the chaos soak: serves all-zero bytes.

It speaks the real ``qr_entropy`` protocol through the package's reusable
server (``run_with_generator``), so a client cannot tell it from a healthy
server until it looks at the bytes. Run it with ``--health-tests off``, or the
server's own health tests refuse to serve the zeros (that path is tested in
test_entropy_server.py); here the point is that the *client* detects it.
Takes the standard server flags (``--address``, ``--api-key-file``, ...).
"""

from __future__ import annotations

import sys


def zeros(n: int) -> bytes:
    return bytes(n)


if __name__ == "__main__":
    from qr_sampler.server.cli import run_with_generator

    sys.exit(
        run_with_generator(
            zeros,
            description="stuck entropy device (all zeros), for tests",
            source_name="stuck",
            offload=False,
        )
    )
