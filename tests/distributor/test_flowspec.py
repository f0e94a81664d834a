"""`overlay explain`'s inputs and trace against the independent test helpers: a flow spec must build the
packet tests/distributor/packets.py builds (same flow, valid checksums, same fragment offset), and the
trace must report the verdict `from_tun` gives."""

from __future__ import annotations

import struct

import dpkt
import pytest

from overlay.explain import explain
from overlay.flowspec import build_packet
from overlay.packet import parse_flow
from tests.distributor import packets as P
from tests.distributor.configs import CELLS, distributor
from tests.distributor.test_decide import TABLE_CASES

C4, V4, C6, V6 = "198.51.100.10", "203.0.113.80", "2001:db8:1::10", "2001:db8:80::80"

SPECS = [
    # description, spec, the same packet from the test helpers
    ("v4 TCP SYN", f"tcp {C4}:40000 > {V4}:80", P.tcp(C4, 40000, V4, 80)),
    ("v6 UDP with payload", f"udp [{C6}]:5353 > [{V6}]:53 size 10", P.udp(C6, 5353, V6, 53, payload=bytes(10))),
    ("v4 echo request", f"icmp {C4} > {V4} echo id 7", P.echo(C4, V4, 7)),
    ("v6 echo reply", f"icmp {V6} > {C6} reply id 9", P.echo(V6, C6, 9, request=False)),
    ("v4 frag-needed quoting TCP", f"icmp 192.0.2.1 > {C4} frag-needed mtu 1400 quoting tcp {C4}:40000 > {V4}:80",
     P.icmp_error("192.0.2.1", P.tcp(C4, 40000, V4, 80))),
    ("v6 too-big quoting UDP", f"icmp 2001:db8:1::1 > {C6} too-big mtu 1280 quoting udp [{C6}]:1 > [{V6}]:2",
     P.icmp_error("2001:db8:1::1", P.udp(C6, 1, V6, 2), mtu=1280)),
    ("v4 non-first fragment", f"udp {C4}:1 > {V4}:2 frag", P.ipv4(C4, V4, 17, bytes(8), offset_units=185)),
    ("v6 non-first fragment", f"udp [{C6}]:1 > [{V6}]:2 frag", P.ipv6(C6, V6, 17, bytes(8), extensions=((P.FRAGMENT, P.fragment_body(185, False)),))),
]


def fragment_offset_bytes(packet: bytes) -> int | None:
    if packet[0] >> 4 == 4:
        return dpkt.ip.IP(packet).offset * 8
    fragment = dpkt.ip6.IP6(packet).extension_hdrs.get(44)
    return None if fragment is None else fragment.frag_off * 8


def checksums_verify(packet: bytes) -> bool:
    """Header, TCP/UDP (pseudo-header) and ICMP checksums, by the independent RFC 1071 routine."""
    if packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) * 4
        ok = P.verify_ipv4_header(packet)
        proto, segment, pseudo_addresses = packet[9], packet[header:], packet[12:20]
        if dpkt.ip.IP(packet).offset:
            return ok
        if proto == 1:
            return ok and P.verify_icmp(packet)
        pseudo = pseudo_addresses + struct.pack("!BBH", 0, proto, len(segment))
        return ok and P.rfc1071(pseudo + segment) == 0
    proto = packet[6]
    if proto == 44:
        return True
    segment = packet[40:]
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(segment), proto)
    return P.rfc1071(pseudo + segment) == 0


@pytest.mark.parametrize(
    ("spec", "same"),
    [pytest.param(c[1], c[2], id=c[0]) for c in SPECS],
)
def test_flow_spec_builds_the_packet_the_helpers_build(spec: str, same: bytes) -> None:
    built = build_packet(spec)
    assert parse_flow(built) == parse_flow(same)
    assert checksums_verify(built) and checksums_verify(same)
    assert fragment_offset_bytes(built) == fragment_offset_bytes(same)


@pytest.mark.parametrize(("packet", "expected"), TABLE_CASES)
def test_explain_reports_the_verdict_from_tun_gives(packet: bytes, expected: object) -> None:
    core, twin = distributor(CELLS), distributor(CELLS)
    trace = explain(core, packet)
    verdict = twin.from_tun(packet)
    assert (trace["action"], trace["tm"], trace["reason"], trace["cell"]) == (verdict.action, verdict.tm, verdict.reason, verdict.cell)
    if verdict.action == "tm":
        assert trace["first_choice"] == verdict.tm and trace["encapsulated"] == verdict.packet.hex()
