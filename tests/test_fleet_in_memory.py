"""The whole data path in memory: the real distributor core and three real TM cores wired together through
real GRE-in-UDP frames, as the agents do it (aioquic's `client_and_server()` style, no sockets).

Proves end to end what the unit tests prove per core: both directions of a NATed conversation meet at one
TM, and a drain lets an established connection finish on the draining TM (second chance) while new
connections go elsewhere. Negative control: disabling instead of draining breaks the same connection and
the TM counts it as invalid."""

from __future__ import annotations

from pathlib import Path

import dpkt
import pytest

from overlay import gre
from overlay.config import load_node_config
from overlay.distributor.core import Distributor
from overlay.flowspec import build_packet
from overlay.tm.core import BOUNCE, OVERLAY, TrafficManager

CONFIG = Path(__file__).resolve().parents[1] / "config"
VIP = "203.0.113.80"


class Fleet:
    def __init__(self) -> None:
        node = load_node_config(CONFIG / "distributor.toml")
        assert node.distributor is not None
        self.distributor = Distributor(node.distributor)
        self.underlay = {tm.name: (str(tm.underlay[0]), tm.underlay[1]) for tm in node.distributor.tms}
        self.tms: dict[str, TrafficManager] = {}
        for name in self.underlay:
            tm_node = load_node_config(CONFIG / f"{name}.toml")
            assert tm_node.tm is not None
            self.tms[name] = TrafficManager(tm_node.tm)
        self.now = 1000.0

    def send(self, packet: bytes) -> tuple[list[str], bytes | None]:
        """A packet routed into the distributor's TUN → (TMs that saw it, what leaves into the TUN)."""
        self.now += 0.01
        verdict = self.distributor.from_tun(packet)
        visited: list[str] = []
        while verdict.action == "tm":
            assert verdict.tm is not None and verdict.packet is not None
            visited.append(verdict.tm)
            frame = gre.decapsulate(verdict.packet)
            assert frame is not None
            result = self.tms[verdict.tm].receive(frame.inner, self.now, gre.key_fallback(frame.key) != 0)
            reply_from = self.underlay[verdict.tm]
            if result.action == BOUNCE:
                bounced = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.SECOND_CHANCE_PROTOCOL)
                verdict = self.distributor.from_overlay(bounced, reply_from)
                continue
            if result.action != OVERLAY:
                return visited, None
            assert result.packet is not None
            verdict = self.distributor.from_overlay(gre.encapsulate(result.packet), reply_from)
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


@pytest.mark.parametrize("marked, action, counter", [(True, "bounce", "bounced.second_chance"), (False, "drop", "invalid.no_state")])
def test_tm_core_bounces_only_marked_packets(marked: bool, action: str, counter: str) -> None:
    fleet = Fleet()
    result = fleet.tms["tm2"].receive(tcp("198.51.100.7:40000", f"{VIP}:80", "A"), 1.0, marked)
    assert (result.action, result.packet) == (action, None)
    assert fleet.tms["tm2"].counters()[counter] == 1
