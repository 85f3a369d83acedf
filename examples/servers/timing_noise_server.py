#!/usr/bin/env python3
"""A gRPC entropy server whose bytes come from CPU timing jitter (experimental).

    python examples/servers/timing_noise_server.py --address 127.0.0.1:50051

Each 32 output bytes are a SHA-256 of 64 ``perf_counter_ns`` deltas around a
tiny busy loop. CPU jitter is not a characterised physical source: use this to
try the plumbing, not for experiments. It is slow (tens of milliseconds per
20 KB), so generation runs in worker threads and the event loop stays free.
Every flag of ``qr-sampler serve`` except ``--source`` applies (``--help``).
"""

from __future__ import annotations

import sys

from qr_sampler.entropy.timing import jitter_bytes
from qr_sampler.server.cli import run_with_generator

if __name__ == "__main__":
    sys.exit(
        run_with_generator(
            jitter_bytes,
            description="CPU timing-jitter entropy server (experimental)",
            source_name="timing",
            offload=True,
        )
    )
