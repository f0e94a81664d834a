"""The whole data path in memory: the real distributor core and three real TM cores wired together through
real GRE-in-UDP frames, as the agents do it (aioquic's `client_and_server()` style, no sockets).

Proves end to end what the unit tests prove per core: both directions of a NATed conversation meet at one
TM, and a drain lets an established connection finish on the draining TM (second chance) while new
connections go elsewhere. Negative control: disabling instead of draining breaks the same connection and
the TM counts it as invalid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dpkt
import pytest

from overlay import gre
from overlay.config import load_node_config, parse_node_config
from overlay.distributor.core import Distributor
from overlay.runtime.agent import authenticator
from overlay.flowspec import build_packet
from overlay.tm.core import SECOND_CHANCE, UNMARKED, TrafficManager
from overlay.tm.node import SEND, TMNode
from tests.tm import packets as P

CONFIG = Path(__file__).resolve().parents[1] / "config"
VIP = "203.0.113.80"


class Fleet:
    """The distributor core and one `TMNode` per TM, exchanging real GRE-in-UDP datagrams. `edit` rewrites
    each TM config's text before it is loaded (extra services); `core` is the TM core class."""

    def __init__(self, edit: Callable[[str], str] = lambda text: text, core: type[TrafficManager] = TrafficManager,
                 config: Path = CONFIG) -> None:
        node = load_node_config(config / "distributor.toml")
        assert node.distributor is not None
        self.distributor = Distributor(node.distributor, authenticator(node))
        self.underlay = {tm.name: (str(tm.underlay[0]), tm.underlay[1]) for tm in node.distributor.tms}
        self.dist_underlay = (str(node.underlay.address), node.underlay.port)
        self.tms: dict[str, TrafficManager] = {}
        self.nodes: dict[str, TMNode] = {}
        for name in self.underlay:
            path = config / f"{name}.toml"
            tm_node = parse_node_config(edit(path.read_text()), str(path), path.parent)
            assert tm_node.tm is not None
            self.tms[name] = core(tm_node.tm)
            distributors = {name: (str(address), port) for name, (address, port) in zip(tm_node.distributor_names, tm_node.distributors)}
            self.nodes[name] = TMNode(self.tms[name], distributors, tm_node.underlay.gre_key, authenticator(tm_node))
        self.now = 1000.0

    def send(self, packet: bytes) -> tuple[list[str], bytes | None]:
        """A packet routed into the distributor's TUN → (TMs that saw it, what leaves into the TUN)."""
        self.now += 0.01
        verdict = self.distributor.from_tun(packet)
        visited: list[str] = []
        while verdict.action == "tm":
            assert verdict.tm is not None and verdict.packet is not None
            visited.append(verdict.tm)
            action, datagram, _ = self.nodes[verdict.tm].from_overlay(verdict.packet, self.dist_underlay, self.now)
            if action != SEND:
                return visited, None
            assert datagram is not None
            verdict = self.distributor.from_overlay(datagram, self.underlay[verdict.tm])
        return visited, verdict.packet if verdict.action == "forward" else None

    def invalid(self) -> int:
        return sum(count for tm in self.tms.values() for name, count in tm.counters().items() if name.startswith("invalid."))


def tcp(src: str, dst: str, flags: str) -> bytes:
    return build_packet(f"tcp {src} > {dst} flags {flags}")


def addresses(packet: bytes) -> tuple[str, int, str, int]:
    ip = dpkt.ip.IP(packet)
    return (
        ".".join(map(str, ip.src)), ip.data.sport,
        ".".join(map(str, ip.dst)), ip.data.dport,
    )


def open_connection(fleet: Fleet, client: str) -> tuple[str, str]:
    """Three-way handshake client → VIP; returns (TM, server address:port the TM chose)."""
    tms, out = fleet.send(tcp(client, f"{VIP}:80", "S"))
    assert out is not None and len(tms) == 1
    _, _, server, port = addresses(out)
    server_end = f"{server}:{port}"
    back_tms, back = fleet.send(tcp(server_end, client, "SA"))
    assert back is not None and back_tms == tms
    assert addresses(back)[:2] == (VIP, 80), "the reply must leave translated back to the VIP"
    assert fleet.send(tcp(client, f"{VIP}:80", "A"))[0] == tms
    return tms[0], server_end


def exchange(fleet: Fleet, client: str, server_end: str) -> tuple[list[str], list[str], bool]:
    """One data packet each way of an established connection: (TMs forward, TMs back, both delivered)."""
    forward_tms, forward = fleet.send(tcp(client, f"{VIP}:80", "PA"))
    back_tms, back = fleet.send(tcp(server_end, client, "PA"))
    return forward_tms, back_tms, forward is not None and back is not None


