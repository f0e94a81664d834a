"""overlay.packet.parse_flow: fixture table, a differential test against dpkt over generated packets, and
"never raises" properties over every truncation and random corruption.

The dpkt oracle (`dpkt_flow`) parses with dpkt and applies the rules the parser promises in words
(ports from the first 4 transport bytes, none for non-first fragments, ICMP errors turned around); it
shares no code with overlay.packet.
"""

from __future__ import annotations

import ipaddress
import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.packet import Flow, parse_flow
from tests.distributor import packets as P

C4, V4, R4 = "198.51.100.10", "203.0.113.80", "192.0.2.1"
C6, V6, R6 = "2001:db8:1::10", "2001:db8:80::80", "2001:db8:1::1"


def flow(version: int, src: str, dst: str, proto: int, sport: int | None, dport: int | None, fragment: bool = False,
         icmp_error: bool = False, icmp_type: int | None = None) -> Flow:
    return Flow(version, P.packed(src), P.packed(dst), proto, sport, dport, fragment, icmp_error, icmp_type)


HOP = (P.HOP_BY_HOP, b"\x01\x04\0\0\0\0")  # PadN option, 8 bytes in all
DEST = (P.DEST_OPTS, b"\x01\x0c" + bytes(12))  # 16 bytes
ROUTE = (P.ROUTING, bytes([0, 0, 0, 0, 0, 0]) + bytes(16))  # type 0, one address: 24 bytes

