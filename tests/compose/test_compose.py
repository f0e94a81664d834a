"""The compose lab for real: build, bring it up, run the client's traffic, read every agent's status.

One lab per module (`lab` fixture): `docker compose up --build -d` starts everything in dependency order
(the client only once the distributor sees every TM up), the client runs its traffic and exits, and the
checks read what happened: the client's own report, each agent's `/status` from inside its container, and
a few probes from a second client container. `docker compose down -v` runs whatever happens.

Needs a Docker engine with compose v2 and the base image (CI: `.ci/docker.sh up`); skipped with the reason
otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlay.lab import topology

pytestmark = pytest.mark.compose

REPO = Path(__file__).resolve().parents[2]
COMPOSE = [
    "docker", "compose", "--project-directory", str(REPO), "-f", str(REPO / "compose.yaml"), "--progress", "plain",
]
BUILD_AND_START_TIMEOUT = 600.0  # a first build installs the Python dependencies from PyPI
CLIENT_TIMEOUT = 240.0
AGENTS = ("distributor", *topology.TMS)
CLIENT_COUNT = 3000  # compose.yaml's client command: --count 3000 --long 5
CLIENT_LONG_LIVED = 10
XLATE_ADDRESSES = {*topology.XLATE_V4.values(), *topology.XLATE_V6.values()}


def _unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"no Docker engine reachable ({info.stderr.strip().splitlines()[-1:]}); CI starts one: .ci/docker.sh up"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "docker compose v2 is not installed (.ci/docker.sh install)"
    return None


UNAVAILABLE = _unavailable()
if UNAVAILABLE:
    pytest.skip(UNAVAILABLE, allow_module_level=True)


def compose(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*COMPOSE, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def status_of(service: str) -> dict:
    """The agent's /status, fetched inside its container (the distributor's listens on 127.0.0.1 only)."""
    done = compose("exec", "-T", service, "curl", "-fsS", "http://127.0.0.1:8080/status", timeout=30)
    return json.loads(done.stdout)


@dataclass
class LabRun:
    client_exit: int
    client_report: dict
    client_log: str
    status: dict[str, dict]  # agent service -> /status right after the client finished


def _wait_for_exit(service: str, timeout: float) -> int:
    container = compose("ps", "-a", "-q", service).stdout.strip()
    assert container, f"no {service} container was created"
    waited = subprocess.run(["docker", "wait", container], capture_output=True, text=True, timeout=timeout)
    return int(waited.stdout.strip())


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


@pytest.fixture(scope="module")
def lab() -> Iterator[LabRun]:
    compose("down", "-v", "--remove-orphans", timeout=120)  # what an interrupted earlier run left
    started = time.monotonic()
    try:
        up = compose("up", "--build", "--detach", timeout=BUILD_AND_START_TIMEOUT, check=False)
        if up.returncode != 0:
            logs = compose("logs", "--no-color", "--tail", "30", timeout=60, check=False).stdout
            pytest.fail(f"docker compose up failed:\n{up.stderr[-3000:]}\n--- logs ---\n{logs[-6000:]}")
        exit_code = _wait_for_exit("client", CLIENT_TIMEOUT)
        client_log = compose("logs", "--no-color", "--no-log-prefix", "client").stdout
        run = LabRun(exit_code, _last_json_line(client_log), client_log, {s: status_of(s) for s in AGENTS})
        print(f"compose lab: up and traffic done in {time.monotonic() - started:.0f}s")
        yield run
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
        print(f"compose lab: whole cycle {time.monotonic() - started:.0f}s")


@pytest.fixture(scope="module")
def probe(lab: LabRun) -> Iterator[str]:
    """A second client container (the client's addresses and routes) to send single requests from."""
    name = f"overlay-lab-probe-{uuid.uuid4().hex[:8]}"
    compose("run", "--detach", "--no-deps", "--name", name, "client", "sleep", "300", timeout=60)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def probe_get(probe: str, url: str, *, source: str | None = None, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    command = ["docker", "exec", probe, "curl", "-sS", "-m", str(timeout), "-w", "\n%{http_code}"]
    if source:
        command += ["--interface", source]
    return subprocess.run([*command, url], capture_output=True, text=True, timeout=timeout + 30)


def counters(status: dict) -> dict[str, int]:
    return {key: value for key, value in status.get("counters", {}).items() if isinstance(value, int)}


def url(address: str, path: str = "/", port: int = 80) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


# -- the client's traffic -----------------------------------------------------------------------------------


def test_client_traffic_all_succeeded(lab: LabRun) -> None:
    report = lab.client_report
    assert lab.client_exit == 0, f"client exited {lab.client_exit}:\n{lab.client_log[-3000:]}"
    short = report["short"]
    assert (short["requests"], short["failed"], short["failures"]) == (CLIENT_COUNT, 0, {}), short
    assert short["sources_used"] >= 100, "traffic must come from many client addresses"
    assert set(short["servers"]) == {"server1", "server2"}, "both servers answer through the TMs' DNAT"
    assert report["long"] == {"connections": CLIENT_LONG_LIVED, "failures": {}}


# -- every agent's status -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tm", topology.TMS)
def test_tm_carried_traffic_without_invalid_drops(lab: LabRun, tm: str) -> None:
    found = counters(lab.status[tm])
    assert found.get("translated.dnat", 0) > 0, f"{tm} translated no client connection: {found}"
    assert found.get("translated.reverse_dnat", 0) > 0, f"{tm} saw no server reply: {found}"
    bad = {key: n for key, n in found.items() if key.startswith(("invalid.", "malformed.")) and n}
    assert bad == {}, f"{tm}: packets without state or malformed — the distributor broke symmetry"


def test_distributor_sent_to_every_tm_and_sees_them_up(lab: LabRun) -> None:
    status = lab.status["distributor"]
    found = counters(status)
    assert {tm: found.get(f"tm.{tm}", 0) > 0 for tm in topology.TMS} == {tm: True for tm in topology.TMS}, found
    assert found.get("cell.unknown>virtual", 0) > 0, "client packets to the virtual address were decided"
    assert found.get("cell.nat-able+node>unknown", 0) > 0, "server replies were captured and decided"
    # The agent's health view: every TM of the config is up (the compose health check waited for it).
    ready = compose("exec", "-T", "distributor", "curl", "-fsS", "http://127.0.0.1:8080/healthz").stdout
    assert set(json.loads(ready)["up"]) == set(topology.TMS)


# -- more paths, from a probe client ------------------------------------------------------------------------


@pytest.mark.parametrize("vip", [topology.VIP_V4, topology.VIP_V6])
def test_server_initiated_connection_leaves_through_a_tms_source_nat(probe: str, vip: str) -> None:
    remote = topology.REMOTE_V6 if ":" in vip else topology.REMOTE_V4
    done = probe_get(probe, url(vip, f"/outbound?url={url(remote, '/whoami')}"), timeout=15)
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200", f"{done.stdout}{done.stderr}"
    answer = json.loads(body)
    assert answer["remote"]["server"] == "remote"
    assert answer["remote"]["peer"] in XLATE_ADDRESSES, "the remote host must see a TM's xlate address"


@pytest.mark.parametrize("tm", topology.TMS)
def test_management_address_reaches_that_tm(probe: str, tm: str) -> None:
    done = probe_get(probe, url(topology.MANAGEMENT_V4[tm], "/status", topology.STATUS_PORT))
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200", f"{done.stdout}{done.stderr}"
    assert json.loads(body)["name"] == tm


# -- negative checks: what the config says must not be balanced, and what must not start -----------------

UNSERVED = [
    {
        "description": "IPv4: the plain inside host is no service: routed by the distributor, not translated",
        "target": url(topology.PLAIN_V4, "/whoami"),
        "expected": "routed",
    },
    {
        "description": "IPv6: the plain inside host is no service: routed, not translated",
        "target": url(topology.PLAIN_V6, "/whoami"),
        "expected": "routed",
    },
    {
        "description": "IPv4: the virtual address on a port no TM serves: dropped by the TM as no-service",
        "target": url(topology.VIP_V4, "/", 8081),
        "expected": "dropped",
    },
    {
        "description": "IPv6: the virtual address on a port no TM serves: dropped as no-service",
        "target": url(topology.VIP_V6, "/", 8081),
        "expected": "dropped",
    },
]


def _tm_no_service_drops() -> int:
    return sum(counters(status_of(tm)).get("dropped.no_service", 0) for tm in topology.TMS)


@pytest.mark.parametrize("case", UNSERVED, ids=[case["description"] for case in UNSERVED])
def test_address_no_tm_serves(probe: str, case: dict) -> None:
    cells_before = counters(status_of("distributor"))
    drops_before = _tm_no_service_drops()
    done = probe_get(probe, case["target"], timeout=3.0)
    if case["expected"] == "routed":
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", f"{done.stdout}{done.stderr}"
        answer = json.loads(body)
        assert answer["server"] == "plain"
        # Not translated: the plain host sees the client's own address.
        client = ipaddress.ip_address(answer["peer"])
        assert client in ipaddress.ip_network(topology.OUTSIDE_V6 if client.version == 6 else topology.OUTSIDE_V4)
        cells_after = counters(status_of("distributor"))
        assert cells_after.get("cell.unknown>unknown", 0) > cells_before.get("cell.unknown>unknown", 0)
    else:
        assert done.returncode == 28, f"expected a timeout (curl 28), got {done.returncode}: {done.stderr}"
        assert _tm_no_service_drops() > drops_before, "the TM must count the SYN as dropped.no_service"


NO_NET_ADMIN = [
    {
        "description": "TM agent without NET_ADMIN",
        "argv": ["--device", "/dev/net/tun", "--entrypoint", "overlay", "IMAGE", "tm", "--config", "/config/tm1.toml"],
        "expected": "needs CAP_NET_ADMIN",
    },
    {
        "description": "distributor agent without NET_ADMIN",
        "argv": [
            "--device", "/dev/net/tun", "--entrypoint", "overlay", "IMAGE",
            "distributor", "--config", "/config/distributor.toml",
        ],
        "expected": "needs CAP_NET_ADMIN",
    },
    {
        "description": "a lab host's route setup without NET_ADMIN",
        "argv": ["-e", "NODE_ROUTES=default via 203.0.113.1", "IMAGE", "true"],
        "expected": "needs `cap_add: [NET_ADMIN]`",
    },
]


@pytest.mark.parametrize("case", NO_NET_ADMIN, ids=[case["description"] for case in NO_NET_ADMIN])
def test_container_without_net_admin_fails_clearly(lab: LabRun, case: dict) -> None:
    images = compose("config", "--images").stdout.split()
    assert len(set(images)) == 1, f"every lab service runs one image: {images}"
    argv = [images[0] if arg == "IMAGE" else arg for arg in case["argv"]]
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{REPO / 'config'}:/config:ro", *argv],
        capture_output=True, text=True, timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert case["expected"] in output
    assert "Traceback" not in output
