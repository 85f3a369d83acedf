"""Static tier of the Docker deployments: no engine needed.

The real Compose v2 CLI (``docker-compose config``) interpolates and validates
each profile with and without a ``.env``, with ``--profile ui`` and with
overrides; check-jsonschema validates the files against the compose-spec
schema; hadolint lints both Dockerfiles; the environment every profile hands
to vLLM is loaded through qr-sampler's own ``load_settings``; README links and
the configuration reference are checked against the tree and the settings class.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support_docker import (
    CI_OVERRIDES,
    DEFAULT_MODEL,
    DEPLOYMENTS,
    DOCKERFILES,
    PROFILES,
    REPO,
    ComposeResult,
    compose_config,
    env_file_vars,
    mirror_repo,
    tool,
)

from qr_sampler.config import field_table, load_settings

FIELD_ENVS = {row.env for row in field_table()}
SCENARIOS = ("no-env", "env-example", "ui", "overrides")
PROFILE_FILES = ("README.md", ".env.example", "docker-compose.yml")
FIREFLY_METHOD = "/qrng.QuantumRNG/GetRandomBytes"


def _configure(tmp_path: Path, profile: str, scenario: str) -> ComposeResult:
    project = mirror_repo(tmp_path, profile)
    env: dict[str, str] = {}
    profiles: tuple[str, ...] = ()
    if scenario == "env-example":
        shutil.copy(project / ".env.example", project / ".env")
    elif scenario == "ui":
        profiles = ("ui",)
    elif scenario == "overrides":
        # a value from the shell, one from .env, and a QR_* the compose file never names
        env = {"HF_MODEL": "org/other-model", "QR_SAMPLE_COUNT": "4096", "VLLM_HOST_PORT": "18000"}
        (project / ".env").write_text("QR_TOP_K=7\nQR_MIN_P=0.05\nQR_LABEL=from-dotenv\n")
    return compose_config(project, profiles=profiles, env=env)


def _vllm_env(config: dict[str, Any]) -> dict[str, str]:
    env = config["services"]["vllm"]["environment"]
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("profile", PROFILES)
def test_compose_config_is_clean(tmp_path: Path, profile: str, scenario: str) -> None:
    result = _configure(tmp_path, profile, scenario)
    assert result.returncode == 0, result.stderr
    assert "not set" not in result.stderr, result.stderr
    assert not re.search(r"warn", result.stderr, re.I), result.stderr
    services = result.config["services"]
    assert "vllm" in services
    assert ("open-webui" in services) == (scenario == "ui")
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        build = service.get("build")
        if build is None:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), name
            continue
        context = Path(build["context"])
        assert context.resolve() == tmp_path.resolve(), f"{name}: context must be ../.."
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES.values()}

    env = _vllm_env(result.config)
    # what the profile hands to vLLM is a valid qr-sampler configuration
    settings = load_settings(env=env, env_file=None)
    assert settings.entropy_source_type == "quantum_grpc"
    assert settings.records_path
    if scenario == "overrides":
        assert env["HF_MODEL"] == "org/other-model"
        assert settings.sample_count == 4096
        assert settings.top_k == 7  # named in compose, value from .env
        assert settings.min_p == 0.05  # never named in compose: passed through from .env
        assert settings.label == "from-dotenv"
        ports = services["vllm"]["ports"]
        assert [p["published"] for p in ports] == ["18000"]
    else:
        assert env["HF_MODEL"] == DEFAULT_MODEL


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_services(tmp_path: Path, profile: str) -> None:
    result = _configure(tmp_path, profile, "ui")
    assert result.returncode == 0, result.stderr
    services = result.config["services"]
    vllm = services["vllm"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    mounts = {v["target"]: v for v in vllm["volumes"]}
    assert mounts["/root/.cache/huggingface"]["type"] == "volume"
    assert "HF_TOKEN" in vllm["environment"]
    assert vllm["build"]["dockerfile"] == "examples/docker/Dockerfile.vllm"
    for service in services.values():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", "ports are published on loopback by default"
    assert services["open-webui"]["profiles"] == ["ui"]
    assert services["open-webui"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    settings = load_settings(env=_vllm_env(result.config), env_file=None)
    assert settings.grpc_api_key.get_secret_value() == ""

    if profile == "urandom":
        assert set(services) == {"vllm", "entropy-server", "open-webui"}
        server = services["entropy-server"]
        assert server["build"]["dockerfile"] == "examples/docker/Dockerfile.entropy-server"
        assert vllm["depends_on"]["entropy-server"]["condition"] == "service_healthy"
        assert "qr_sampler.server.healthcheck" in " ".join(server["healthcheck"]["test"])
        assert settings.grpc_server_address == "entropy-server:50051"
        assert server["environment"]["ENTROPY_SERVER"] == "simple_urandom_server"
    else:
        assert set(services) == {"vllm", "open-webui"}, "the entropy source is external"
    if profile == "firefly-1":
        assert settings.grpc_mode == "unary"
        assert settings.grpc_method_path == FIREFLY_METHOD
        assert settings.grpc_api_key_header == "api-key"
        assert settings.grpc_max_bytes_per_request == 13312 or settings.sample_count == 13312
        assert settings.grpc_server_address.split(":")[0].endswith(".invalid")


@pytest.mark.parametrize("profile", PROFILES)
def test_ci_override_removes_gpu_and_uses_tiny_model(tmp_path: Path, profile: str) -> None:
    project = mirror_repo(tmp_path, profile)
    files = [project / "docker-compose.yml", *CI_OVERRIDES[profile]]
    result = compose_config(project, files=files, env={"QR_GRPC_API_KEY": "ci-key"})
    assert result.returncode == 0, result.stderr
    assert not re.search(r"warn", result.stderr, re.I), result.stderr
    vllm = result.config["services"]["vllm"]
    assert "deploy" not in vllm or not vllm["deploy"].get("resources")
    assert vllm["environment"]["HF_MODEL"] == "/models/tiny"
    for name, service in result.config["services"].items():
        if "build" in service:
            assert service["build"].get("network") == "host", name
    load_settings(env=_vllm_env(result.config), env_file=None)


def test_compose_files_match_the_compose_spec_schema() -> None:
    files = [str(DEPLOYMENTS / p / "docker-compose.yml") for p in PROFILES]
    proc = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(name: str) -> None:
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", "-f", "json", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, errors
    assert not findings, f"hadolint findings (warnings count too): {findings}"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_vllm_contract() -> None:
    path = DOCKERFILES["vllm"]
    steps = _instructions(path)
    args = [a for w, a in steps if w == "ARG"]
    base = next(a for a in args if a.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+", base), base
    assert steps[[w for w, _ in steps].index("FROM")] == ("FROM", "${BASE_IMAGE}")
    env = " ".join(a for w, a in steps if w == "ENV")
    assert f"HF_MODEL={DEFAULT_MODEL}" in env
    assert "VLLM_DTYPE=half" in env and "VLLM_GPU_MEM=0.90" in env
    assert ("ENTRYPOINT", "[]") in steps, "the base image's entrypoint must be reset"
    cmd = json.loads(next(a for w, a in steps if w == "CMD"))
    serve = cmd[-1]
    assert '--dtype "$VLLM_DTYPE"' in serve
    assert '--gpu-memory-utilization "$VLLM_GPU_MEM"' in serve
    assert '--model "$HF_MODEL"' in serve
    health = next(a for w, a in steps if w == "HEALTHCHECK")
    assert "/health" in health
    run = " ".join(a for w, a in steps if w == "RUN")
    assert "pip install" in run and " ." in run
    comments = path.read_text()
    assert "V2" in comments and "VLLM_USE_V2_MODEL_RUNNER=0" in comments


def test_dockerfile_entropy_server_contract() -> None:
    path = DOCKERFILES["entropy-server"]
    steps = _instructions(path)
    installs = [a for w, a in steps if w == "RUN" and "pip install" in a]
    assert installs, "qr-sampler is installed at build time"
    for install in installs:
        command = install.split("&&")[0]
        assert not re.search(r"torch|vllm|\[", command), f"must stay light: {command}"
    base = next(a for w, a in steps if w == "ARG" and a.startswith("BASE_IMAGE="))
    assert "vllm" not in base and not base.endswith(":latest"), base
    env = " ".join(a for w, a in steps if w == "ENV")
    default = re.search(r"ENTROPY_SERVER=(\w+)", env)
    assert default, "ENTROPY_SERVER picks the script of examples/servers/"
    script = REPO / "examples" / "servers" / f"{default.group(1)}.py"
    assert script.is_file(), f"{script} does not exist"
    health = next(a for w, a in steps if w == "HEALTHCHECK")
    assert "qr_sampler.server.healthcheck" in health
    cmd = json.loads(next(a for w, a in steps if w == "CMD"))
    assert "examples/servers/${ENTROPY_SERVER}.py" in cmd[-1]


def test_layout_is_exactly_the_documented_one() -> None:
    for profile in PROFILES:
        for name in PROFILE_FILES:
            assert (DEPLOYMENTS / profile / name).is_file(), f"{profile}/{name} missing"
    assert (DEPLOYMENTS / "README.md").is_file()
    assert (DEPLOYMENTS / ".gitignore").is_file()
    assert not (REPO / "examples" / "docker" / "docker-compose.yml").exists()
    overrides = [p for p in _repo_files() if p.name == "docker-compose.override.yml"]
    assert not overrides, overrides


def test_real_env_files_are_git_ignored() -> None:
    for profile in PROFILES:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"deployments/{profile}/.env"], cwd=REPO, check=False
        )
        assert ignored.returncode == 0, f"deployments/{profile}/.env is not ignored"
        kept = subprocess.run(
            ["git", "check-ignore", "-q", f"deployments/{profile}/.env.example"],
            cwd=REPO,
            check=False,
        )
        assert kept.returncode == 1, f"deployments/{profile}/.env.example must not be ignored"


def _repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def test_no_llama_model_reference_anywhere() -> None:
    banned = "meta-llama/" + "Llama-3.2-1B"
    hits = []
    for path in _repo_files():
        try:
            if banned in path.read_text(encoding="utf-8", errors="ignore"):
                hits.append(str(path.relative_to(REPO)))
        except OSError:
            continue
    assert not hits, f"use {DEFAULT_MODEL} instead, in: {hits}"


def _qr_names(text: str) -> set[str]:
    return set(re.findall(r"\bQR_[A-Z0-9_]*[A-Z0-9]\b", text))


def test_every_qr_variable_in_deployments_is_a_real_setting() -> None:
    files = [DEPLOYMENTS / p / n for p in PROFILES for n in PROFILE_FILES]
    files += [DEPLOYMENTS / "README.md", REPO / "README.md"]
    files += sorted(p for ps in CI_OVERRIDES.values() for p in ps)
    for path in files:
        unknown = _qr_names(path.read_text()) - FIELD_ENVS
        assert not unknown, f"{path.relative_to(REPO)} names unknown settings: {sorted(unknown)}"


def test_template_env_example_lists_every_setting_and_loads() -> None:
    path = DEPLOYMENTS / "_template" / ".env.example"
    every = env_file_vars(path, include_commented=True)
    missing = sorted(FIELD_ENVS - set(every))
    assert not missing, f"_template/.env.example lacks {missing}"
    # the shown defaults are valid values: uncommenting any of them is safe
    qr = {k: v for k, v in every.items() if k.startswith("QR_") and v != ""}
    settings = load_settings(env=qr, env_file=None)
    defaults = load_settings(env={}, env_file=None)
    for name in ("sample_count", "population_std", "cb_window_size", "health_alpha_log2"):
        assert getattr(settings, name) == getattr(defaults, name), name


@pytest.mark.parametrize("profile", PROFILES)
def test_env_example_documents_every_variable(profile: str) -> None:
    path = DEPLOYMENTS / profile / ".env.example"
    lines = path.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if not re.match(r"^(#\s*)?[A-Z][A-Z0-9_]*=", line):
            continue
        j = i - 1  # walk up through the block of assignments to its comment
        while j >= 0 and re.match(r"^(#\s*)?[A-Z][A-Z0-9_]*=", lines[j]):
            j -= 1
        if j < 0 or not lines[j].startswith("#"):
            undocumented.append(line)
    assert not undocumented, f"no comment above: {undocumented}"
    # every variable the compose file interpolates is in .env.example
    compose = (DEPLOYMENTS / profile / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    listed = set(env_file_vars(path, include_commented=True))
    assert not used - listed, f"not in .env.example: {sorted(used - listed)}"
    # and active values load as a qr-sampler configuration
    active = {k: v for k, v in env_file_vars(path).items() if k.startswith("QR_")}
    load_settings(env=active, env_file=None)


def test_firefly_env_example_holds_no_key() -> None:
    values = env_file_vars(DEPLOYMENTS / "firefly-1" / ".env.example", include_commented=True)
    assert values["QR_GRPC_API_KEY"] == ""
    assert values["QR_GRPC_METHOD_PATH"] == FIREFLY_METHOD
    assert values["QR_GRPC_MAX_BYTES_PER_REQUEST"] == "13312"


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", DEPLOYMENTS / "README.md"] + [
        DEPLOYMENTS / p / "README.md" for p in PROFILES
    ]


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_readme_links_and_paths_resolve(path: Path) -> None:
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
            continue
        if anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", dest.read_text(), re.M)}
            if anchor not in slugs:
                broken.append(target)
    # `cd <dir>` in shell blocks: relative to the repository root or to this file
    for target in re.findall(r"^\s*cd\s+([\w./-]+)", text, re.M):
        exists = (REPO / target).is_dir() or (path.parent / target).is_dir()
        placeholder = target.startswith(("deployments/my-", "qr-sampler"))
        if not exists and not placeholder:
            broken.append(f"cd {target}")
    assert not broken, f"{path.relative_to(REPO)}: unresolved {broken}"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_readme_is_self_contained(profile: str) -> None:
    text = (DEPLOYMENTS / profile / "README.md").read_text()
    assert "cp .env.example .env" in text
    assert "docker compose up --build" in text
    assert "curl" in text and "vllm_xargs" in text
    for heading in ("Quick start", "What runs", "When to use", "Troubleshooting"):
        assert re.search(rf"^## {heading}", text, re.M), f"{profile}: no '{heading}' section"
    others = [p for p in PROFILES if p != profile] + ["examples/docker"]
    for other in others:
        assert f"{other}/docker-compose" not in text, f"refers to {other}'s compose file"
    assert not re.search(r"\s-f\s+\S*docker-compose", text), "no -f to another compose file"


def test_main_readme_structure() -> None:
    text = (REPO / "README.md").read_text()
    headings = re.findall(r"^## (.*)$", text, re.M)
    wanted = [
        "Quick start with an external entropy source",
        "Connecting your own QRNG",
        "Bare-metal install",
        "System entropy",
        "Per-request settings",
        "Configuration reference",
        "No GPU",
        "Tests",
    ]
    positions = []
    for want in wanted:
        found = [i for i, h in enumerate(headings) if h.startswith(want)]
        assert found, f"README lacks a '## {want}...' section"
        positions.append(found[0])
    assert positions == sorted(positions), f"README sections out of order: {headings}"
    assert "cd deployments/urandom && docker compose up --build" in text or (
        "cd deployments/urandom" in text and "docker compose up --build" in text
    )
    assert "extra_body" in text and "vllm_xargs" in text
    assert "not useful" in text.lower() and "consciousness" in text.lower()
    assert "make test" in text and "make demo" in text
    for profile in PROFILES:
        assert f"deployments/{profile}/README.md" in text


def test_readme_configuration_reference_matches_the_settings_class() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "README.md").read_text()
    for row in field_table():
        assert f"| `{row.env}` |" in text, row.env


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = [line[1:] for line in lines if line.startswith("!")]
    assert not any(a.startswith((".venv", ".cache")) for a in allowed)
    for dockerfile in DOCKERFILES.values():
        for word, args in _instructions(dockerfile):
            if word != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{dockerfile.name} copies {source}, which .dockerignore leaves out"
                )
