"""Issue 9's multi-cloud lab: the reference lab spread over three "clouds", two of them behind NAT, with
authentication on everywhere and real agents.

- Cloud A: the distributor (the only node reachable from outside), and the clients' network.
- Cloud B: the three TMs, behind the lab router turned NAT gateway: what they send to the distributor is
  masqueraded to the router's address, and nothing from cloud A may open a connection into cloud B — the
  distributor reaches each TM only at the endpoint its sealed announces and answers come from.
- Cloud C: a server behind an edge agent, behind a NAT router of its own (`masquerade random`): the TMs
  balance clients to it like to the local servers, and its own outbound connections are source-NATed.

Proven: ≥ 2,000 real TCP connections from 200 client addresses (v4 and v6 inner) with 0 failed and 0
invalid on the TMs, part of them answered by the server behind the edge; outbound HTTP from that server
(v4 and v6) leaves with a TM's xlate address; cloud C's NAT is made to rebind (its conntrack flushed,
`random` gives new public ports) while traffic runs, the distributor follows the edge to its new endpoint,
and no connection fails; nothing is refused as replayed or too old, and no keepalive probe of a TM behind
NAT is lost while traffic runs. All of it once more with two packet loops in the distributor and in the
edge (`[node] workers = 2`: lanes, one set of shared replay windows per node, learned endpoints and the
edge's distributor shared through the agents), where every loop must carry traffic.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.lab import nsnet, topology
from overlay.lab.lab import Lab, unavailable_reason
from overlay.lab.traffic import TrafficReport
from tests.authconfig import EDGE_SERVER_V4, EDGE_SERVER_V6, with_auth, with_edge

from .conftest import lab_prefix, lab_running

pytestmark = pytest.mark.lab

LAB_UNAVAILABLE = unavailable_reason()
STATUS = f"http://127.0.0.1:{topology.STATUS_PORT}"
ROUTER_C, NAT_C_WAN = "192.0.2.129", "192.0.2.130"      # cloud C's NAT, seen from the underlay
NAT_C_LAN, EDGE_HOST = "192.0.2.193", "192.0.2.200"     # cloud C inside
XLATE = set(topology.XLATE_V4.values()) | set(topology.XLATE_V6.values())
EDGE_ROLES = ("natc", "edge1")


def run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"


CLOUD_B_NAT = """
table ip cloudb {
    chain postrouting { type nat hook postrouting priority srcnat; ip saddr 192.0.2.64/26 oifname "ula" masquerade random; }
    chain forward { type filter hook forward priority filter; iifname "ula" oifname "ulb" ct state new drop; }
}
"""
CLOUD_C_NAT = """
table ip cloudc {
    chain postrouting { type nat hook postrouting priority srcnat; ip saddr 192.0.2.192/27 oifname "wan" masquerade random; }
    chain forward { type filter hook forward priority filter; iifname "wan" oifname "lan" ct state new drop; }
}
"""


def nat_cloud_b(lab: Lab) -> None:
    """The lab router becomes cloud B's NAT gateway: the TMs' traffic to cloud A is masqueraded, and
    nothing from cloud A opens a connection into cloud B."""
    run("ip", "netns", "exec", lab.ns("router"), "nft", "-f", "-", stdin=CLOUD_B_NAT)


def cloud_c(lab: Lab) -> None:
    """Two more namespaces, named with the lab's prefix (so `Lab.down` removes them): cloud C's NAT router
    on the underlay, and the edge host behind it."""
    natc, edge = lab.prefix + "natc", lab.prefix + "edge1"
    for name in (natc, edge):
        run("ip", "netns", "add", name)
        for sysctl in ("net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                       "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"):
            run("ip", "netns", "exec", name, "sysctl", "-qw", sysctl)
        run("ip", "-n", name, "link", "set", "lo", "up")
    run("ip", "netns", "exec", natc, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    run("ip", "link", "add", "ulc", "netns", lab.ns("router"), "type", "veth", "peer", "name", "wan", "netns", natc)
    run("ip", "link", "add", "lan", "netns", natc, "type", "veth", "peer", "name", "lan", "netns", edge)
    run("ip", "-n", lab.ns("router"), "address", "add", f"{ROUTER_C}/26", "dev", "ulc")
    run("ip", "-n", lab.ns("router"), "link", "set", "ulc", "up")
    run("ip", "-n", natc, "address", "add", f"{NAT_C_WAN}/26", "dev", "wan")
    run("ip", "-n", natc, "address", "add", f"{NAT_C_LAN}/27", "dev", "lan")
    run("ip", "-n", natc, "link", "set", "wan", "up")
    run("ip", "-n", natc, "link", "set", "lan", "up")
    run("ip", "-n", natc, "route", "add", "default", "via", ROUTER_C)
    run("ip", "-n", edge, "address", "add", f"{EDGE_HOST}/27", "dev", "lan")
    run("ip", "-n", edge, "link", "set", "lan", "up")
    run("ip", "-n", edge, "route", "add", "default", "via", NAT_C_LAN)
    # Cloud A's distributor reaches cloud C's public side through the router.
    run("ip", "-n", lab.ns("dist"), "route", "add", "192.0.2.128/26", "via", topology.ROUTER_UNDERLAY_A)
    run("ip", "netns", "exec", natc, "nft", "-f", "-", stdin=CLOUD_C_NAT)


class CloudsLab:
    def __init__(self, lab: Lab, config_dir: Path, workers: int = 1):
        self.lab = lab
        self.config_dir = config_dir
        self.workers = workers

    def status(self, role: str) -> dict:
        if role in EDGE_ROLES:
            return nsnet.http_json(self.lab.prefix + role, f"{STATUS}/status")
        return self.lab.status(role)

    def invalid(self) -> dict[str, int]:
        return {f"{tm}:{name}": count for tm in topology.TMS
                for name, count in self.status(tm)["counters"].items() if name.startswith("invalid.") and count}


def start_edge(lab: Lab, config_dir: Path) -> None:
    namespace = lab.prefix + "edge1"
    lab.processes.start("edge-server", namespace, [sys.executable, "-m", "overlay.lab.httpserver", "--name", "edge1"])
    lab.processes.start("edge1", namespace, [sys.executable, "-m", "overlay", "edge", "--config",
                                             str(config_dir / "edge1.toml")], cwd=config_dir.parent)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # bounded: the agent's start-up and first announce
        code = lab.processes.exited("edge1")
        assert code is None, f"edge1 exited with {code}:\n{lab.processes.log_tail('edge1')}"
        try:
            status = nsnet.http_json(lab.ns("dist"), f"{STATUS}/status")
            if set(status.get("endpoints", {})) >= {"edge1", *topology.TMS}:   # every NAT'd peer announced
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the distributor did not hear from every peer behind NAT:\n{lab.processes.log_tail('edge1')}")


@pytest.fixture(scope="module", params=[1, 2], ids=["one-loop", "workers-2"])
def clouds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudsLab]:
    """`workers-2`: the distributor and the edge with two packet loops each, each loop sealing in its own
    lane, a node's loops opening against one set of replay windows and sharing what they learn."""
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    workers = request.param
    root = tmp_path_factory.mktemp(f"clouds-lab-{workers}")
    config_dir = root / "config"
    with_edge(config_dir, f"{NAT_C_WAN}:4754", edge_address=EDGE_HOST)
    with_auth(config_dir, source=config_dir)
    if workers > 1:
        for node in ("distributor", "edge1"):
            path = config_dir / f"{node}.toml"
            path.write_text(path.read_text().replace("[node]\n", f"[node]\nworkers = {workers}\n", 1))
    for tm in topology.TMS:   # behind NAT: announce often, so the distributor finds them at once
        path = config_dir / f"{tm}.toml"
        text = path.read_text()
        path.write_text(text.replace("[underlay]\n", "[underlay]\nannounce_interval = 1\n", 1))
    lab = Lab(lab_prefix(f"cl{workers}"), config_dir=config_dir, state_dir=root / "state")
    with lab_running(lab, before_agents=lambda lab: (nat_cloud_b(lab), cloud_c(lab))):
        try:
            start_edge(lab, config_dir)
        except BaseException:
            print(lab.processes.log_tail("edge1"))
            raise
        yield CloudsLab(lab, config_dir, workers)


