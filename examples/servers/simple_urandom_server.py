#!/usr/bin/env python3
"""A gRPC entropy server that serves os.urandom bytes (testing, and deployments
without quantum hardware).

    python examples/servers/simple_urandom_server.py --address 127.0.0.1:50051
    python examples/servers/simple_urandom_server.py --address unix:///run/qr-entropy/entropy.sock

Every flag of ``qr-sampler serve`` except ``--source`` applies (``--help``).
Needs only the qr-sampler package without extras (no torch, no vLLM).
"""

from __future__ import annotations

import sys

from qr_sampler.server.cli import run_with_generator
from qr_sampler.server.sources import urandom


def generate(n: int) -> bytes:
    """n fresh bytes from the operating system's CSPRNG (large requests are
    drawn in pieces on several cores at once)."""
    return urandom(n)


if __name__ == "__main__":
    sys.exit(
        run_with_generator(
            generate,
            description=__doc__.splitlines()[0] if __doc__ else "urandom entropy server",
            source_name="urandom",
            offload=False,  # os.urandom is fast: call it on the event loop
        )
    )
