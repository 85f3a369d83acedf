"""Host memory: keep a CPU sampling step's large temporaries mapped.

vLLM's CPU worker runs on glibc malloc unless tcmalloc is preloaded. glibc
serves large blocks from their own mappings and trims the heap's free top back
to the kernel, so every step's multi-megabyte tensors (rows x vocabulary) are
page-faulted in again: measured ~16,000 minor faults and 15-20 ms of a 60 ms
step at batch 8, vocabulary 151,936 (benchmarks/RESULTS.md, target 4).
:func:`tune_host_allocator` raises both thresholds once per process. It changes
the allocator for the whole process, so it is called only where qr-sampler
owns the sampling step on the CPU: the vLLM adapter (and the CPU benchmarks,
to measure what the adapter runs). ``QRSAMPLER_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("qr_sampler")

#: "0" keeps glibc's default malloc thresholds
MALLOC_TUNING_ENV = "QRSAMPLER_MALLOC_TUNING"

_state = {"checked": False}
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_host_allocator() -> bool:
    """Blocks up to 32-64 MiB from the heap, up to 256 MiB of free heap top kept,
    so the next step reuses the same pages. True if changed now; once per
    process; skipped with tcmalloc/jemalloc/mimalloc loaded, off glibc, or with
    QRSAMPLER_MALLOC_TUNING=0."""
    if _state["checked"]:
        return False
    _state["checked"] = True
    if os.environ.get(MALLOC_TUNING_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return False
        maps = Path("/proc/self/maps").read_text(errors="replace")
        if "tcmalloc" in maps or "jemalloc" in maps or "mimalloc" in maps:
            return False
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, 64 << 20) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        ok = bool(ok) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))
    except Exception as exc:  # no libc symbol, unreadable maps: leave malloc alone
        logger.debug("malloc thresholds unchanged: %s", exc)
        return False
    if ok:
        logger.info("qr-sampler: glibc malloc thresholds raised for the CPU sampling step")
    return ok
