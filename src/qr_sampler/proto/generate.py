"""Regenerate the protocol's Python modules from ``entropy.proto`` with grpcio-tools.

    python -m qr_sampler.proto.generate            # rewrite the committed modules
    python -m qr_sampler.proto.generate --out DIR  # write DIR/qr_sampler/proto/... instead

protoc runs with the package's ``src`` directory as the include root on
``qr_sampler/proto/entropy.proto``, so the generated code imports itself as
``qr_sampler.proto.entropy_pb2``. Needs the ``dev`` extra (grpcio-tools).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

#: the directory that contains the ``qr_sampler`` package (``src``)
SRC_ROOT = Path(__file__).resolve().parents[2]
PROTO = "qr_sampler/proto/entropy.proto"
#: files protoc writes, relative to the output root
GENERATED: tuple[str, ...] = (
    "qr_sampler/proto/entropy_pb2.py",
    "qr_sampler/proto/entropy_pb2.pyi",
    "qr_sampler/proto/entropy_pb2_grpc.py",
)


def generate(out_root: Path) -> list[Path]:
    """Run protoc; return the paths written under ``out_root``."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("grpcio-tools is needed: pip install 'qr-sampler[dev]'") from exc
    import importlib.resources

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{SRC_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        PROTO,
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return [out_root / name for name in GENERATED]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=SRC_ROOT, help="output root (default: the package's src)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
