"""ICMP errors about tracked flows: the outer header and the quoted packet are both translated, with
every checksum (outer IPv4, quoted IPv4, quoted transport, ICMP / ICMPv6) verified from scratch."""

from __future__ import annotations

import struct

import pytest

from overlay.tm.core import TrafficManager

from .addresses import (
    CLIENT, CLIENT6, FIRST_PORT, REMOTE, REMOTE6, ROUTER, ROUTER6, SERVER1, SERVER1_6, SERVER2, VIP, VIP6, XLATE,
    XLATE6,
)
from .conftest import lab_config_with_dns
from tests.distributor import packets as P

from .packets import ACK, SYN, Flow, checksum_problems, echo, flow, icmp_error, quoted, tcp, udp

T, U, I = "tcp", "udp", "icmp"
INSIDE_ROUTER = "203.0.113.1"

CASES = [
    {
        "description": "server1 refuses a DNATed connection: the client sees the VIP refuse it",
        "opener": tcp(CLIENT, 40000, VIP, 80, SYN),
        "error": icmp_error(SERVER1, CLIENT, tcp(CLIENT, 40000, SERVER1, 80, SYN)),
        "outer": (VIP, CLIENT),
        "quoted": Flow(T, CLIENT, 40000, VIP, 80),
    },
    {
        "description": "frag needed from a router between TM and server: the router's address is kept",
        "opener": tcp(CLIENT, 40000, VIP, 80, SYN),
        "error": icmp_error(INSIDE_ROUTER, CLIENT, tcp(CLIENT, 40000, SERVER1, 80, ACK, b"x" * 100), "frag-needed"),
        "outer": (INSIDE_ROUTER, CLIENT),
        "quoted": Flow(T, CLIENT, 40000, VIP, 80),
    },
    {
        "description": "time exceeded for a SNATed connection goes back to the inside host (traceroute)",
        "opener": tcp(SERVER1, 5555, REMOTE, 443, SYN),
        "error": icmp_error(ROUTER, XLATE, tcp(XLATE, FIRST_PORT, REMOTE, 443, SYN), "time-exceeded"),
        "outer": (ROUTER, SERVER1),
        "quoted": Flow(T, SERVER1, 5555, REMOTE, 443),
    },
    {
        "description": "quote cut after 8 transport bytes (RFC 792): no transport checksum to fix",
        "opener": tcp(SERVER1, 5555, REMOTE, 443, SYN),
        "error": icmp_error(ROUTER, XLATE, tcp(XLATE, FIRST_PORT, REMOTE, 443, SYN), quote_bytes=28),
        "outer": (ROUTER, SERVER1),
        "quoted": Flow(T, SERVER1, 5555, REMOTE, 443),
    },
    {
        "description": "IPv6 packet too big for a SNATed UDP flow (PMTU discovery)",
        "opener": udp(SERVER1_6, 6000, REMOTE6, 443, b"q" * 64),
        "error": icmp_error(ROUTER6, XLATE6, udp(XLATE6, FIRST_PORT, REMOTE6, 443, b"q" * 64), "frag-needed"),
        "outer": (ROUTER6, SERVER1_6),
        "quoted": Flow(U, SERVER1_6, 6000, REMOTE6, 443),
    },
    {
        "description": "IPv6: server1 refuses a DNATed connection, the client sees the VIP refuse it",
        "opener": tcp(CLIENT6, 40000, VIP6, 80, SYN),
        "error": icmp_error(SERVER1_6, CLIENT6, tcp(CLIENT6, 40000, SERVER1_6, 80, SYN)),
        "outer": (VIP6, CLIENT6),
        "quoted": Flow(T, CLIENT6, 40000, VIP6, 80),
    },
    {
        "description": "the remote host itself says port unreachable to the xlate address",
        "opener": udp(SERVER1, 6000, REMOTE, 9),
        "error": icmp_error(REMOTE, XLATE, udp(XLATE, FIRST_PORT, REMOTE, 9)),
        "outer": (REMOTE, SERVER1),
        "quoted": Flow(U, SERVER1, 6000, REMOTE, 9),
    },
    {
        "description": "the client reports a reply as unreachable: goes to the server, quote un-NATed",
        "opener": udp(CLIENT, 5000, VIP, 53),
        "error": icmp_error(CLIENT, VIP, udp(VIP, 53, CLIENT, 5000)),
        "outer": (CLIENT, SERVER1),
        "quoted": Flow(U, SERVER1, 53, CLIENT, 5000),
    },
    {
        "description": "time exceeded for a ping from a server: the quoted echo identifier is restored",
        "opener": echo(SERVER1, REMOTE, 77),
        "error": icmp_error(ROUTER, XLATE, echo(XLATE, REMOTE, FIRST_PORT), "time-exceeded"),
        "outer": (ROUTER, SERVER1),
        "quoted": Flow(I, SERVER1, 77, REMOTE, 8),
    },
    {
        "description": "hairpin: server1 refuses server2's connection to the VIP",
        "opener": tcp(SERVER2, 3333, VIP, 80, SYN),
        "error": icmp_error(SERVER1, XLATE, tcp(XLATE, FIRST_PORT, SERVER1, 80, SYN)),
        "outer": (VIP, SERVER2),
        "quoted": Flow(T, SERVER2, 3333, VIP, 80),
    },
]