CASES = [
    # description, packet, expected Flow or reason
    ("v4 TCP", P.tcp(C4, 40000, V4, 80), flow(4, C4, V4, 6, 40000, 80)),
    ("v4 UDP with 40 bytes of options", P.udp(C4, 53, V4, 5353, options=b"\x01" * 40), flow(4, C4, V4, 17, 53, 5353)),
    ("v4 first fragment keeps ports, marked fragment", P.udp(C4, 1, V4, 2, payload=b"x" * 32, mf=True), flow(4, C4, V4, 17, 1, 2, True)),
    ("v4 non-first fragment: no ports", P.ipv4(C4, V4, 17, b"x" * 16, offset_units=3), flow(4, C4, V4, 17, None, None, True)),
    ("v4 last fragment (offset, no MF): no ports", P.ipv4(C4, V4, 6, b"x" * 16, offset_units=1, mf=False), flow(4, C4, V4, 6, None, None, True)),
    ("v4 GRE (no ports)", P.ipv4(C4, V4, 47, b"\0\0\x08\0"), flow(4, C4, V4, 47, None, None)),
    ("v4 echo request: ports = identifier", P.echo(C4, V4, 0x1234), flow(4, C4, V4, 1, 0x1234, 0x1234, icmp_type=8)),
    ("v4 echo reply", P.echo(V4, C4, 7, request=False), flow(4, V4, C4, 1, 7, 7, icmp_type=0)),
    ("v4 frag-needed about TCP: the quoted flow, reversed", P.icmp_error(R4, P.tcp(C4, 40000, V4, 80)), flow(4, V4, C4, 6, 80, 40000, icmp_error=True, icmp_type=3)),
    ("v4 time exceeded about UDP", P.icmp_error(R4, P.udp(C4, 33434, V4, 33435), kind="time-exceeded"), flow(4, V4, C4, 17, 33435, 33434, icmp_error=True, icmp_type=11)),
    ("v4 unreachable quoting exactly 8 transport bytes", P.icmp_error(R4, P.tcp(C4, 1, V4, 2), kind="unreachable", quote=28), flow(4, V4, C4, 6, 2, 1, icmp_error=True, icmp_type=3)),
    ("v4 error about a 4-byte GRE datagram, quoted whole", P.icmp_error(R4, P.ipv4(C4, V4, 47, b"\0\0\x08\0")), flow(4, V4, C4, 47, None, None, icmp_error=True, icmp_type=3)),
    ("v4 source quench: not an error about a flow (RFC 6633)", P.ipv4(R4, C4, 1, bytes([4, 0]) + bytes(6) + P.tcp(C4, 1, V4, 2)[:28]), flow(4, R4, C4, 1, None, None, icmp_type=4)),
    ("v4 redirect: not an error about a flow", P.ipv4(R4, C4, 1, bytes([5, 1, 0, 0]) + P.packed(R4) + P.tcp(C4, 1, V4, 2)[:28]), flow(4, R4, C4, 1, None, None, icmp_type=5)),
    ("v4 error about an echo request: identifier both ways", P.icmp_error(R4, P.echo(C4, V4, 99)), flow(4, V4, C4, 1, 99, 99, icmp_error=True, icmp_type=3)),
    ("v4 error about a non-first fragment", P.icmp_error(R4, P.ipv4(C4, V4, 17, b"q" * 16, offset_units=9)), flow(4, V4, C4, 17, None, None, True, True, 3)),
    ("v4 error quoting a header with options", P.icmp_error(R4, P.tcp(C4, 5, V4, 6, options=b"\x01" * 8)), flow(4, V4, C4, 6, 6, 5, icmp_error=True, icmp_type=3)),
    ("v4 fragmented ICMP error: own addresses, no turn-around", P.ipv4(R4, C4, 1, bytes([3, 4, 0, 0, 0, 0, 5, 0xDC]) + P.tcp(C4, 1, V4, 2)[:28], mf=True), flow(4, R4, C4, 1, None, None, True, False, 3)),
    ("v4 other ICMP (timestamp)", P.ipv4(C4, V4, 1, bytes([13, 0]) + bytes(18)), flow(4, C4, V4, 1, None, None, icmp_type=13)),
    # The edges of parse_flow's fast path (IPv4 without options, IPv6 without extension headers): read by it, or
    # declined by it and read by the checked walk, the same answers.
    ("v4 UDP without data: the shortest fast-path packet", P.udp(C4, 1, V4, 2), flow(4, C4, V4, 17, 1, 2)),
    ("v4 TCP, bytes after the total length", P.tcp(C4, 3, V4, 4) + bytes(7), flow(4, C4, V4, 6, 3, 4)),
    ("v4 error about a first fragment: marked fragment", P.icmp_error(R4, P.udp(C4, 5, V4, 6, payload=b"x" * 32, mf=True)), flow(4, V4, C4, 17, 6, 5, True, True, 3)),
    ("v4 error about a later fragment with 8 bytes quoted", P.icmp_error(R4, P.ipv4(C4, V4, 6, b"q" * 16, offset_units=2)), flow(4, V4, C4, 6, None, None, True, True, 3)),
    ("v6 UDP without data", P.udp(C6, 7, V6, 8), flow(6, C6, V6, 17, 7, 8)),
    ("v6 TCP", P.tcp(C6, 40000, V6, 80), flow(6, C6, V6, 6, 40000, 80)),
    ("v6 UDP behind hop-by-hop and dest opts", P.ipv6(C6, V6, 17, P.transport(17, 7, 8), extensions=(HOP, DEST)), flow(6, C6, V6, 17, 7, 8)),
    ("v6 routing header: decided on addresses, no ports", P.ipv6(C6, V6, 17, P.transport(17, 7, 8), extensions=(HOP, ROUTE, DEST)), flow(6, C6, V6, 43, None, None)),
    ("v6 first fragment keeps ports", P.ipv6(C6, V6, 6, P.transport(6, 1, 2), extensions=(HOP, (P.FRAGMENT, P.fragment_body(0, True)))), flow(6, C6, V6, 6, 1, 2, True)),
    ("v6 non-first fragment: no ports", P.ipv6(C6, V6, 17, b"x" * 16, extensions=((P.FRAGMENT, P.fragment_body(2, False)),)), flow(6, C6, V6, 17, None, None, True)),
    ("v6 AH then TCP: decided on addresses, no ports", P.ipv6(C6, V6, 51, bytes([6, 1, 0, 0]) + bytes(8) + bytes(P.transport(6, 3, 4))), flow(6, C6, V6, 51, None, None)),
    ("v6 echo request", P.echo(C6, V6, 0xBEEF), flow(6, C6, V6, 58, 0xBEEF, 0xBEEF, icmp_type=128)),
    ("v6 packet too big about TCP: reversed", P.icmp_error(R6, P.tcp(C6, 40000, V6, 443, payload=b"p" * 1300)), flow(6, V6, C6, 6, 443, 40000, icmp_error=True, icmp_type=2)),
    ("v6 packet too big about TCP behind hop-by-hop and a first fragment header", P.icmp_error(R6, P.ipv6(C6, V6, 6, P.transport(6, 1, 2), extensions=(HOP, (P.FRAGMENT, P.fragment_body(0, True))))), flow(6, V6, C6, 6, 2, 1, True, icmp_error=True, icmp_type=2)),
    ("v6 time exceeded about UDP behind extensions", P.icmp_error(R6, P.ipv6(C6, V6, 17, P.transport(17, 9, 10), extensions=(HOP, DEST)), kind="time-exceeded"), flow(6, V6, C6, 17, 10, 9, icmp_error=True, icmp_type=3)),
    ("v6 no next header (59)", P.ipv6(C6, V6, 59, b""), flow(6, C6, V6, 59, None, None)),
    # Negative cases.
    ("empty", b"", "malformed:empty"),
    ("version 0", bytes(40), "malformed:bad-ip-version"),
    ("v4 shorter than a header", P.tcp(C4, 1, V4, 2)[:12], "malformed:truncated-ipv4"),
    ("v4 IHL 3", b"\x43" + P.tcp(C4, 1, V4, 2)[1:], "malformed:bad-ipv4-header-length"),
    ("v4 IHL beyond the packet", b"\x4f" + P.ipv4(C4, V4, 59, b"")[1:], "malformed:bad-ipv4-total-length"),
    ("v4 total length < IHL", (lambda p: p[:2] + b"\0\x10" + p[4:])(P.tcp(C4, 1, V4, 2)), "malformed:bad-ipv4-total-length"),
    ("v4 TCP header cut to 19 bytes", P.ipv4(C4, V4, 6, bytes(bytes(P.transport(6, 1, 2))[:19])), "malformed:truncated-tcp"),
    ("v4 ICMP of 7 bytes", P.ipv4(C4, V4, 1, bytes([8, 0]) + bytes(5)), "malformed:truncated-icmp"),
    ("v4 error quoting 3 bytes of UDP", P.icmp_error(R4, P.udp(C4, 1, V4, 2), quote=23), "malformed:bad-icmp-error-inner"),
    ("v4 error quoting 4 bytes of TCP (RFC 792: 8)", P.icmp_error(R4, P.tcp(C4, 1, V4, 2), quote=24), "malformed:bad-icmp-error-inner"),
    ("v4 TCP data offset past the packet", P.ipv4(C4, V4, 6, bytes(12) + b"\xf0" + bytes(7)), "malformed:bad-tcp-data-offset"),
    ("v4 UDP length below 8", P.ipv4(C4, V4, 17, b"\0\1\0\2\0\4\0\0"), "malformed:bad-udp-length"),
    ("v4 UDP length one past the packet", P.ipv4(C4, V4, 17, b"\0\1\0\2\0\x0d\0\0data"), "malformed:bad-udp-length"),
    ("v4 TCP data offset one word past the packet", P.ipv4(C4, V4, 6, bytes(12) + b"\x60" + bytes(7)), "malformed:bad-tcp-data-offset"),
    ("v4 error quoting 7 bytes of UDP", P.icmp_error(R4, P.udp(C4, 1, V4, 2), quote=27), "malformed:bad-icmp-error-inner"),
    ("v6 TCP data offset one word past the packet", P.ipv6(C6, V6, 6, bytes(12) + b"\x60" + bytes(7)), "malformed:bad-tcp-data-offset"),
    ("v4 error quoting v6", P.ipv4(R4, C4, 1, bytes([3, 4]) + bytes(6) + P.udp(C6, 1, V6, 2)), "malformed:bad-icmp-error-inner"),
    ("v6 shorter than a header", P.tcp(C6, 1, V6, 2)[:39], "malformed:truncated-ipv6"),
    ("v6 payload length beyond the packet", P.tcp(C6, 1, V6, 2)[:-1], "malformed:truncated-ipv6"),
    ("v6 extension header length beyond the packet", P.ipv6(C6, V6, 0, bytes([17, 200]) + bytes(6)), "malformed:truncated-ipv6-extension"),
    ("v6 nine hop-by-hop headers", P.ipv6(C6, V6, 17, P.transport(17, 1, 2), extensions=(HOP,) * 9), "malformed:ipv6-extension-chain-too-long"),
    ("v6 error quoting v4", P.ipv6(R6, C6, 58, bytes([1, 0]) + bytes(6) + P.udp(C4, 1, V4, 2)), "malformed:bad-icmp-error-inner"),
    ("v6 error quoting 4 bytes of UDP behind dest opts", P.icmp_error(R6, P.ipv6(C6, V6, 17, P.transport(17, 1, 2), extensions=(DEST,)), quote=60), "malformed:bad-icmp-error-inner"),
]