def test_tms_behind_nat_are_reached_at_their_public_endpoints(clouds: CloudsLab) -> None:
    status = clouds.status("dist")
    assert status["auth"] == "authenticate"
    endpoints = status["endpoints"]
    for tm in topology.TMS:
        host, port = endpoints[tm].rsplit(":", 1)
        assert host == topology.ROUTER_UNDERLAY_A, f"{tm} is seen from cloud B's NAT, not {endpoints[tm]}"
        assert status["tms"][tm]["up"]
    assert endpoints["edge1"].rsplit(":", 1)[0] == NAT_C_WAN


def probes(clouds: CloudsLab) -> dict[str, tuple[int, int]]:
    """(timeouts, replies) of each TM's keepalives, as the distributor's health checker counts them."""
    health = clouds.status("dist")["health"]["tms"]
    return {tm: (health[tm]["timeouts"], health[tm]["replies"]) for tm in topology.TMS}


def settled_probes(clouds: CloudsLab, replies: int = 3, timeout: float = 15.0) -> dict[str, tuple[int, int]]:
    """`probes` once every TM has answered `replies` probes in a row (bounded): the first probes to a TM
    behind NAT time out until its announce told the distributor where it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = clouds.status("dist")["health"]["tms"]
        if all(health[tm]["consecutive_successes"] >= replies for tm in topology.TMS):
            break
        time.sleep(0.2)
    return probes(clouds)


def test_thousands_of_connections_through_three_clouds(clouds: CloudsLab) -> None:
    before = settled_probes(clouds)
    report = clouds.lab.traffic(count=2400, v4=100, v6=100, duration=60, concurrency=16)
    assert report.failed == 0, report.failures
    assert report.requests >= 2000
    assert report.servers.get("edge1", 0) > 0, f"nothing answered by the server behind the edge: {report.servers}"
    assert clouds.invalid() == {}
    refused = {f"{role}:{reason}": count for role in ("dist", "edge1") for reason, count in
               clouds.status(role)["drops"].items() if reason.startswith(("auth:", "agent:auth:")) and count}
    assert refused == {}, refused
    # The TMs are behind NAT: probed from the well-known port, and their echoes answered — with workers,
    # echoes that land at a worker go to the agent's health checker: no probe lost while the traffic ran.
    time.sleep(1.0)
    after = probes(clouds)
    assert all(after[tm][0] == before[tm][0] and after[tm][1] > before[tm][1] for tm in topology.TMS), (before, after)
    if clouds.workers > 1:
        time.sleep(1.2)    # the workers' last counters reach their agents
        for role in ("dist", "edge1"):
            workers = clouds.status(role)["workers"]
            assert workers["running"] == clouds.workers, (role, workers)
            assert all(count > 0 for count in workers["packets"].values()), (role, workers["packets"])
            assert workers["replay_windows"]["shared"] and workers["replay_windows"]["in_use"] >= 1, (role, workers)
    print(f"\nclouds (workers {clouds.workers}): {report.summary()}")


def outbound(source: str, remote: str) -> dict:
    connection = http.client.HTTPConnection(remote, 80, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", "/whoami")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def test_the_server_behind_the_edge_connects_out_through_snat(clouds: CloudsLab) -> None:
    namespace = clouds.lab.prefix + "edge1"
    for source, remote in ((EDGE_SERVER_V4, topology.REMOTE_V4), (EDGE_SERVER_V6, topology.REMOTE_V6)):
        for _ in range(10):
            seen = nsnet.in_namespace(namespace, outbound, source, remote)
            assert seen["server"] == "remote" and seen["peer"] in XLATE, seen
    assert clouds.invalid() == {}


def test_a_nat_rebinding_of_the_edge_loses_no_connection(clouds: CloudsLab) -> None:
    before = clouds.status("dist")["endpoints"]["edge1"]
    outcome: dict[str, TrafficReport] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault(
        "report", clouds.lab.traffic(count=8000, v4=100, v6=100, duration=40, concurrency=8)))
    runner.start()
    try:
        time.sleep(1.5)
        # Forget every UDP binding of cloud C's NAT: the edge's next datagrams get new, random ports.
        subprocess.run(["ip", "netns", "exec", clouds.lab.prefix + "natc", "conntrack", "-D", "-p", "udp"],
                       capture_output=True, timeout=10)
        deadline = time.monotonic() + 10
        after = before
        while after == before and time.monotonic() < deadline:   # bounded: the edge's next datagram
            time.sleep(0.1)
            after = clouds.status("dist")["endpoints"]["edge1"]
        mid_run = runner.is_alive()
    finally:
        runner.join(timeout=120)
    report = outcome["report"]
    assert mid_run, "the traffic must still run when the distributor follows the edge: make it longer"
    assert after != before and after.rsplit(":", 1)[0] == NAT_C_WAN, (before, after)
    assert report.failed == 0, report.failures
    assert report.servers.get("edge1", 0) > 0
    assert clouds.invalid() == {}
    print(f"\nrebinding: edge1 {before} -> {after}; {report.summary()}")
