"""Start-up check, run by vLLM in each of its processes through the
``vllm.general_plugins`` entry point, before any engine is built.

Bad ``QR_*`` configuration or an unsupported vLLM version stops the server
with one clear line on stderr and exit status 2, instead of a traceback from
deep inside an engine process. Import-light: no torch, no vLLM internals.
"""

from __future__ import annotations

import os
import sys

_checked = False


def check_settings() -> None:
    """Validate process settings and the vLLM version once per process."""
    global _checked
    if _checked:
        return
    _checked = True
    from qr_sampler.errors import ConfigError
    from qr_sampler.vllm.compat import UnsupportedVLLMError, check_vllm_version

    if _speculative_in_argv(sys.argv):
        # vLLM's V1 runner silently skips installed logits processors under
        # speculative decoding: tokens would be sampled without entropy.
        _refuse(
            "qr-sampler: cannot run with speculative decoding (draft tokens would be "
            "accepted without entropy); remove --speculative-config"
        )
    try:
        check_vllm_version()
        from qr_sampler.config import load_settings

        load_settings()
    except ConfigError as exc:
        _refuse(f"qr-sampler: invalid configuration: {exc}")
    except UnsupportedVLLMError as exc:
        _refuse(f"qr-sampler: {exc}")


def _speculative_in_argv(argv: list[str]) -> bool:
    """Whether a server command line turns speculative decoding on."""
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in ("--speculative-config", "-sc") or flag.startswith("--speculative-config."):
            return True
    return False


def _refuse(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(2)
