"""``python -m qr_sampler.server`` — the same as ``qr-sampler serve``."""

from __future__ import annotations

import sys

from qr_sampler.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
