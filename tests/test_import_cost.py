"""``import qr_sampler`` stays cheap: vLLM imports plugins in its API-server
process too, and the entropy-server side must run without torch or vLLM.

Each check runs in a fresh interpreter that refuses to import the heavy
packages at all (a meta-path blocker), so an accidental import fails loudly
with the importing module in the traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} must not be imported here")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess[str]:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, ",".join(sorted(blocked))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


HEAVY = {"torch", "grpc", "vllm", "transformers", "scipy", "matplotlib"}


@pytest.mark.parametrize("module", ["qr_sampler", "qr_sampler.config", "qr_sampler.errors"])
def test_package_and_config_import_without_torch_grpc_or_vllm(module: str) -> None:
    proc = _run(
        f"""
        import importlib
        importlib.import_module({module!r})
        import qr_sampler
        qr_sampler.load_settings(env={{}}, env_file=None)
        print("ok")
        """,
        HEAVY,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize(
    "module",
    ["qr_sampler.entropy", "qr_sampler.sampling.amplify", "qr_sampler.records"],
)
def test_entropy_side_imports_without_torch_or_vllm(module: str) -> None:
    proc = _run(f"import importlib; importlib.import_module({module!r})", {"torch", "vllm"})
    assert proc.returncode == 0, proc.stderr


def test_command_line_builds_without_torch_or_vllm() -> None:
    """Every subcommand registers (so `qr-sampler serve` on an entropy host) without torch."""
    proc = _run(
        "from qr_sampler.cli import build_parser; build_parser(); print('ok')", {"torch", "vllm"}
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_blocker_really_blocks() -> None:
    proc = _run("import qr_sampler.pipeline", {"torch"})
    assert proc.returncode != 0 and "torch must not be imported here" in proc.stderr


def test_lazy_public_names_resolve() -> None:
    import qr_sampler

    for name in qr_sampler.__all__:
        assert getattr(qr_sampler, name) is not None, name
    with pytest.raises(AttributeError):
        qr_sampler.no_such_name  # noqa: B018
