"""The lab's topology on its own: the plan as data (no root), then the namespaces with kernel routing only.

Without agents the distributor host is a plain router, which checks the wiring the agents rely on:
every host reaches what the address plan says, server2's path has the 1280-byte bottleneck that makes
the pmtu router answer "fragmentation needed", and the virtual address is *not* reachable (only the
agents make it exist).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path

import pytest

from overlay.lab import netns, nsnet, topology
from overlay.lab.lab import Lab

from .conftest import needs_lab

DOCUMENTATION_RANGES = [
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]
CLIENT_ADDRESSES = {
    topology.CLIENT_V4, topology.CLIENT_V6, *topology.CLIENT_SOURCES_V4, *topology.CLIENT_SOURCES_V6
}


def plan_addresses(plan: topology.Plan) -> list[str]:
    found = []
    for ns in plan.namespaces.values():
        for line in ns.commands:
            match = re.match(r"(?:address add|route add) (\S+)", line)
            if match and match.group(1) != "default":
                found.append(match.group(1))
            match = re.search(r" via (\S+)", line)
            if match:
                found.append(match.group(1))
    return found


def test_plan_uses_only_documentation_addresses() -> None:
    addresses = plan_addresses(topology.build_plan("ovl-"))
    assert len(addresses) > 356  # the client's 356 source addresses are in there
    for address in addresses:
        network = ipaddress.ip_network(address, strict=False)
        assert any(network.subnet_of(r) for r in DOCUMENTATION_RANGES if r.version == network.version), address


def test_plan_never_names_the_host_interfaces_and_fits_interface_names() -> None:
    plan = topology.build_plan("a-very-long-prefix-for-a-test-")
    for line in plan.links:
        names = re.findall(r"(?:link add|peer name) (\S+)", line)
        namespaces = re.findall(r"netns (\S+)", line)
        assert len(names) == 2 and len(namespaces) == 2, line  # both ends created inside lab namespaces
        assert all(len(name) <= 15 and name != "eth0" for name in names), line
        assert all(ns.startswith(plan.prefix) for ns in namespaces), line


def test_plan_prefix_names_every_namespace() -> None:
    plan = topology.build_plan("xyz-")
    assert sorted(ns.name for ns in plan.namespaces.values()) == sorted("xyz-" + role for role in topology.ROLES)


def test_only_routers_forward() -> None:
    plan = topology.build_plan()
    forwarding = {role for role, ns in plan.namespaces.items() if "net.ipv4.ip_forward=1" in ns.sysctls}
    assert forwarding == {"dist", "router", "pmtu"}


# -- the namespaces themselves, kernel routing only ------------------------------------------------------


@pytest.fixture(scope="module")
def plain_lab(make_lab) -> Lab:
    lab = make_lab()
    lab.up(agents=False)
    return lab


REACHABILITY = [
    {"description": "client to server1 over IPv4", "url": "http://203.0.113.10/whoami", "server": "server1"},
    {"description": "client to server1 over IPv6", "url": "http://[2001:db8:2::10]/whoami", "server": "server1"},
    {"description": "client to server2 (behind the pmtu router)", "url": "http://203.0.113.11/whoami",
     "server": "server2"},
    {"description": "client to server2 over IPv6 (proxy NDP)", "url": "http://[2001:db8:2::11]/whoami",
     "server": "server2"},
    {"description": "client to the plain inside host", "url": "http://203.0.113.50/whoami", "server": "plain"},
    {"description": "client to the remote host on its own network", "url": "http://198.51.100.20/whoami",
     "server": "remote"},
    {"description": "negative: the VIP does not exist without agents", "url": "http://203.0.113.80/whoami",
     "server": None},
    {"description": "negative: a TM management address does not exist without agents",
     "url": "http://203.0.113.201:8080/status", "server": None},
]


@pytest.mark.lab
@needs_lab
@pytest.mark.parametrize("case", REACHABILITY, ids=[c["description"] for c in REACHABILITY])
def test_reachability_by_kernel_routing(plain_lab: Lab, case: dict) -> None:
    if case["server"] is None:
        with pytest.raises(OSError):
            nsnet.http_request(plain_lab.ns("client"), case["url"], timeout=2.0)
        return
    status, body = nsnet.http_request(plain_lab.ns("client"), case["url"])
    answer = json.loads(body)
    assert (status, answer["server"]) == (200, case["server"])
    assert answer["peer"] in CLIENT_ADDRESSES  # routed, never translated


@pytest.mark.lab
@needs_lab
@pytest.mark.parametrize("server, remote", [("203.0.113.10", "198.51.100.20"), ("[2001:db8:2::11]", "[2001:db8:1::20]")])
def test_server_initiated_connection_routes_to_remote(plain_lab: Lab, server: str, remote: str) -> None:
    status, body = nsnet.http_request(plain_lab.ns("client"), f"http://{server}/outbound?url=http://{remote}/whoami")
    answer = json.loads(body)
    assert status == 200, answer
    # No agent, no NAT: the remote host sees the server's own address.
    assert answer["remote"]["peer"] == server.strip("[]")


def route_mtu(lab: Lab, destination: str) -> int | None:
    output = lab.exec("client", ["ip", "route", "get", destination]).stdout
    match = re.search(r"\bmtu (\d+)", output)
    return int(match.group(1)) if match else None


@pytest.mark.lab
@needs_lab
@pytest.mark.parametrize(
    "description, server, bottleneck",
    [
        ("server2's path: the pmtu router answers and the client learns 1280", "203.0.113.11", 1280),
        ("server2 over IPv6: packet too big", "2001:db8:2::11", 1280),
        ("negative: server1's path has no bottleneck", "203.0.113.10", None),
    ],
)
def test_large_upload_discovers_the_path_mtu(plain_lab: Lab, description: str, server: str, bottleneck: int | None) -> None:
    body = os.urandom(200_000)
    host = f"[{server}]" if ":" in server else server
    status, answer = nsnet.http_request(plain_lab.ns("client"), f"http://{host}/upload", method="POST", body=body)
    assert status == 200 and json.loads(answer)["bytes"] == len(body)
    assert route_mtu(plain_lab, server) == bottleneck


@pytest.mark.lab
@needs_lab
def test_traffic_generator_uses_every_source_address(plain_lab: Lab) -> None:
    report = plain_lab.traffic(
        v4=100, v6=100, count=600, duration=20,
        extra=["--url-v4", "http://203.0.113.10/", "--url-v6", "http://[2001:db8:2::11]/"],
    )
    assert report.failed == 0, report.failures
    assert report.sources_used == 200
    assert report.servers == {"server1": 300, "server2": 300}


@pytest.mark.lab
@needs_lab
def test_up_again_rebuilds_and_a_fresh_driver_can_tear_down(plain_lab: Lab) -> None:
    """`up` twice gives the same lab; `down` from another driver (as after a crash) finds everything."""
    plain_lab.up(agents=False)
    assert len(netns.list_namespaces(plain_lab.prefix)) == len(topology.ROLES)
    status, body = nsnet.http_request(plain_lab.ns("client"), "http://203.0.113.10/whoami")
    assert status == 200 and json.loads(body)["server"] == "server1"
    servers = plain_lab.processes.recorded()
    stranger = Lab(plain_lab.prefix, state_dir=plain_lab.state_dir)  # knows nothing but names and records
    assert stranger.processes.recorded() == servers
    stranger.down()
    assert netns.list_namespaces(plain_lab.prefix) == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in servers.values())
