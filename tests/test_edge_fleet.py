"""A server in another cloud behind an edge, in memory: the real distributor core, three TM node cores and
the edge node core exchanging real (sealed, or plain) GRE-in-UDP datagrams.

Proves: TMs DNAT clients to the server behind the edge exactly as to local servers and its replies come
back through the same TM; the server's own outbound connections are source-NATed and answered; packets
the edge may not send (another source) or receive (another destination) are refused; with auth on, the
edge is known by its key from any address (NAT), and a forged edge datagram gets nothing through.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dpkt
import pytest

from overlay import auth, gre
from overlay.config import load_node_config
from overlay.edge import EdgeNode
from overlay.runtime.agent import authenticator
from overlay.uplink import NOTHING, SEND, TUN
from tests.authconfig import EDGE_SERVER_V4, EDGE_SERVER_V6, with_auth, with_edge
from tests.test_fleet_in_memory import Fleet, addresses, tcp
from tests.tm import packets as P

EDGE_UNDERLAY = ("198.51.100.222", 4754)   # the edge's public side, in another cloud
VIP, VIP6 = "203.0.113.80", "2001:db8:80::80"


class EdgeFleet(Fleet):
    def __init__(self, config: Path, nat: tuple[str, int] = EDGE_UNDERLAY) -> None:
        super().__init__(config=config)
        node = load_node_config(config / "edge1.toml")
        assert node.edge is not None
        distributors = {name: (str(a), p) for name, (a, p) in zip(node.distributor_names, node.distributors)}
        self.edge = EdgeNode(node.edge.prefixes, distributors, node.underlay.gre_key, authenticator(node))
        self.edge_from = nat      # where the edge's datagrams reach the distributor from (its NAT)
        self.server_got: list[bytes] = []

    def deliver(self, verdict) -> tuple[list[str], bytes | None]:  # type: ignore[no-untyped-def]
        """Follow a verdict through TMs until it leaves: into the TUN, or to the edge (its server)."""
        visited: list[str] = []
        while verdict.action == "tm":
            visited.append(verdict.tm)
            action, datagram, _ = self.nodes[verdict.tm].from_overlay(verdict.packet, self.dist_underlay, self.now)
            if action != SEND:
                return visited, None
            verdict = self.distributor.from_overlay(datagram, self.underlay[verdict.tm])
        if verdict.action == "forward" and verdict.dest is not None:   # to the edge
            action, packet, _ = self.edge.from_overlay(verdict.packet, self.dist_underlay, self.now)
            assert action == TUN, (action, self.edge.drops)
            self.server_got.append(packet)  # type: ignore[arg-type]
            return visited, packet  # type: ignore[return-value]
        return visited, verdict.packet if verdict.action == "forward" else None

    def from_client(self, packet: bytes) -> tuple[list[str], bytes | None]:
        self.now += 0.01
        return self.deliver(self.distributor.from_tun(packet))

    def from_server(self, packet: bytes) -> tuple[list[str], bytes | None]:
        """The server behind the edge sends `packet` (its host routes it into the edge's TUN)."""
        self.now += 0.01
        action, datagram, _ = self.edge.from_tun(packet)
        assert action == SEND, self.edge.drops
        return self.deliver(self.distributor.from_overlay(datagram, self.edge_from))  # type: ignore[arg-type]


@pytest.fixture(params=["plain", "sealed"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> EdgeFleet:
    with_edge(tmp_path, f"{EDGE_UNDERLAY[0]}:{EDGE_UNDERLAY[1]}")
    if request.param == "sealed":
        with_auth(tmp_path, source=tmp_path)   # keys on top of the edge fleet's configs
        return EdgeFleet(tmp_path, nat=("198.51.100.223", 40001))   # behind NAT: any address will do
    return EdgeFleet(tmp_path)


def test_clients_reach_the_server_behind_the_edge_through_one_tm_both_ways(fleet: EdgeFleet) -> None:
    served = 0
    for host in range(100, 160):
        for client, vip in ((f"198.51.100.{host}:41000", VIP), (f"[2001:db8:1::{host:x}]:41000", VIP6)):
            tms, out = fleet.from_client(tcp(client, f"{vip}:80" if ":" not in vip else f"[{vip}]:80", "S"))
            assert out is not None and len(tms) == 1
            server = addresses_any(out)
            if server[2] not in (EDGE_SERVER_V4, EDGE_SERVER_V6):
                continue   # balanced to a local server
            served += 1
            back_tms, back = fleet.from_server(P.tcp(server[2], 80, *split(client), P.SYN | P.ACK))
            assert back_tms == tms, "the reply through the edge meets the same TM"
            assert back is not None and addresses_any(back)[:2] == (vip, 80)
    assert served >= 20 and fleet.invalid() == 0


def test_the_servers_own_connections_are_source_nated_and_answered(fleet: EdgeFleet) -> None:
    tms, out = fleet.from_server(P.tcp(EDGE_SERVER_V4, 5000, "198.51.100.20", 443, P.SYN))
    assert out is not None and len(tms) == 1
    public = addresses(out)[:2]
    assert public[0].startswith("203.0.113.10"), "left with the TM's xlate address"
    back_tms, back = fleet.from_client(P.tcp("198.51.100.20", 443, public[0], public[1], P.SYN | P.ACK))
    assert back_tms == tms and back is not None and addresses(back)[2:] == (EDGE_SERVER_V4, 5000)


def test_the_edge_sends_only_from_and_takes_only_to_what_it_serves(fleet: EdgeFleet) -> None:
    assert fleet.edge.from_tun(P.tcp("203.0.113.13", 80, "198.51.100.20", 443))[0] == NOTHING
    assert fleet.edge.drops["source-not-served"] == 1
    # A datagram the distributor would never send it (not for its prefixes), sealed to it when auth is on.
    stray = gre.encapsulate(P.tcp("198.51.100.20", 443, "203.0.113.13", 80))
    if fleet.distributor.auth is not None:
        stray = fleet.distributor.auth.seal(stray, "edge1")
    assert fleet.edge.from_overlay(stray, fleet.dist_underlay, 1.0)[0] == NOTHING
    assert fleet.edge.drops["destination-not-served"] == 1


def test_a_forged_edge_datagram_gets_nothing_through_when_sealed(fleet: EdgeFleet) -> None:
    forged = gre.encapsulate(P.tcp(EDGE_SERVER_V4, 80, "198.51.100.100", 41000, P.SYN | P.ACK))
    verdict = fleet.distributor.from_overlay(forged, EDGE_UNDERLAY)
    if fleet.distributor.auth is None:
        assert verdict.action == "tm", "negative control: without auth the edge's address is all it takes"
    else:
        assert (verdict.action, verdict.reason) == ("drop", auth.UNAUTHENTICATED)


def test_an_edge_behind_nat_is_reached_where_it_announces_from(fleet: EdgeFleet) -> None:
    if fleet.distributor.auth is None:
        pytest.skip("endpoints are learned from sealed datagrams only")
    (announce, _), = fleet.edge.announcements()
    assert fleet.distributor.from_overlay(announce, ("198.51.100.223", 40777)).reason == "announce"
    edges = fleet.distributor.snapshot()["edges"]
    assert edges["edge1"]["announced"] == sorted(edges["edge1"]["prefixes"]), "what it serves, as configured"
    assert edges["edge1"]["endpoint"] == "198.51.100.223:40777"
    # A TM's output for the server behind the edge goes to where the edge was last heard from.
    tm = fleet.nodes["tm1"]
    from_tm = tm.datagram(P.tcp("198.51.100.100", 41000, EDGE_SERVER_V4, 80, P.SYN), tm.last)
    verdict = fleet.distributor.from_overlay(from_tm, fleet.underlay["tm1"])
    assert (verdict.action, verdict.dest) == ("forward", ("198.51.100.223", 40777))


def addresses_any(packet: bytes) -> tuple[str, int, str, int]:
    ip = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    return str(ipaddress.ip_address(ip.src)), ip.data.sport, str(ipaddress.ip_address(ip.dst)), ip.data.dport


def split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def test_an_edge_announcing_other_prefixes_is_flagged_not_believed(tmp_path: Path) -> None:
    with_edge(tmp_path, f"{EDGE_UNDERLAY[0]}:{EDGE_UNDERLAY[1]}")
    with_auth(tmp_path, source=tmp_path)
    fleet = EdgeFleet(tmp_path)
    fleet.edge.set_prefixes((ipaddress.ip_network("203.0.113.12/32"), ipaddress.ip_network("203.0.113.80/32")))
    (announce, _), = fleet.edge.announcements()
    fleet.distributor.from_overlay(announce, EDGE_UNDERLAY)
    assert fleet.distributor.counters()["reason.announce-prefixes-differ"] == 1
    assert fleet.distributor.from_tun(tcp("198.51.100.100:41000", f"{VIP}:80", "S")).action == "tm", \
        "the VIP it claims still goes to the TMs: the config decides"
