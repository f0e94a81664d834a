"""The FIG. 9 table through `Distributor.from_tun`, one real packet per cell and refinement.

Each fixture is {description, packet, expected}. For hash cells the expected TM is "whoever the table
gives the hashed endpoint": the test recomputes it from the endpoint named in the fixture (never from the
decision's own trace), so a core that hashed the wrong endpoint fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from overlay import gre
from overlay.decision import COLUMNS, ROWS
from overlay.distributor.core import Distributor
from overlay.packet import parse_flow
from tests.distributor import packets as P
from tests.distributor.configs import CELLS, distributor, reference_text

CLIENT = "198.51.100.10"
REMOTE = "198.51.100.20"
NODE = "203.0.113.10"
NAT_ABLE = "203.0.113.17"
NODE_NAT_ABLE = "203.0.113.20"
VIP = "203.0.113.80"
SPLIT = "203.0.113.90"  # virtual on tcp/80, xlate of tm2 on tcp/1024-65535
XV_OWNED = "203.0.113.92"  # virtual + xlate of tm3
XV_FREE = "203.0.113.93"  # virtual + xlate, no owner
X1 = "203.0.113.101"
X_FREE = "203.0.113.104"


@dataclass(frozen=True)
class Expect:
    action: str
    reason: str
    cell: str | None
    tm: str | None = None  # a TM name, or None
    hashed: str | None = None  # for hash cells: the endpoint ("ADDR" or "ADDR:PORT") whose hash picks the TM


def case(description: str, packet: bytes, expected: Expect) -> object:
    return pytest.param(packet, expected, id=description)


SOURCES = {"nat-able+node": NODE_NAT_ABLE, "nat-able": NAT_ABLE, "node": NODE}

TABLE_CASES = [
    # Rows that TMs balance to or source-NAT: one per FIG. 9 cell.
    *[
        case(f"{row}>xlate+virtual with an owner: to the owner", P.tcp(src, 40000, XV_OWNED, 80), Expect("tm", "owner", f"{row}>xlate+virtual", "tm3"))
        for row, src in SOURCES.items()
    ],
    *[
        case(f"{row}>xlate+virtual without an owner: forward", P.tcp(src, 40000, XV_FREE, 80), Expect("forward", "no-owner", f"{row}>xlate+virtual"))
        for row, src in SOURCES.items()
    ],
    *[
        case(f"{row}>virtual: hash src (hairpin)", P.tcp(src, 40000, VIP, 80), Expect("tm", "hash-src", f"{row}>virtual", hashed=src))
        for row, src in SOURCES.items()
    ],
    *[
        case(f"{row}>xlate with an owner: to the owner", P.tcp(src, 80, X1, 40000), Expect("tm", "owner", f"{row}>xlate", "tm1"))
        for row, src in SOURCES.items()
    ],
    *[
        case(f"{row}>xlate without an owner: forward", P.tcp(src, 80, X_FREE, 40000), Expect("forward", "no-owner", f"{row}>xlate"))
        for row, src in SOURCES.items()
    ],
    *[
        case(f"{row}>unknown: hash dst (outbound, or reply to a client)", P.tcp(src, 80, CLIENT, 40000), Expect("tm", "hash-dst", f"{row}>unknown", hashed=CLIENT))
        for row, src in SOURCES.items()
    ],
    # The unknown row.
    case("unknown>xlate+virtual with an owner: owner refinement", P.tcp(CLIENT, 40000, XV_OWNED, 80), Expect("tm", "owner", "unknown>xlate+virtual", "tm3")),
    case("unknown>xlate+virtual without an owner: hash src", P.tcp(CLIENT, 40000, XV_FREE, 80), Expect("tm", "hash-src", "unknown>xlate+virtual", hashed=CLIENT)),
    case("unknown>virtual: hash src (client to VIP)", P.tcp(CLIENT, 40000, VIP, 80), Expect("tm", "hash-src", "unknown>virtual", hashed=CLIENT)),
    case("unknown>xlate with an owner: owner refinement (reply to SNAT)", P.tcp(REMOTE, 443, X1, 40000), Expect("tm", "owner", "unknown>xlate", "tm1")),
    case("unknown>xlate without an owner: hash src", P.tcp(REMOTE, 443, X_FREE, 40000), Expect("tm", "hash-src", "unknown>xlate", hashed=REMOTE)),
    case("unknown>unknown: route", P.tcp(CLIENT, 40000, REMOTE, 80), Expect("forward", "route", "unknown>unknown")),
    # Port blocks: one address, two meanings by port.
    case("port block: tcp/80 of the split address is virtual", P.tcp(CLIENT, 40000, SPLIT, 80), Expect("tm", "hash-src", "unknown>virtual", hashed=CLIENT)),
    case("port block: tcp/40000 of the split address is tm2's xlate", P.tcp(REMOTE, 443, SPLIT, 40000), Expect("tm", "owner", "unknown>xlate", "tm2")),
    case("port block: udp to the split address is neither (unknown)", P.udp(CLIENT, 53, SPLIT, 40000), Expect("forward", "route", "unknown>unknown")),
    case("port block: node reply to tm2's port block goes to tm2", P.tcp(NODE, 80, SPLIT, 50000), Expect("tm", "owner", "node>xlate", "tm2")),
    # Management addresses come before the table.
    case("management address of tm2 from a client", P.tcp(CLIENT, 40000, "203.0.113.202", 8080), Expect("tm", "management", None, "tm2")),
    case("management address of tm1 from a node", P.udp(NODE, 5000, "203.0.113.201", 8080), Expect("tm", "management", None, "tm1")),
    # IPv6.
    case("v6 unknown>virtual: hash src", P.tcp("2001:db8:1::10", 40000, "2001:db8:80::80", 80), Expect("tm", "hash-src", "unknown>virtual", hashed="2001:db8:1::10")),
    case("v6 node>unknown: hash dst", P.tcp("2001:db8:2::10", 80, "2001:db8:1::10", 40000), Expect("tm", "hash-dst", "nat-able+node>unknown", hashed="2001:db8:1::10")),
    case("v6 unknown>xlate of tm1: owner", P.udp("2001:db8:1::20", 53, "2001:db8:ee::101", 40000), Expect("tm", "owner", "unknown>xlate", "tm1")),
    case("v6 unknown>unknown: route", P.udp("2001:db8:1::20", 53, "2001:db8:1::10", 40000), Expect("forward", "route", "unknown>unknown")),
    # ICMP: echo by its addresses, errors by the flow they quote (turned around).
    case("echo request to the VIP: hash src", P.echo(CLIENT, VIP, 7), Expect("tm", "hash-src", "unknown>virtual", hashed=CLIENT)),
    case(
        "frag-needed from a router about a DNATed packet (client->node): goes to the client's TM",
        P.icmp_error("203.0.113.1", P.tcp(CLIENT, 40000, NODE, 80, df=True)),
        Expect("tm", "hash-dst", "node>unknown", hashed=CLIENT),
    ),
    case(
        "time exceeded about a SNATed packet (xlate->remote): goes to the xlate owner",
        P.icmp_error("198.51.100.1", P.udp(X1, 40000, REMOTE, 53), kind="time-exceeded"),
        Expect("tm", "owner", "unknown>xlate", "tm1"),
    ),
    case(
        "v6 packet-too-big about a reply to a client (vip->client): goes to the client's TM",
        P.icmp_error("2001:db8:1::1", P.tcp("2001:db8:80::80", 80, "2001:db8:1::10", 40000)),
        Expect("tm", "hash-src", "unknown>virtual", hashed="2001:db8:1::10"),
    ),
    # Fragments: the non-first fragment carries no ports, classifies and hashes like the first.
    case("non-first fragment to the VIP: hash src", P.ipv4(CLIENT, VIP, 17, b"x" * 64, offset_units=185), Expect("tm", "hash-src", "unknown>virtual", hashed=CLIENT)),
]

MALFORMED_CASES = [
    case("empty packet", b"", Expect("drop", "malformed:empty", None)),
    case("IP version 5", b"\x50" + bytes(39), Expect("drop", "malformed:bad-ip-version", None)),
    case("truncated IPv4 header", P.tcp(CLIENT, 1, VIP, 80)[:19], Expect("drop", "malformed:truncated-ipv4", None)),
    case("IPv4 total length beyond the packet", P.tcp(CLIENT, 1, VIP, 80)[:-1], Expect("drop", "malformed:truncated-ipv4", None)),
    case("IPv4 header length 4 words", b"\x44" + P.tcp(CLIENT, 1, VIP, 80)[1:], Expect("drop", "malformed:bad-ipv4-header-length", None)),
    case("TCP data offset 4", P.ipv4(CLIENT, VIP, 6, bytes(12) + b"\x40" + bytes(7)), Expect("drop", "malformed:bad-tcp-data-offset", None)),
    case("UDP header cut short", P.ipv4(CLIENT, VIP, 17, b"\0\1\0"), Expect("drop", "malformed:truncated-udp", None)),
    case("ICMP error quoting nothing", P.ipv4("198.51.100.1", CLIENT, 1, bytes([3, 4]) + bytes(6)), Expect("drop", "malformed:bad-icmp-error-inner", None)),
    case(
        "ICMPv4 error quoting an IPv6 packet",
        P.ipv4("198.51.100.1", CLIENT, 1, bytes([3, 4]) + bytes(6) + P.udp("2001:db8:1::10", 1, "2001:db8:80::80", 2)),
        Expect("drop", "malformed:bad-icmp-error-inner", None),
    ),
]


def _expected_tm(core: Distributor, endpoint: str) -> str:
    """The table's first choice for an endpoint, computed from the endpoint text alone."""
    key = P.packed(endpoint)
    _, value = core.hash_endpoint(key, None, fragment=False)
    first, _ = core.table.choice(value & (core.table.rows - 1))
    assert first is not None
    return first