@pytest.mark.parametrize("case", CASES, ids=[case["description"] for case in CASES])
def test_icmp_error_is_translated(case: dict) -> None:
    tm = TrafficManager(lab_config_with_dns())
    assert tm.receive(case["opener"], 1.0).action == "overlay"
    result = tm.receive(case["error"], 2.0)
    assert (result.action, result.reason) == ("overlay", "icmp-related")
    assert result.packet is not None
    out = flow(result.packet)
    assert (out.src, out.dst) == case["outer"]
    assert flow(quoted(result.packet)) == case["quoted"]
    assert checksum_problems(result.packet) == []
    assert len(result.packet) == len(case["error"])


NEGATIVE = [
    ("error about a flow this TM does not track",
     icmp_error(ROUTER, XLATE, tcp(XLATE, 4000, REMOTE, 443, SYN)), "invalid:icmp-error-no-state"),
    ("error addressed to someone else than the quoted sender",
     icmp_error(ROUTER, "198.51.100.99",
                tcp(XLATE, FIRST_PORT, REMOTE, 443, SYN)), "malformed:icmp-error-mismatch"),
    ("quoted IP header cut short", icmp_error(ROUTER, XLATE, tcp(XLATE, FIRST_PORT, REMOTE, 443, SYN), quote_bytes=12),
     "malformed:bad-icmp-error-inner"),
    ("quote without 8 transport bytes", icmp_error(ROUTER, XLATE, tcp(XLATE, FIRST_PORT, REMOTE, 443, SYN),
                                                   quote_bytes=24), "malformed:bad-icmp-error-inner"),
    ("error quoting an error", icmp_error(ROUTER, XLATE, icmp_error(XLATE, REMOTE, udp(REMOTE, 1, XLATE, 2))),
     "invalid:icmp-error-no-state"),
]


@pytest.mark.parametrize("description, packet, reason", NEGATIVE, ids=[case[0] for case in NEGATIVE])
def test_icmp_error_without_matching_state_is_dropped(description: str, packet: bytes, reason: str) -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(tcp(SERVER1, 5555, REMOTE, 443, SYN), 1.0)
    result = tm.receive(packet, 2.0)
    assert (result.action, result.packet, result.reason) == ("drop", None, reason)


def test_icmp_errors_do_not_keep_a_connection_alive() -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(udp(SERVER1, 6000, REMOTE, 9), 0.0)
    deadline = tm.next_deadline()
    tm.receive(icmp_error(REMOTE, XLATE, udp(XLATE, FIRST_PORT, REMOTE, 9)), 10.0)
    assert tm.next_deadline() == deadline


@pytest.mark.parametrize("extensions", [((0, b"\x01\x04\0\0\0\0"),), ((0, b"\x01\x04\0\0\0\0"), (60, b"\x01\x0c" + bytes(12))),
                                        ((44, P.fragment_body(0, True)),)], ids=["hop-by-hop", "hop-by-hop, dest opts", "first fragment"])
def test_icmpv6_error_quoting_extension_headers_is_translated(extensions: tuple[tuple[int, bytes], ...]) -> None:
    """The quoted packet's extension headers are walked like a packet's (docs/wire-format.md): the error
    about a DNATed connection goes back to the client quoting what it sent, every checksum still valid."""
    tm = TrafficManager(lab_config_with_dns())
    assert tm.receive(tcp(CLIENT6, 40000, VIP6, 80, SYN), 1.0).action == "overlay"
    about = P.ipv6(CLIENT6, SERVER1_6, 6, P.transport(6, 40000, 80), extensions=extensions)
    error = P.icmp_error(ROUTER6, about)
    result = tm.receive(error, 2.0)
    assert (result.action, result.reason) == ("overlay", "icmp-related")
    assert result.packet is not None and len(result.packet) == len(error)
    inner = result.packet[48:]
    l4 = len(inner) - len(bytes(P.transport(6, 40000, 80)))
    assert (inner[8:24], inner[24:40]) == (P.packed(CLIENT6), P.packed(VIP6))
    assert (int.from_bytes(inner[l4:l4 + 2], "big"), int.from_bytes(inner[l4 + 2:l4 + 4], "big")) == (40000, 80)
    pseudo = inner[8:40] + struct.pack("!IxxxB", len(inner) - l4, 6)
    assert P.rfc1071(pseudo + inner[l4:]) == 0      # the quoted TCP checksum, with the VIP as destination
    assert P.verify_icmp(result.packet)
