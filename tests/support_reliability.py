"""Helpers for the reliability tests: process memory from /proc, process trees,
raw HTTP bodies, and a search for a secret in everything a run produced.

psutil is not a dependency: resident memory is read from ``/proc/PID/status``
(``VmRSS``), children from the parent-pid field of ``/proc/PID/stat``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    # the command name (field 2) is in parentheses and may contain spaces
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parents.setdefault(_ppid(int(entry.name)), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode(errors="replace"))


def find_secret(secret: str, texts: dict[str, str], files: Iterable[Path]) -> list[str]:
    """Names of the texts and files in which ``secret`` (or its bytes) appears."""
    hits = [name for name, text in texts.items() if secret in text]
    needle = secret.encode()
    for path in files:
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path))
    return hits