@pytest.fixture(scope="module")
def core() -> Distributor:
    return distributor(CELLS)


@pytest.mark.parametrize(("packet", "expected"), MALFORMED_CASES + TABLE_CASES)
def test_from_tun(core: Distributor, packet: bytes, expected: Expect) -> None:
    verdict = core.from_tun(packet)
    assert (verdict.action, verdict.reason, verdict.cell) == (expected.action, expected.reason, expected.cell)
    tm = _expected_tm(core, expected.hashed) if expected.hashed else expected.tm
    assert verdict.tm == tm
    if verdict.action == "tm":
        # What leaves is the packet itself behind a plain GRE header, sent to that TM's underlay.
        assert verdict.dest == (f"192.0.2.7{tm[-1]}", 4754)
        frame = gre.decapsulate(verdict.packet)
        assert frame is not None and frame.inner == packet and frame.key is None
    elif verdict.action == "forward":
        assert verdict.packet == packet and verdict.dest is None
    else:
        assert verdict.packet is None


def test_every_figure_9_cell_has_a_fixture() -> None:
    cells = {expected.cell for _, expected in (p.values for p in TABLE_CASES)}
    assert {f"{row}>{column}" for row in ROWS for column in COLUMNS} <= cells


@pytest.mark.parametrize("dport", [80, 443, 8080])
@pytest.mark.parametrize("vip", [VIP, XV_FREE])
def test_hash_src_ignores_destination_and_ports(core: Distributor, vip: str, dport: int) -> None:
    """Hash-src must depend on the client address alone: every port, both VIPs, one TM per client."""
    for host in range(100, 140):
        client = f"198.51.100.{host}"
        tms = {core.from_tun(P.tcp(client, sport, vip, dport)).tm for sport in (1024, 40000, 65535)}
        assert tms == {_expected_tm(core, client)}