CLIENTS = [f"198.51.100.{host}:{41000 + host}" for host in range(100, 160)]


def test_every_conversation_meets_one_tm_in_both_directions() -> None:
    fleet = Fleet()
    used = set()
    for client in CLIENTS:
        tm, server_end = open_connection(fleet, client)
        forward_tms, back_tms, delivered = exchange(fleet, client, server_end)
        assert delivered and forward_tms == back_tms == [tm]
        used.add(tm)
    assert used == set(fleet.tms) and fleet.invalid() == 0


def test_drain_lets_established_connections_finish_and_sends_new_ones_elsewhere() -> None:
    fleet = Fleet()
    connections = [(client, *open_connection(fleet, client)) for client in CLIENTS]
    drained = "tm1"
    on_drained = [(client, server_end) for client, tm, server_end in connections if tm == drained]
    assert on_drained, "the sample must put some connections on the TM we drain"
    fleet.distributor.set_tm_state(drained, "draining")

    for client, server_end in on_drained:
        forward_tms, back_tms, delivered = exchange(fleet, client, server_end)
        assert delivered, "an established connection must survive the drain"
        # The new first choice sees it first, has no state, and hands it back to the draining TM.
        assert forward_tms[-1] == back_tms[-1] == drained and len(forward_tms) == 2
    assert fleet.tms[drained].counters() and fleet.invalid() == 0
    bounced = sum(tm.counters().get("bounced.second_chance", 0) for tm in fleet.tms.values())
    assert bounced == 2 * len(on_drained)

    # New connections from the same clients open on another TM and stay there.
    for client, _ in on_drained:
        new_client = client.rsplit(":", 1)[0] + ":50000"
        tm, server_end = open_connection(fleet, new_client)
        assert tm != drained
        forward_tms, back_tms, delivered = exchange(fleet, new_client, server_end)
        assert delivered and forward_tms == back_tms == [tm]
    assert fleet.invalid() == 0


def test_negative_control_disabling_instead_of_draining_breaks_them_and_counts_invalid() -> None:
    fleet = Fleet()
    connections = [(client, *open_connection(fleet, client)) for client in CLIENTS]
    on_tm1 = [(client, server_end) for client, tm, server_end in connections if tm == "tm1"]
    fleet.distributor.set_tm_state("tm1", "disabled")
    delivered = [exchange(fleet, client, server_end)[2] for client, server_end in on_tm1]
    assert not any(delivered)
    assert fleet.invalid() == 2 * len(on_tm1)


@pytest.mark.parametrize("marked, action, counter", [(SECOND_CHANCE, "bounce", "bounced.second_chance"), (UNMARKED, "drop", "invalid.no_state")])
def test_tm_core_bounces_only_marked_packets(marked: int, action: str, counter: str) -> None:
    fleet = Fleet()
    result = fleet.tms["tm2"].receive(tcp("198.51.100.7:40000", f"{VIP}:80", "A"), 1.0, marked)
    assert (result.action, result.packet) == (action, None)
    assert fleet.tms["tm2"].counters()[counter] == 1


# -- UDP and ICMP through a drain ---------------------------------------------------------------------------
DNS_SERVICE = """
[[tm.service]]
name = "dns"
virtual = "203.0.113.80"
port = 53
protocol = "udp"
policy = "round-robin"
servers = ["203.0.113.10:53", "203.0.113.11:53"]
"""
SERVERS = ["203.0.113.10", "203.0.113.11"]
REMOTES = [f"198.51.100.{host}" for host in range(20, 80)]


def with_dns(text: str) -> str:
    return text + DNS_SERVICE


class UdpOpensWhereverItLands(TrafficManager):
    """The rule before second chance covered UDP: a marked UDP packet without state opened state on the
    new TM instead of asking the draining one. Used as the negative control."""

    def receive(self, packet: bytes, now: float, mark: int = UNMARKED):  # type: ignore[no-untyped-def]
        if mark == SECOND_CHANCE and packet[9] == 17:
            mark = UNMARKED
        return super().receive(packet, now, mark)


def udp_exchange(fleet: Fleet, client: str, port: int) -> tuple[list[str], list[str], str | None, bool]:
    """One DNS-like request and the server's answer: (TMs forward, TMs back, the server chosen, answered
    from the VIP)."""
    forward_tms, request = fleet.send(P.udp(client, port, VIP, 53))
    if request is None:
        return forward_tms, [], None, False
    server = addresses(request)[2]
    back_tms, answer = fleet.send(P.udp(server, 53, client, port))
    return forward_tms, back_tms, server, answer is not None and addresses(answer)[:2] == (VIP, 53)


