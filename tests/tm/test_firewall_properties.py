"""Firewall mode under random interleavings, against a model: packets are never modified; a flow's
packets pass in both directions once an allowed opener created it; everything else is denied or
invalid exactly as the rules and the absence of state say."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.tm.core import TrafficManager

from .addresses import CLIENT, CLIENT6, REMOTE, SERVER1, SERVER1_6, SERVER2
from .packets import ACK, SYN, echo, tcp, udp
from .test_firewall import firewall

INSIDE = {SERVER1, SERVER2, SERVER1_6}          # 203.0.113.0/26 and 2001:db8:2::/64 of the rules
FLOWS = [
    # (protocol, initiator, responder, destination port)
    ("tcp", CLIENT, SERVER1, 80), ("tcp", CLIENT, SERVER1, 22), ("tcp", CLIENT6, SERVER1_6, 8080),
    ("tcp", SERVER2, REMOTE, 443), ("tcp", REMOTE, CLIENT, 80),
    ("udp", SERVER1, REMOTE, 53), ("udp", REMOTE, SERVER2, 53), ("udp", CLIENT6, SERVER1_6, 5000),
    ("icmp", CLIENT, SERVER1, 0), ("icmp", SERVER1_6, CLIENT6, 0),
]


def rule_allows(protocol: str, src: str, dst: str, port: int) -> bool:
    """The rule list of test_firewall.FIREWALL, restated."""
    web_in = protocol == "tcp" and dst in INSIDE and (port == 80 or 8000 <= port <= 8080)
    return web_in or src in (SERVER1, SERVER2) or protocol == "icmp"


def packet(protocol: str, src: str, dst: str, sport: int, dport: int, reply: bool, step: int) -> bytes:
    if protocol == "tcp":
        flags = SYN if step == 0 and not reply else SYN | ACK if step == 0 else ACK
        return tcp(src, sport, dst, dport, flags)
    if protocol == "udp":
        return udp(src, sport, dst, dport)
    return echo(src, dst, 7, reply=reply)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(FLOWS) - 1), st.booleans()), min_size=1, max_size=40))
def test_firewall_passes_exactly_the_allowed_connections(schedule: list[tuple[int, bool]]) -> None:
    tm: TrafficManager = firewall()
    tracked: dict[int, int] = {}       # flow index → direction of the packet that opened it (0 or 1)
    sent: dict[int, int] = {}          # packets sent per flow
    for index, reply in schedule:
        protocol, initiator, responder, port = FLOWS[index]
        src, dst, sport, dport = (responder, initiator, port, 40000) if reply else (initiator, responder, 40000, port)
        step = sent.get(index, 0)
        sent[index] = step + 1
        data = packet(protocol, src, dst, sport, dport, reply, step)
        result = tm.receive(data, 1.0)

        direction = int(reply)
        if index in tracked:
            same_side = tracked[index] == direction
            expected = ("overlay", "firewall-allow" if same_side else "firewall-reply")
        else:
            tcp_opener = protocol == "tcp" and step == 0 and not reply
            opener = tcp_opener or protocol == "udp" or (protocol == "icmp" and not reply)
            if not opener:
                expected = ("drop", "invalid:no-state")
            elif rule_allows(protocol, src, dst, dport if protocol != "icmp" else 0):
                expected = ("overlay", "firewall-allow")
                tracked[index] = direction
            else:
                expected = ("drop", "firewall-deny")
        assert (result.action, result.reason) == expected, (FLOWS[index], reply, step)
        assert result.packet == (data if result.action == "overlay" else None)
