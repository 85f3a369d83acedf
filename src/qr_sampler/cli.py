"""The ``qr-sampler`` command line.

Each subcommand lives in its own module, which exposes
``register(subparsers) -> None``; the parser it adds sets ``func`` to a
callable taking the parsed namespace and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand modules, imported when the CLI runs (not on `import qr_sampler`)
SUBCOMMANDS: tuple[str, ...] = (
    "qr_sampler.server.cli",  # serve
    "qr_sampler.probe",  # probe
    "qr_sampler.analyze",  # analyze
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qr-sampler", description="qr-sampler: LLM sampling from physical entropy"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not built yet / not installed
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