@pytest.mark.parametrize(("packet", "expected"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_parse_flow(packet: bytes, expected: Flow | str) -> None:
    assert parse_flow(packet) == expected


@pytest.mark.parametrize(("packet", "expected"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES if isinstance(c[2], Flow)])
def test_fixture_agrees_with_dpkt(packet: bytes, expected: Flow) -> None:
    assert dpkt_flow(packet) == expected


# -- the dpkt oracle -------------------------------------------------------------------------------------------
V4_ERRORS, V6_ERRORS = {3, 11, 12}, {1, 2, 3, 4}  # errors about a flow: not source quench (4), not redirect (5)
WALKED = {0, 60}  # IPv6 extension headers looked past (hop-by-hop, destination options) besides the fragment header
V4_ECHO, V6_ECHO = {0, 8}, {128, 129}


def _ports(data: object) -> tuple[int, int]:
    if isinstance(data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        return data.sport, data.dport
    return struct.unpack("!HH", bytes(data)[:4])  # dpkt left a truncated quote as bytes


def dpkt_flow(packet: bytes, quoted: bool = False) -> Flow:
    version = packet[0] >> 4
    if version == 4:
        ip = dpkt.ip.IP(packet)
        fragment = bool(ip.mf or ip.offset)
        proto, src, dst = ip.p, ip.src, ip.dst
        if ip.offset:
            return Flow(4, src, dst, proto, None, None, True, False)
        payload = bytes(ip.data)
    else:
        ip = dpkt.ip6.IP6(packet)
        src, dst = ip.src, ip.dst
        proto, fragment = ip.nxt, False
        for header in ip.all_extension_headers:  # in order; `proto` is the type of `header`
            if proto == P.FRAGMENT:
                fragment = True
                if header.frag_off:
                    return Flow(6, src, dst, header.nxt, None, None, True, False)
            elif proto not in WALKED:  # routing, AH, ...: no ports looked for past it
                return Flow(6, src, dst, proto, None, None, fragment, False)
            proto = header.nxt
        payload = bytes(ip.data)
    if proto in (6, 17):
        sport, dport = _ports(ip.data)
        return Flow(version, src, dst, proto, sport, dport, fragment, False)
    if proto == (1 if version == 4 else 58):
        icmp_type = payload[0]
        if icmp_type in (V4_ERRORS if version == 4 else V6_ERRORS) and not quoted:
            if fragment:
                return Flow(version, src, dst, proto, None, None, True, False, icmp_type)
            inner = dpkt_flow(payload[8:], quoted=True)
            return Flow(version, inner.dst, inner.src, inner.proto, inner.dport, inner.sport, inner.fragment, True, icmp_type)
        if icmp_type in (V4_ECHO if version == 4 else V6_ECHO) and len(payload) >= 8:
            ident = struct.unpack_from("!H", payload, 4)[0]
            return Flow(version, src, dst, proto, ident, ident, fragment, False, icmp_type)
        return Flow(version, src, dst, proto, None, None, fragment, False, icmp_type)
    return Flow(version, src, dst, proto, None, None, fragment, False)


# -- generated packets ----------------------------------------------------------------------------------------
ports = st.integers(0, 65535)
v4_addresses = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6_addresses = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
payloads = st.binary(max_size=64)


@st.composite
def v6_extensions(draw: st.DrawFn, fragment: str) -> tuple[tuple[int, bytes], ...]:
    chain: list[tuple[int, bytes]] = []
    for kind in draw(st.lists(st.sampled_from([P.HOP_BY_HOP, P.DEST_OPTS, P.ROUTING]), max_size=3)):
        if kind == P.ROUTING:
            # Type 0 with whole addresses: dpkt 1.9.8 mis-sizes routing headers of odd length (it reads
            # len // 2 addresses), so the oracle would be wrong, not the parser.
            chain.append((kind, bytes(6) + bytes(16 * draw(st.integers(0, 2)))))
        else:
            padding = draw(st.integers(0, 30))
            chain.append((kind, b"\x01" + bytes([padding]) + bytes(padding)))  # one PadN option
    if fragment != "none":
        offset = 0 if fragment == "first" else draw(st.integers(1, 8191))
        chain.append((P.FRAGMENT, P.fragment_body(offset, fragment == "first" or draw(st.booleans()), draw(ports))))
    return tuple(chain)


@st.composite
def plain_packets(draw: st.DrawFn, version: int | None = None) -> bytes:
    """TCP, UDP, ICMP echo or another protocol over IPv4 (with options) or IPv6 (with extensions), whole,
    first fragment or non-first fragment."""
    version = version or draw(st.sampled_from([4, 6]))
    addresses = v4_addresses if version == 4 else v6_addresses
    src, dst = draw(addresses), draw(addresses)
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "other"]))
    fragment = draw(st.sampled_from(["none", "none", "first", "later"]))
    if kind in ("tcp", "udp"):
        proto = 6 if kind == "tcp" else 17
        data: bytes = bytes(P.transport(proto, draw(ports), draw(ports), payload=draw(payloads)))
    elif kind == "echo":
        proto = 1 if version == 4 else 58
        echo_type = draw(st.sampled_from([0, 8] if version == 4 else [128, 129]))
        data = struct.pack("!BBHHH", echo_type, 0, 0, draw(ports), draw(ports)) + draw(payloads)
    else:
        proto = draw(st.sampled_from([47, 132, 89]))  # not ESP: dpkt treats it as an IPv6 extension
        data = draw(payloads)
    if fragment == "later":
        data = draw(st.binary(min_size=8, max_size=64))
    if version == 4:
        options = bytes([1]) * (4 * draw(st.integers(0, 10)))
        offset = draw(st.integers(1, 8191)) if fragment == "later" else 0
        more = fragment == "first" or (fragment == "later" and draw(st.booleans()))
        return P.ipv4(src, dst, proto, data, options=options, mf=more, offset_units=offset, df=draw(st.booleans()))
    return P.ipv6(src, dst, proto, data, extensions=draw(v6_extensions(fragment)))


