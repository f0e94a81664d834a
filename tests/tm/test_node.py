"""The TM node core (`overlay.tm.node.TMNode`): the overlay protocol around the NAT core, datagram by
datagram — who may talk to the TM, the fleet id, keepalives, and how bounces and declines go back."""

from __future__ import annotations

import pytest

from overlay import gre
from overlay.tm.core import TrafficManager
from overlay.tm.node import NOTHING, SEND, TUN, TMNode

from .addresses import CLIENT, MANAGEMENT, VIP
from .conftest import lab_config_with_dns
from .packets import ACK, SYN, tcp, udp

DISTRIBUTOR = ("192.0.2.2", 4754)
FROM_ENTROPY_PORT = ("192.0.2.2", 40123)  # distributors send from RFC 8086 entropy ports
KEEPALIVE = gre.encapsulate(b"OVKA" + bytes(28), protocol=gre.KEEPALIVE_PROTOCOL)


def node(fleet_id: int | None = None) -> TMNode:
    return TMNode(TrafficManager(lab_config_with_dns()), {"dist1": DISTRIBUTOR}, fleet_id)


def frame(datagram: bytes | None) -> gre.Decapsulated:
    assert datagram is not None
    decapsulated = gre.decapsulate(datagram)
    assert decapsulated is not None
    return decapsulated


def test_a_packet_is_translated_and_goes_back_to_the_distributors_configured_port() -> None:
    tm = node()
    action, datagram, peer = tm.from_overlay(gre.encapsulate(tcp(CLIENT, 40000, VIP, 80, SYN)), FROM_ENTROPY_PORT, 1.0)
    assert (action, peer) == (SEND, DISTRIBUTOR)
    assert frame(datagram).key is None and tm.core.counters()["translated.dnat"] == 1
    assert tm.peers == {DISTRIBUTOR: 1}


def test_the_fleet_id_rides_in_the_high_half_of_every_key_we_send() -> None:
    tm = node(fleet_id=7)
    _, datagram, _ = tm.from_overlay(gre.encapsulate(tcp(CLIENT, 40000, VIP, 80, SYN), key=7 << 16), DISTRIBUTOR, 1.0)
    assert frame(datagram).key == 7 << 16


@pytest.mark.parametrize(("datagram", "peer", "fleet_id", "reason"), [
    pytest.param(gre.encapsulate(udp(CLIENT, 5000, VIP, 53)), ("192.0.2.99", 4754), None, "unknown-peer", id="unknown peer"),
    pytest.param(b"\x00\x08", DISTRIBUTOR, None, "malformed:gre", id="truncated GRE"),
    pytest.param(gre.encapsulate(udp(CLIENT, 5000, VIP, 53), key=8 << 16), DISTRIBUTOR, 7, "wrong-fleet-id", id="another fleet"),
    pytest.param(gre.encapsulate(udp(CLIENT, 5000, VIP, 53)), DISTRIBUTOR, 7, "wrong-fleet-id", id="no fleet id"),
    pytest.param(gre.encapsulate(udp(CLIENT, 5000, VIP, 53), key=7 << 16), DISTRIBUTOR, None, "wrong-fleet-id", id="a fleet id we lack"),
    pytest.param(gre.encapsulate(b"\x00" * 20, protocol=0x6558), DISTRIBUTOR, None, "unsupported-gre-protocol", id="Ethernet"),
    pytest.param(gre.encapsulate(KEEPALIVE[4:], key=8 << 16, protocol=gre.KEEPALIVE_PROTOCOL), DISTRIBUTOR, 7, "wrong-fleet-id", id="keepalive of another fleet"),
])
def test_refused_datagrams_never_reach_the_core(datagram: bytes, peer: tuple[str, int], fleet_id: int | None, reason: str) -> None:
    tm = node(fleet_id)
    assert tm.from_overlay(datagram, peer, 1.0) == (NOTHING, None, None)
    assert tm.drops == {reason: 1} and tm.core.counters()["packets.received"] == 0 and tm.keepalives_echoed == 0


def test_keepalives_are_echoed_unchanged_to_the_port_they_came_from() -> None:
    tm = node()
    assert tm.from_overlay(KEEPALIVE, FROM_ENTROPY_PORT, 1.0) == (SEND, KEEPALIVE, FROM_ENTROPY_PORT)
    assert tm.keepalives_echoed == 1 and tm.core.counters()["packets.received"] == 0


def test_a_marked_packet_without_state_goes_back_under_the_second_chance_protocol_key_echoed() -> None:
    tm = node()
    inner = tcp(CLIENT, 40000, VIP, 80, ACK)
    action, datagram, peer = tm.from_overlay(gre.encapsulate(inner, key=1234), DISTRIBUTOR, 1.0)
    back = frame(datagram)
    assert (action, peer, back.protocol, back.key, back.inner) == (SEND, DISTRIBUTOR, gre.SECOND_CHANCE_PROTOCOL, 1234, inner)


def test_a_last_chance_opener_goes_back_declined() -> None:
    tm = node()
    inner = udp(CLIENT, 5000, VIP, 53)
    _, datagram, _ = tm.from_overlay(gre.encapsulate(inner, key=gre.LAST_CHANCE), DISTRIBUTOR, 1.0)
    back = frame(datagram)
    assert (back.protocol, back.key, back.inner) == (gre.DECLINED_PROTOCOL, gre.LAST_CHANCE, inner)
    assert tm.core.snapshot()["connections"]["total"] == 0


def test_management_traffic_goes_to_the_tun_and_its_answers_to_the_last_distributor() -> None:
    tm = node()
    probe = tcp(CLIENT, 40000, MANAGEMENT, 8080, SYN)
    assert tm.from_overlay(gre.encapsulate(probe), DISTRIBUTOR, 1.0) == (TUN, probe, None)
    answer = tcp(MANAGEMENT, 8080, CLIENT, 40000, SYN | ACK)
    action, datagram, peer = tm.from_tun(answer, 1.1)
    assert (action, peer, frame(datagram).inner) == (SEND, DISTRIBUTOR, answer)
