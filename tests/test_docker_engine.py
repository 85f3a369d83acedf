"""Engine tier of the Docker deployments: a real Docker engine, started here.

A private dockerd (own data root in the cache, own socket) runs for this
module; stand-in base images (scripts/docker/standins.py) carry the tags the
Dockerfiles name. Each profile is brought up with
``docker compose up --build --wait`` plus its committed CI override
(tests/docker/): no GPU reservation, the tiny local model baked into the vLLM
stand-in (vLLM's CPU build replaces the GPU one — the only fake here, because
no GPU exists on these machines).

* urandom: the entropy-server container is SERVING on gRPC health and serves
  exact byte counts on its published port; vLLM answers a completion through
  compose networking and its records prove every token's bytes came from the
  entropy-server container.
* firefly-1: vLLM against a test double of the appliance
  (tests/docker/firefly_double.py: its method path, the ``api-key`` header, the
  13,312-byte cap), in the compose network.
* _template: vLLM against examples/servers/qrng_template_server.py as shipped,
  with an API key, in the compose network.

Every probe goes to 127.0.0.1; every stack is taken down and the daemon stopped
by its PID.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support_docker import ComposeProject, free_port, iter_records, load_standins

from qr_sampler.proto import entropy_pb2, entropy_pb2_grpc

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

UP_TIMEOUT_S = 600
FIREFLY_CAP = 13_312
TEMPLATE_DEVICE = "TEMPLATE-os.urandom-not-a-qrng"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    standins = load_standins()
    for binary in ("dockerd", "mmdebstrap"):
        assert shutil.which(binary), f"{binary} missing: apt-get install docker.io mmdebstrap"
    with contextlib.ExitStack() as stack:
        stack.enter_context(standins.cache_lock())
        run_dir = Path(tempfile.mkdtemp(prefix="qrd-", dir="/tmp"))  # short: socket paths
        stack.callback(shutil.rmtree, run_dir, True)
        engine = standins.start_daemon(run_dir)
        stack.callback(engine.stop)
        stack.callback(engine.docker, "image", "prune", "-f", check=False)  # dangling rebuilds
        standins.ensure_all(engine)
        yield engine


def _bring_up(daemon: Any, profile: str, env: dict[str, str]) -> Iterator[ComposeProject]:
    project = ComposeProject(
        profile=profile,
        name=f"qrs-ci-{profile.strip('_')}-{secrets.token_hex(3)}",
        docker_host=daemon.host,
        env={"VLLM_HOST_PORT": str(free_port()), **env},
    )
    try:
        up = project.run(
            "up", "-d", "--build", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), check=False
        )
        if up.returncode != 0:
            logs = project.run("logs", "--no-color", "--tail", "60", check=False).stdout
            pytest.fail(f"compose up failed for {profile}:\n{up.stderr[-4000:]}\n{logs}")
        yield project
    finally:
        project.run("down", "-v", "--remove-orphans", "-t", "5", check=False)


def _complete(port: int, label: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {
        "model": "/models/tiny",
        "prompt": "the quantum",
        "max_tokens": 6,
        "vllm_xargs": {"qr_label": label, **(extra or {})},
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        result: dict[str, Any] = json.load(reply)
    return result


def _records(project: ComposeProject, label: str) -> list[dict[str, Any]]:
    out = project.run("exec", "-T", "vllm", "cat", "/records/tokens.jsonl").stdout
    return [r for r in iter_records(out) if r.get("label") == label]


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _assert_served_by(records: list[dict[str, Any]], completion: dict[str, Any], device: str):
    tokens = completion["usage"]["completion_tokens"]
    assert tokens >= 1 and completion["choices"][0]["text"]
    assert len(records) == tokens, f"one record per token: {len(records)} != {tokens}"
    for record in records:
        assert record["entropy_source"] == "quantum_grpc", record
        assert record["fallback"] is False, record
        assert record["device_id"] == device, record
        assert record["health"] == "ok", record


class TestUrandomProfile:
    @pytest.fixture(scope="class")
    def stack(self, daemon: Any) -> Iterator[ComposeProject]:
        yield from _bring_up(daemon, "urandom", {"ENTROPY_HOST_PORT": str(free_port())})

    def test_entropy_server_is_serving_and_exact(self, stack: ComposeProject) -> None:
        address = f"127.0.0.1:{stack.port('entropy-server', 50051)}"
        assert _health(address) == "SERVING"
        sizes = [1, 20_480, 65_537]
        with grpc.insecure_channel(address) as channel:
            stub = entropy_pb2_grpc.EntropyServiceStub(channel)
            for i, n in enumerate(sizes, start=1):
                reply = stub.GetEntropy(
                    entropy_pb2.EntropyRequest(bytes_needed=n, sequence_id=i), timeout=10
                )
                assert len(reply.data) == n
                assert reply.sequence_id == i
                assert reply.device_id == "urandom@entropy-server"
            requests = [entropy_pb2.EntropyRequest(bytes_needed=n) for n in sizes]
            streamed = list(stub.StreamEntropy(iter(requests), timeout=10))
        assert [len(r.data) for r in streamed] == sizes
        assert len({r.data for r in streamed}) == len(sizes)

    def test_vllm_completion_draws_from_the_entropy_server_container(
        self, stack: ComposeProject
    ) -> None:
        port = stack.port("vllm", 8000)
        label = f"ci-urandom-{secrets.token_hex(4)}"
        completion = _complete(port, label, {"qr_sample_count": 4096})
        records = _records(stack, label)
        _assert_served_by(records, completion, "urandom@entropy-server")
        assert {r["byte_count"] for r in records} == {4096}
        # bytes are stamped by the server after the step had its logits
        assert all(r["server_timestamp_ns"] >= r["step_started_ns"] for r in records)

    def test_bad_request_setting_is_refused_by_name(self, stack: ComposeProject) -> None:
        port = stack.port("vllm", 8000)
        with pytest.raises(urllib.error.HTTPError) as err:
            _complete(port, "ci-bad", {"qr_top_k": -1})
        assert err.value.code == 400
        assert "qr_top_k" in err.value.read().decode()


class TestFireflyProfile:
    KEY = f"ci-firefly-{secrets.token_hex(8)}"

    @pytest.fixture(scope="class")
    def stack(self, daemon: Any) -> Iterator[ComposeProject]:
        yield from _bring_up(daemon, "firefly-1", {"QR_GRPC_API_KEY": self.KEY})

    def test_completion_draws_from_the_appliance_double(self, stack: ComposeProject) -> None:
        port = stack.port("vllm", 8000)
        label = f"ci-firefly-{secrets.token_hex(4)}"
        completion = _complete(port, label)  # default QR_SAMPLE_COUNT=20480: split at the cap
        records = _records(stack, label)
        # the firefly protocol carries no device id: the client names the address
        devices = {r["device_id"] for r in records}
        assert len(devices) == 1 and "firefly-double" in devices.pop()
        for record in records:
            assert record["entropy_source"] == "quantum_grpc" and record["fallback"] is False
            assert record["byte_count"] == 20_480
        calls = re.findall(r"call count=(-?\d+) key_ok=(\w+)", stack.logs("firefly-double"))
        counts = [int(count) for count, _ in calls]
        assert calls and all(ok == "True" for _, ok in calls), calls[:5]
        tokens = completion["usage"]["completion_tokens"]
        assert all(1 <= c <= FIREFLY_CAP for c in counts), "requests respect the cap"
        assert len(counts) >= 2 * tokens, "20,480 bytes per token need two requests at the cap"
        assert sum(counts) >= 20_480 * tokens

    def test_api_key_never_appears_in_logs_or_records(self, stack: ComposeProject) -> None:
        logs = stack.run("logs", "--no-color", "vllm", check=False).stdout
        records = stack.run("exec", "-T", "vllm", "cat", "/records/tokens.jsonl").stdout
        assert records.strip()
        assert self.KEY not in logs
        assert self.KEY not in records


class TestTemplateProfile:
    KEY = f"ci-template-{secrets.token_hex(8)}"

    @pytest.fixture(scope="class")
    def stack(self, daemon: Any) -> Iterator[ComposeProject]:
        yield from _bring_up(daemon, "_template", {"QR_GRPC_API_KEY": self.KEY})

    def test_completion_draws_from_the_template_server(self, stack: ComposeProject) -> None:
        port = stack.port("vllm", 8000)
        label = f"ci-template-{secrets.token_hex(4)}"
        completion = _complete(port, label, {"qr_sample_count": 2048})
        records = _records(stack, label)
        _assert_served_by(records, completion, TEMPLATE_DEVICE)
        assert {r["byte_count"] for r in records} == {2048}