@st.composite
def icmp_errors(draw: st.DrawFn) -> bytes:
    """An ICMP error from a random router about a generated packet, quoting header + 8 (v4, as RFC 792)
    or the whole packet (v6, as RFC 4443 for small packets)."""
    about = draw(plain_packets())
    version = about[0] >> 4
    router = draw(v4_addresses if version == 4 else v6_addresses)
    return P.icmp_error(router, about, kind=draw(st.sampled_from(["too-big", "unreachable", "time-exceeded"])))


any_packet = st.one_of(plain_packets(), icmp_errors())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_packet)
def test_differential_against_dpkt(packet: bytes) -> None:
    assert parse_flow(packet) == dpkt_flow(packet)


@settings(max_examples=150, deadline=None)
@given(any_packet)
def test_every_truncation_is_malformed_never_an_exception(packet: bytes) -> None:
    """Every strict prefix of a valid packet is refused with a reason: IPv4 total length and IPv6
    payload length both say the packet is cut short, so no prefix may pass as a smaller packet."""
    assert isinstance(parse_flow(packet), Flow)
    for length in range(len(packet)):
        result = parse_flow(packet[:length])
        assert isinstance(result, str) and result.startswith("malformed:"), (length, result)


@settings(max_examples=300, deadline=None)
@given(any_packet, st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6))
def test_corruption_never_raises(packet: bytes, flips: list[tuple[int, int]]) -> None:
    corrupt = bytearray(packet)
    for where, value in flips:
        corrupt[where % len(corrupt)] = value
    result = parse_flow(bytes(corrupt))
    assert isinstance(result, Flow) or result.startswith("malformed:")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse_flow(data)
    assert isinstance(result, Flow) or result.startswith("malformed:")