def snat_exchange(fleet: Fleet, server: str, remote: str) -> tuple[list[str], tuple[str, int] | None, bool]:
    """A server's UDP query out (SNAT) and the remote's answer: (TMs, public source, answered)."""
    tms, out = fleet.send(P.udp(server, 6000, remote, 123))
    if out is None:
        return tms, None, False
    public = addresses(out)[:2]
    _, answer = fleet.send(P.udp(remote, 123, public[0], public[1]))
    return tms, public, answer is not None and addresses(answer)[2:] == (server, 6000)


UDP_CLIENTS = [f"198.51.100.{host}" for host in range(100, 160)]


def drain_udp(core: type[TrafficManager]) -> dict[str, int]:
    """UDP flows both ways (clients → DNS service, servers → remotes) across a drain of tm1: how many kept
    their server / public source and were answered, out of how many lived on tm1."""
    fleet = Fleet(with_dns, core)
    inbound = {}
    for client in UDP_CLIENTS:
        forward_tms, back_tms, server, answered = udp_exchange(fleet, client, 5353)
        assert answered and forward_tms == back_tms
        inbound[client] = (forward_tms[0], server)
    outbound = {}
    for index, remote in enumerate(REMOTES):
        tms, public, answered = snat_exchange(fleet, SERVERS[index % 2], remote)
        assert answered
        outbound[remote] = (tms[0], public)
    fleet.distributor.set_tm_state("tm1", "draining")
    kept = moved = 0
    for client, (tm, server) in inbound.items():
        if tm == "tm1":
            _, _, new_server, answered = udp_exchange(fleet, client, 5353)
            kept += answered and new_server == server
            moved += 1
    for index, (remote, (tm, public)) in enumerate(outbound.items()):
        if tm == "tm1":
            _, new_public, answered = snat_exchange(fleet, SERVERS[index % 2], remote)
            kept += answered and new_public == public
            moved += 1
    return {"kept": kept, "on_drained": moved, "invalid": fleet.invalid()}


def test_drain_keeps_established_udp_flows_on_the_draining_tm_both_ways() -> None:
    result = drain_udp(TrafficManager)
    assert result["on_drained"] > 10, "the sample must put flows on the TM we drain"
    assert result == {"kept": result["on_drained"], "on_drained": result["on_drained"], "invalid": 0}


def test_negative_control_udp_opening_on_the_new_tm_breaks_them() -> None:
    result = drain_udp(UdpOpensWhereverItLands)
    assert result["on_drained"] > 10 and result["kept"] < result["on_drained"] / 2


def test_new_udp_flows_during_a_drain_open_on_the_new_tm_after_the_draining_one_declines() -> None:
    fleet = Fleet(with_dns)
    fleet.distributor.set_tm_state("tm1", "draining")
    declined = 0
    for client in UDP_CLIENTS:
        forward_tms, back_tms, _, answered = udp_exchange(fleet, client, 7000)
        assert answered and "tm1" != forward_tms[-1] == back_tms[-1]
        if len(forward_tms) > 1:
            # The new TM asked the draining one, which has no state and declined: opened on the new TM.
            new = forward_tms[0]
            assert forward_tms == [new, "tm1", new]
            declined += 1
            again, _, _, answered = udp_exchange(fleet, client, 7000)
            assert answered and again == [new], "once open on the new TM, the flow stays there"
    assert declined > 10 and fleet.invalid() == 0
    assert fleet.tms["tm1"].snapshot()["connections"]["total"] == 0, "a draining TM opens nothing new"


def test_drain_keeps_an_established_ping_on_the_draining_tm() -> None:
    fleet = Fleet(with_dns)
    pings = {}
    for index, remote in enumerate(REMOTES):
        tms, out = fleet.send(P.echo(SERVERS[0], remote, 100 + index))
        assert out is not None
        pings[remote] = (tms[0], addresses_icmp(out))
    fleet.distributor.set_tm_state("tm1", "draining")
    on_drained = [(index, remote, ident) for index, (remote, (tm, ident)) in enumerate(pings.items()) if tm == "tm1"]
    assert on_drained
    for index, remote, public in on_drained:
        tms, out = fleet.send(P.echo(SERVERS[0], remote, 100 + index, seq=2))
        assert out is not None and tms[-1] == "tm1" and addresses_icmp(out) == public
        _, answer = fleet.send(P.echo(remote, public[0], public[1], seq=2, reply=True))
        assert answer is not None
    assert fleet.invalid() == 0


def addresses_icmp(packet: bytes) -> tuple[str, int]:
    """(source, echo identifier) of an echo request."""
    ip = dpkt.ip.IP(packet)
    return ".".join(map(str, ip.src)), ip.data.data.id
