"""Helpers for the Docker tests: the deployment profiles, the Compose v2 CLI,
a private Docker engine and the stand-in base images.

The static tier (tests/test_deployments_static.py) needs only the pip-installed
tools (``docker-compose``, ``check-jsonschema``, ``hadolint``); the engine tier
(tests/test_docker_engine.py) starts its own dockerd through
``scripts/docker/standins.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
PROFILES = ("urandom", "firefly-1", "_template")
DOCKERFILES = {
    "vllm": REPO / "examples" / "docker" / "Dockerfile.vllm",
    "entropy-server": REPO / "examples" / "docker" / "Dockerfile.entropy-server",
}
CI_DIR = REPO / "tests" / "docker"
CI_OVERRIDES = {
    "urandom": [CI_DIR / "ci-vllm.yml", CI_DIR / "ci-urandom.yml"],
    "firefly-1": [CI_DIR / "ci-vllm.yml", CI_DIR / "ci-firefly-1.yml"],
    "_template": [CI_DIR / "ci-vllm.yml", CI_DIR / "ci-template.yml"],
}
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def tool(name: str) -> str:
    """A dev tool installed next to this interpreter (the .venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is not installed: run `pip install -e '.[dev]'`")
    return found


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment: no QR_*/HF_*/VLLM_* variables leak in from the caller."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(extra or {})
    return env


def load_standins() -> ModuleType:
    """scripts/docker/standins.py as a module (it is a script, not a package)."""
    path = REPO / "scripts" / "docker" / "standins.py"
    spec = importlib.util.spec_from_file_location("qr_standins", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qr_standins", module)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# the static tier: `docker-compose config` on a faithful copy of a profile


def mirror_repo(root: Path, profile: str) -> Path:
    """``root`` laid out like the repository, holding a *copy* of one profile
    (so a test can add a .env) and links to everything else the build uses.
    Returns the profile's folder in the mirror."""
    for name in ("examples", "src", "scripts", "tests", "pyproject.toml", "README.md"):
        (root / name).symlink_to(REPO / name)
    target = root / "deployments" / profile
    shutil.copytree(DEPLOYMENTS / profile, target)
    return target


@dataclass
class ComposeResult:
    returncode: int
    config: dict[str, Any]
    stderr: str


def compose_config(
    project_dir: Path,
    files: Sequence[Path] = (),
    profiles: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ComposeResult:
    """``docker-compose [-f ...] [--profile ...] config --format json`` in ``project_dir``."""
    cmd = [tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    cmd += ["config", "--format", "json"]
    proc = subprocess.run(
        cmd, cwd=project_dir, env=clean_env(env), capture_output=True, text=True, check=False
    )
    config = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}
    return ComposeResult(proc.returncode, config, proc.stderr)


def env_file_vars(path: Path, include_commented: bool = False) -> dict[str, str]:
    """``NAME=value`` lines of an env file (optionally also ``# NAME=value`` ones)."""
    pattern = r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$"
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(pattern, line.strip())
        if m and (include_commented or not m.group(1)):
            out[m.group(2)] = m.group(3).strip()
    return out


# ---------------------------------------------------------------------------
# the engine tier


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ComposeProject:
    """One `docker compose` project (a profile + CI overrides) on a private daemon."""

    profile: str
    name: str
    docker_host: str
    env: dict[str, str]

    @property
    def files(self) -> list[Path]:
        return [DEPLOYMENTS / self.profile / "docker-compose.yml", *CI_OVERRIDES[self.profile]]

    def run(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        cmd = [tool("docker-compose"), "-p", self.name]
        for f in self.files:
            cmd += ["-f", str(f)]
        cmd += list(args)
        env = clean_env(self.env)
        env["DOCKER_HOST"] = self.docker_host
        env["DOCKER_BUILDKIT"] = "0"  # no buildx here: the classic builder
        env["COMPOSE_BAKE"] = "false"
        proc = subprocess.run(
            cmd,
            cwd=DEPLOYMENTS / self.profile,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service, check=False).stdout

    def port(self, service: str, private: int) -> int:
        out = self.run("port", service, str(private)).stdout.strip()
        return int(out.rsplit(":", 1)[1])


def iter_records(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)
