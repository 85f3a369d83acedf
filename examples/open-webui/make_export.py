"""Rebuild qr_sampler_filter.json (Open WebUI's function import format) from
qr_sampler_filter.py. Run after editing the filter:

    python examples/open-webui/make_export.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "qr_sampler_filter.py"
EXPORT = HERE / "qr_sampler_filter.json"
FUNCTION_ID = "qr_sampler"
#: fixed so the export is reproducible (2026-01-01T00:00:00Z)
TIMESTAMP = 1767225600


def manifest(source: str) -> dict[str, str]:
    """The `key: value` lines of the module docstring's header."""
    text = source.split('"""', 2)[1]
    out: dict[str, str] = {}
    for line in text.strip().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def build() -> str:
    source = SOURCE.read_text(encoding="utf-8")
    meta = manifest(source)
    function = {
        "id": FUNCTION_ID,
        "user_id": None,
        "name": meta.get("title", FUNCTION_ID),
        "type": "filter",
        "content": source,
        "meta": {"description": meta.get("description", ""), "manifest": meta},
        "is_active": False,
        "is_global": False,
        "updated_at": TIMESTAMP,
        "created_at": TIMESTAMP,
    }
    return json.dumps([function], indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    EXPORT.write_text(build(), encoding="utf-8")
    print(f"wrote {EXPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
