"""A urandom entropy server that appends one line per entropy request to a file
(``QRSAMPLER_COUNT_FILE``), so tests can count requests at the server.

Run as a script: ``python tests/support_counting_server.py --address ADDR``.
"""

from __future__ import annotations

import os
import sys
import time

from qr_sampler.server.cli import run_with_generator


def main() -> int:
    path = os.environ["QRSAMPLER_COUNT_FILE"]

    def generate(n: int) -> bytes:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.time_ns()} {n}\n")
        return os.urandom(n)

    return run_with_generator(
        generate, description="counting urandom server (tests)", source_name="counting"
    )


if __name__ == "__main__":
    sys.exit(main())
