"""Firewall mode: rules decide about new connections; established and related pass unmodified; the
rest is dropped. The same tracking as NAT mode, without translation."""

from __future__ import annotations

import pytest

from overlay.configlib import parse_toml
from overlay.tm.config import parse_tm_section
from overlay.tm.core import TrafficManager

from .addresses import CLIENT, CLIENT6, MANAGEMENT, REMOTE, SERVER1, SERVER1_6
from .packets import ACK, FIN, SYN, checksum_problems, echo, icmp_error, tcp, udp

FIREWALL = """
[tm]
mode = "firewall"
management = ["203.0.113.201"]

[[tm.firewall.rule]]
name = "web in"
protocol = "tcp"
destinations = ["203.0.113.0/26", "2001:db8:2::/64"]
ports = [80, "8000-8080"]

[[tm.firewall.rule]]
name = "inside out"
sources = ["203.0.113.0/26"]

[[tm.firewall.rule]]
name = "ping"
protocol = "icmp"
"""


def firewall() -> TrafficManager:
    return TrafficManager(parse_tm_section(parse_toml(FIREWALL).section("tm")))


CONVERSATIONS = [
    ("allowed TCP in, reply and data pass unmodified", [
        (tcp(CLIENT, 40000, SERVER1, 80, SYN), "overlay", "firewall-allow"),
        (tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), "overlay", "firewall-reply"),
        (tcp(CLIENT, 40000, SERVER1, 80, ACK, b"GET /"), "overlay", "firewall-allow"),
    ]),
    ("allowed by a port range, IPv6", [
        (tcp(CLIENT6, 40000, SERVER1_6, 8080, SYN), "overlay", "firewall-allow"),
        (tcp(SERVER1_6, 8080, CLIENT6, 40000, SYN | ACK), "overlay", "firewall-reply"),
    ]),
    ("inside host may open anything outward, UDP reply passes", [
        (udp(SERVER1, 5000, REMOTE, 53), "overlay", "firewall-allow"),
        (udp(REMOTE, 53, SERVER1, 5000), "overlay", "firewall-reply"),
    ]),
    ("ICMP error about a tracked connection is related", [
        (udp(SERVER1, 5000, REMOTE, 53), "overlay", "firewall-allow"),
        (icmp_error(REMOTE, SERVER1, udp(SERVER1, 5000, REMOTE, 53)), "overlay", "firewall-related"),
    ]),
    ("ping allowed for anyone", [
        (echo(CLIENT, SERVER1, 3), "overlay", "firewall-allow"),
        (echo(SERVER1, CLIENT, 3, reply=True), "overlay", "firewall-reply"),
    ]),
    ("management address is local in firewall mode too", [
        (tcp(CLIENT, 40000, MANAGEMENT, 8080, SYN), "local", "management"),
    ]),
    # -- what must fail ---------------------------------------------------------------------------
    ("new connection no rule allows", [(tcp(CLIENT, 40000, SERVER1, 22, SYN), "drop", "firewall-deny")]),
    ("UDP from outside no rule allows", [(udp(REMOTE, 53, SERVER1, 5000), "drop", "firewall-deny")]),
    ("reply without state is invalid, not denied", [
        (tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), "drop", "invalid:no-state"),
    ]),
    ("ICMP error about an untracked flow", [
        (icmp_error(REMOTE, SERVER1, udp(SERVER1, 5000, REMOTE, 53)), "drop", "invalid:icmp-error-no-state"),
    ]),
    ("the server closes first: its FIN passes", [
        (tcp(CLIENT, 40000, SERVER1, 80, SYN), "overlay", "firewall-allow"),
        (tcp(SERVER1, 80, CLIENT, 40000, FIN | ACK), "overlay", "firewall-reply"),
    ]),
]


@pytest.mark.parametrize("description, steps", CONVERSATIONS, ids=[case[0] for case in CONVERSATIONS])
def test_firewall_conversation(description: str, steps: list) -> None:
    tm = firewall()
    for number, (packet, action, reason) in enumerate(steps):
        result = tm.receive(packet, 1.0 + number)
        assert (result.action, result.reason) == (action, reason), f"step {number}"
        if action != "drop":
            assert result.packet == packet          # never translated
            assert checksum_problems(result.packet) == []


def test_firewall_connections_expire_like_nat_ones() -> None:
    tm = firewall()
    tm.receive(tcp(CLIENT, 40000, SERVER1, 80, SYN), 0.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), 0.0)
    assert tm.receive(tcp(CLIENT, 40000, SERVER1, 80, ACK), 59.0).reason == "firewall-allow"
    assert tm.receive(tcp(SERVER1, 80, CLIENT, 40000, ACK), 59.0 + 7440.0).reason == "invalid:no-state"