def test_hash_spreads_clients_over_the_fleet(core: Distributor) -> None:
    tms = {core.from_tun(P.tcp(f"198.51.100.{host}", 40000, VIP, 80)).tm for host in range(100, 200)}
    assert tms == {"tm1", "tm2", "tm3"}


def test_reference_lab_plain_host_reply_is_routed() -> None:
    """docs/reference-lab.md: the reply of the plain inside host .50 to a client is `unknown → unknown`,
    routed by the kernel. (With .50 inside sets.nat_able it would be `nat-able → unknown` = hash dst, and
    reach a TM that has no state for it.)"""
    core = distributor(reference_text())
    verdict = core.from_tun(P.tcp("203.0.113.50", 80, "198.51.100.10", 40000, flags=P.TCP_SYN | P.TCP_ACK))
    assert (verdict.action, verdict.reason) == ("forward", "route")


def test_addr_port_key_hashes_port_except_for_fragments() -> None:
    """`hash.key = "addr+port"`: whole packets hash address + port; fragments (first or not) hash the
    address alone, because a non-first fragment has no port — the documented caveat of addr+port."""
    core = distributor(CELLS.replace('seed = "test-seed-0123456789abcdef"', 'seed = "test-seed-0123456789abcdef"\nkey = "addr+port"'))

    def decision_key(packet: bytes) -> bytes | None:
        flow = parse_flow(packet)
        assert not isinstance(flow, str)
        return core.decide(flow).key

    client = P.packed(CLIENT)
    assert decision_key(P.tcp(CLIENT, 40000, VIP, 80)) == client + (40000).to_bytes(2, "big")
    assert decision_key(P.udp(CLIENT, 40000, VIP, 80, payload=b"x" * 32, mf=True)) == client
    assert decision_key(P.ipv4(CLIENT, VIP, 17, b"x" * 32, offset_units=4)) == client
    # The reply hashes the client's port too, so the two directions still meet.
    assert decision_key(P.tcp(NODE, 80, CLIENT, 40000)) == client + (40000).to_bytes(2, "big")
