"""The two roles' parsers agree: `overlay.packet.parse_flow` (the distributor) and the TM's `parse_ip` /
`parse_fragment` / `parse_first_fragment` / `parse_transport` (overlay/tm/packet.py) must say the same about
every packet on what they both report: addresses, protocol, ports or echo identifier, whether it is an ICMP
error and which flow it quotes, fragment facts, and malformed or not.

A packet the distributor decides on but the TM calls malformed is sent to a TM only to be dropped; a packet
the distributor refuses but the TM would track is lost; an ICMP error the distributor turns around but the
TM does not recognise (or the reverse) reaches a TM that cannot relate it. Each disagreement found when the
parsers were two (issue 12) is a fixture case below; the property test looks for new ones over generated
valid and mutated packets. The decisions are in docs/wire-format.md ("IP, ICMP and IPv6 extension headers").

The distributor's `parse_flow` reads the common packet (IPv4 without options / IPv6 without extension headers,
TCP or UDP, ICMPv4 echo or an error about IPv4 TCP/UDP) on a fast path of its own and everything else through
the views (`parse_flow_checked`). The fast path is held to the walk it shortcuts — the same answer for every
packet, on the generated packets here and on packets of its shapes with the fields it tests set at random —
and the agreement tests run over those packets too.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import packet as distributor_packet
from overlay.packet import parse_flow, parse_flow_checked
from overlay.tm import reasons as R
from overlay.tm.packet import IcmpError, parse_first_fragment, parse_fragment, parse_ip, parse_transport


def examples(count: int) -> int:
    """All of them in CI (CI=true); a fifth in the fast suite, which must stay under a minute."""
    return count if os.environ.get("CI") == "true" else count // 5


HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS = 0, 43, 44, 60
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
ICMP_OF = {4: ICMP, 6: ICMPV6}
ECHO_TYPES = {4: (8, 0), 6: (128, 129)}
ERROR_TYPES = {4: (3, 4, 5, 11, 12), 6: (1, 2, 3, 4)}  # every error type of RFC 792 and RFC 4443
OTHER_ICMP_TYPES = {4: (9, 10, 13, 14, 40), 6: (130, 133, 134, 135, 136)}


# -- building packets (by hand: every field, and every wrong field, is ours to choose) ------------------------
def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, flags_offset: int = 0, options: bytes = b"") -> bytes:
    header = 20 + len(options)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | header // 4, 0, header + len(payload), 7, flags_offset, 64, proto, 0,
                       src, dst) + options + payload


def extension(kind: int, next_header: int, units: int = 0, fragment: tuple[int, bool] = (0, False)) -> bytes:
    """One IPv6 extension header: options headers of (units + 1) * 8 bytes (one PadN), a routing header,
    or a fragment header at `fragment` = (offset in 8-byte units, more fragments)."""
    if kind == FRAGMENT:
        offset, more = fragment
        return struct.pack("!BBHI", next_header, 0, offset << 3 | more, 99)
    if kind == ROUTING:
        return bytes([next_header, units, 0, 0]) + bytes(4 + 8 * units)
    return bytes([next_header, units, 1, 4 + 8 * units]) + bytes(4 + 8 * units)


def ipv6(src: bytes, dst: bytes, chain: list[tuple[int, int, tuple[int, bool]]], proto: int, payload: bytes) -> bytes:
    kinds = [kind for kind, _, _ in chain] + [proto]
    headers = b"".join(extension(kind, kinds[i + 1], units, fragment) for i, (kind, units, fragment) in enumerate(chain))
    body = headers + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), kinds[0], 64, src, dst) + body


def tcp(sport: int, dport: int, flags: int = 0x10, options: bytes = b"", data: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, (5 + len(options) // 4) << 4, flags, 65535, 0, 0) + options + data


def udp(sport: int, dport: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp(kind: int, code: int = 0, rest: bytes = bytes(4), body: bytes = b"") -> bytes:
    return struct.pack("!BBH", kind, code, 0) + rest + body


def echo(kind: int, ident: int, data: bytes = b"ping") -> bytes:
    return icmp(kind, 0, struct.pack("!HH", ident, 1), data)


A4, B4, R4 = (ipaddress.ip_address(a).packed for a in ("198.51.100.10", "203.0.113.80", "192.0.2.1"))
A6, B6, R6 = (ipaddress.ip_address(a).packed for a in ("2001:db8:1::10", "2001:db8:80::80", "2001:db8:1::1"))
HOP = (HOP_BY_HOP, 0, (0, False))
DEST = (DEST_OPTS, 1, (0, False))


def first_fragment(more: bool = True) -> tuple[int, int, tuple[int, bool]]:
    return (FRAGMENT, 0, (0, more))


def later_fragment(offset: int = 3) -> tuple[int, int, tuple[int, bool]]:
    return (FRAGMENT, 0, (offset, False))


# -- what each parser reports, in one vocabulary ----------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """`outcome`: "flow" (a flow: for ICMP errors the quoted one, turned around), "malformed", "refused" (valid,
    but the parser will not say more: the TM does not track it, or the distributor refuses it), "error" (an ICMP
    error whose quote names no flow with ports), "portless" (a flow without ports: protocols without ports,
    ICMP that is neither echo nor an error, non-first fragments, a fragmented ICMP error)."""

    outcome: str
    version: int = 0
    src: bytes = b""
    dst: bytes = b""
    proto: int = 0
    ports: tuple[int, int] | None = None
    icmp_error: bool = False
    fragment: bool | None = None  # None: this parser does not say (the TM, about the packet an error quotes)


def by_distributor(packet: bytes) -> Seen:
    flow = parse_flow(packet)
    if isinstance(flow, str):
        return Seen("malformed" if flow.startswith("malformed:") else "refused")
    ports = None if flow.sport is None or flow.dport is None else (flow.sport, flow.dport)
    outcome = "flow" if ports is not None else ("error" if flow.icmp_error else "portless")
    return Seen(outcome, flow.version, flow.src, flow.dst, flow.proto, ports, flow.icmp_error, flow.fragment)


def _key_ports(key: bytes, version: int, proto: int) -> tuple[bytes, bytes, tuple[int, int]]:
    length = 4 if version == 4 else 16
    src, dst, tail = key[:length], key[length:2 * length], key[2 * length:]
    if proto in (TCP, UDP):
        return src, dst, struct.unpack("!HH", tail)
    ident = int.from_bytes(tail[1:3], "big")  # the echo mark, then the identifier
    return src, dst, (ident, ident)


def _tm_reason(reason: str, version: int, packet: bytes, fragment: bool) -> Seen:
    if reason.startswith("malformed:"):
        return Seen("malformed")
    if reason == R.INVALID_ICMP_NO_STATE:
        return Seen("error", version, icmp_error=True)
    if reason in (R.UNSUPPORTED_PROTOCOL, R.UNSUPPORTED_ICMP_TYPE, R.UNSUPPORTED_FRAGMENT):
        addresses = packet[12:20] if version == 4 else packet[8:40]
        half = len(addresses) // 2
        return Seen("portless", version, addresses[:half], addresses[half:], fragment=fragment)
    return Seen("refused")


def by_tm(packet: bytes) -> Seen:
    parsed = parse_ip(packet)
    fragment = parsed == R.FRAGMENT
    if fragment:
        parsed_fragment = parse_fragment(packet)
        if isinstance(parsed_fragment, str):
            return _tm_reason(parsed_fragment, 0, packet, True)
        version, protocol, l4, end, _datagram, first = parsed_fragment
        if not first:
            return Seen("portless", version, *_addresses(packet, version), protocol, fragment=True)
        found: tuple[bytes, int] | IcmpError | str = parse_first_fragment(packet, version, protocol, l4, end)
    elif isinstance(parsed, str):
        return _tm_reason(parsed, 0, packet, False)
    else:
        version, protocol, l4, end = parsed
        found = parse_transport(packet, version, protocol, l4, end)
    if isinstance(found, str):
        return _tm_reason(found, version, packet, fragment)
    if isinstance(found, IcmpError):
        src, dst, ports = _key_ports(found.key, version, found.inner_protocol)
        return Seen("flow", version, src, dst, found.inner_protocol, ports, True)
    src, dst, ports = _key_ports(found[0], version, protocol)
    return Seen("flow", version, src, dst, protocol, ports, False, fragment)


def _addresses(packet: bytes, version: int) -> tuple[bytes, bytes]:
    return (packet[12:16], packet[16:20]) if version == 4 else (packet[8:24], packet[24:40])


def disagreement(packet: bytes) -> str | None:
    """What the two parsers disagree on, in words, or None."""
    tm, dist = by_tm(packet), by_distributor(packet)
    if (tm.outcome == "malformed") != (dist.outcome == "malformed"):
        return f"malformed for one only: TM {tm.outcome}, distributor {dist.outcome}"
    if dist.outcome == "refused" and tm.outcome not in ("malformed", "refused"):
        return f"the distributor refuses what the TM reports as {tm.outcome}"
    if tm.outcome in ("malformed", "refused") or dist.outcome in ("malformed", "refused"):
        return None
    if tm.outcome != dist.outcome:
        return f"TM {tm}, distributor {dist}"
    if tm.outcome == "error":
        return None if dist.icmp_error else "an ICMP error for the TM only"
    fields = ["version", "src", "dst", "ports", "icmp_error"] + (["proto"] if tm.outcome == "flow" else [])
    if tm.fragment is not None:
        fields.append("fragment")
    differ = [f"{name}: TM {getattr(tm, name)!r} vs distributor {getattr(dist, name)!r}"
              for name in fields if getattr(tm, name) != getattr(dist, name)]
    return "; ".join(differ) or None


# -- every disagreement found when the parsers were two, and how it was settled ----------------------------------
TCP4 = ipv4(A4, B4, TCP, tcp(40000, 80))
UDP6 = ipv6(A6, B6, [], UDP, udp(5353, 53, b"q"))
CASES = [
    # ICMPv4 source quench (4) and redirect (5): neither is related to a flow (RFC 6633 deprecates source
    # quench; Linux NAT drops redirects about NATed connections). Both parsers: plain ICMP, no turn-around.
    ("v4 source quench is not a flow error", ipv4(R4, A4, ICMP, icmp(4, 0, bytes(4), TCP4[:28]))),
    ("v4 redirect is not a flow error", ipv4(R4, A4, ICMP, icmp(5, 1, R4, TCP4[:28]))),
    # ICMPv6 errors quoting extension headers: the quoted transport header is found after walking them.
    ("v6 too-big quoting hop-by-hop", ipv6(R6, A6, [], ICMPV6, icmp(2, 0, struct.pack("!I", 1280),
                                                                   ipv6(A6, B6, [HOP], TCP, tcp(1, 2))))),
    ("v6 unreachable quoting dest opts", ipv6(R6, A6, [], ICMPV6, icmp(1, 4, bytes(4), ipv6(A6, B6, [DEST], UDP, udp(3, 4))))),
    ("v6 time exceeded quoting hop-by-hop and dest opts", ipv6(R6, A6, [], ICMPV6,
                                                              icmp(3, 0, bytes(4), ipv6(A6, B6, [HOP, DEST], UDP, udp(5, 6))))),
    ("v6 parameter problem quoting a first fragment", ipv6(R6, A6, [], ICMPV6,
                                                          icmp(4, 0, bytes(4), ipv6(A6, B6, [first_fragment()], TCP, tcp(7, 8))))),
    ("v6 error quoting a later fragment", ipv6(R6, A6, [], ICMPV6,
                                              icmp(1, 0, bytes(4), ipv6(A6, B6, [later_fragment()], UDP, bytes(16))))),
    ("v6 error quoting an echo behind dest opts", ipv6(R6, A6, [], ICMPV6,
                                                      icmp(1, 0, bytes(4), ipv6(A6, B6, [DEST], ICMPV6, echo(128, 77))))),
    # A quote shorter than the IP header + 8 transport bytes (RFC 792, RFC 1812 4.3.2.3): malformed for both.
    ("v4 error quoting 4 TCP bytes", ipv4(R4, A4, ICMP, icmp(3, 3, bytes(4), TCP4[:24]))),
    ("v4 error quoting 6 bytes of an echo", ipv4(R4, A4, ICMP, icmp(11, 0, bytes(4), ipv4(A4, B4, ICMP, echo(8, 5))[:26]))),
    ("v6 error quoting 4 UDP bytes", ipv6(R6, A6, [], ICMPV6, icmp(1, 4, bytes(4), UDP6[:44]))),
    ("v4 error quoting a later fragment with 4 data bytes",
     ipv4(R4, A4, ICMP, icmp(3, 1, bytes(4), ipv4(A4, B4, UDP, bytes(16), flags_offset=9)[:24]))),
    # TCP and UDP headers are checked alike: data offset within the packet, UDP length within [8, the packet].
    ("TCP data offset past the packet", ipv4(A4, B4, TCP, tcp(1, 2)[:12] + b"\xf0" + tcp(1, 2)[13:])),
    ("UDP length below 8", ipv4(A4, B4, UDP, struct.pack("!HHHH", 1, 2, 4, 0))),
    ("UDP length past the packet", ipv6(A6, B6, [], UDP, struct.pack("!HHHH", 1, 2, 200, 0))),
    # Valid cases the parsers always agreed on: the fixture is also the table of what agreement means.
    ("v4 TCP", TCP4),
    ("v6 UDP behind hop-by-hop", ipv6(A6, B6, [HOP], UDP, udp(1, 2))),
    ("v4 unreachable about TCP", ipv4(R4, A4, ICMP, icmp(3, 3, bytes(4), TCP4[:28]))),
    ("v6 echo behind a first fragment header", ipv6(A6, B6, [first_fragment()], ICMPV6, echo(128, 9))),
    ("v4 later fragment", ipv4(A4, B4, UDP, bytes(24), flags_offset=0x2000 | 5)),
    ("v6 routing header: refused by the TM, decided without ports", ipv6(A6, B6, [(ROUTING, 2, (0, False))], TCP, tcp(1, 2))),
]


@pytest.mark.parametrize("packet", [pytest.param(case[1], id=case[0]) for case in CASES])
def test_fixture_parsers_agree(packet: bytes) -> None:
    assert disagreement(packet) is None


def test_icmpv6_error_quoting_extension_headers_names_the_quoted_flow() -> None:
    quoted = ipv6(A6, B6, [HOP, DEST], TCP, tcp(40000, 443))
    packet = ipv6(R6, A6, [], ICMPV6, icmp(2, 0, struct.pack("!I", 1280), quoted))
    for seen in (by_tm(packet), by_distributor(packet)):
        assert (seen.outcome, seen.src, seen.dst, seen.proto, seen.ports, seen.icmp_error) == \
            ("flow", B6, A6, TCP, (443, 40000), True)


# -- generated packets ---------------------------------------------------------------------------------------------
ports = st.integers(0, 65535)
payloads = st.binary(max_size=24)


@st.composite
def chains(draw: st.DrawFn, fragment: str) -> list[tuple[int, int, tuple[int, bool]]]:
    """An IPv6 extension chain: options headers (and sometimes a routing header) before a fragment header of the
    given kind ("none", "first", "later"), and options headers after a first fragment's."""
    chain = [(draw(st.sampled_from([HOP_BY_HOP, DEST_OPTS, DEST_OPTS, ROUTING])), draw(st.integers(0, 2)), (0, False))
             for _ in range(draw(st.integers(0, 2)))]
    if fragment == "first":
        chain.append(first_fragment(draw(st.booleans())))
        chain += [DEST] * draw(st.integers(0, 1))
    elif fragment == "later":
        chain.append(later_fragment(draw(st.integers(1, 8191))))
    return chain


@st.composite
def packets(draw: st.DrawFn, depth: int = 0) -> bytes:
    """TCP, UDP, ICMP echo, another ICMP type, an ICMP error of any type quoting a generated packet cut to any
    length, or a protocol without ports; over IPv4 (options, fragments) or IPv6 (extension chains, fragments)."""
    version = draw(st.sampled_from([4, 6]))
    src, dst = (draw(st.binary(min_size=4 if version == 4 else 16, max_size=4 if version == 4 else 16)) for _ in "ab")
    kinds = ["tcp", "udp", "echo", "other-icmp", "portless"] + (["error", "error"] if depth == 0 else [])
    kind = draw(st.sampled_from(kinds))
    fragment = draw(st.sampled_from(["none", "none", "none", "first", "later"]))
    if kind == "tcp":
        proto, body = TCP, tcp(draw(ports), draw(ports), draw(st.integers(0, 255)), bytes(4 * draw(st.integers(0, 3))),
                               draw(payloads))
    elif kind == "udp":
        proto, body = UDP, udp(draw(ports), draw(ports), draw(payloads))
    elif kind == "echo":
        proto, body = ICMP_OF[version], echo(draw(st.sampled_from(ECHO_TYPES[version])), draw(ports), draw(payloads))
    elif kind == "other-icmp":
        proto, body = ICMP_OF[version], icmp(draw(st.sampled_from(OTHER_ICMP_TYPES[version])), body=draw(payloads))
    elif kind == "portless":
        proto, body = draw(st.sampled_from([47, 50, 59, 132])), draw(payloads)
    else:
        about = draw(packets(depth=1).filter(lambda p: p[0] >> 4 == version))
        quote = about[:draw(st.integers(0, len(about)))] if draw(st.booleans()) else about
        proto = ICMP_OF[version]
        body = icmp(draw(st.sampled_from(ERROR_TYPES[version])), draw(st.integers(0, 5)), bytes(4), quote)
    if fragment == "later":
        body = draw(st.binary(min_size=8, max_size=32))
    if version == 4:
        more = 0x2000 if fragment == "first" or (fragment == "later" and draw(st.booleans())) else 0
        offset = draw(st.integers(1, 8191)) if fragment == "later" else 0
        return ipv4(src, dst, proto, body, flags_offset=more | offset, options=bytes([1]) * (4 * draw(st.integers(0, 3))))
    return ipv6(src, dst, draw(chains(fragment)), proto, body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated packet with bytes set, or cut short with its IP length fixed up to the cut (so the cut is
    seen by the transport and quote checks, not only by the IP length check)."""
    packet = bytearray(draw(packets()))
    for _ in range(draw(st.integers(1, 3))):
        packet[draw(st.integers(0, len(packet) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del packet[draw(st.integers(1, len(packet))):]
        if packet[0] >> 4 == 4 and len(packet) >= 4:
            packet[2:4] = len(packet).to_bytes(2, "big")
        elif packet[0] >> 4 == 6 and len(packet) >= 40:
            packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
    return bytes(packet)


@settings(max_examples=examples(1500))
@given(packets())
def test_parsers_agree_on_generated_packets(packet: bytes) -> None:
    assert disagreement(packet) is None, packet.hex()


@settings(max_examples=examples(1500))
@given(mutated())
def test_parsers_agree_on_mutated_packets(packet: bytes) -> None:
    assert disagreement(packet) is None, packet.hex()


# -- the distributor's fast path --------------------------------------------------------------------------------
# The fields the fast path tests, by the shape it reads — (offset, width, what is written there): IPv4
# version/IHL, total length, flags/offset, protocol; TCP data offset, UDP length, ICMP type, the quote's
# version/IHL, flags/offset and protocol; IPv6 version, payload length, next header.
FAST_FIELDS = {
    4: [(0, 1, "version"), (2, 2, "length"), (6, 2, "flags"), (9, 1, "protocol")],
    6: [(0, 1, "version"), (4, 2, "length"), (6, 1, "protocol")],
    (4, "tcp"): [(32, 1, "data offset")], (4, "udp"): [(24, 2, "length")], (4, "echo"): [(20, 1, "icmp type")],
    (4, "error"): [(20, 1, "icmp type"), (28, 1, "version"), (34, 2, "flags"), (37, 1, "protocol")],
    (6, "tcp"): [(52, 1, "data offset")], (6, "udp"): [(44, 2, "length")],
}
FIELD_VALUES = {
    "version": st.sampled_from([0x45, 0x44, 0x46, 0x4F, 0x60, 0x6F, 0x55, 0x76, 0x00]),
    "flags": st.sampled_from([0, 0x4000, 0x2000, 0x2001, 0x0001, 0x1FFF, 0x8000, 0x6000]),
    "protocol": st.sampled_from([TCP, UDP, ICMP, ICMPV6, HOP_BY_HOP, FRAGMENT, 47]),
    "icmp type": st.sampled_from([0, 8, 3, 11, 12, 4, 5, 13, 128]),
    "data offset": st.integers(0, 255),
}


@st.composite
def fast_path_shaped(draw: st.DrawFn) -> bytes:
    """A packet of a shape the fast path reads, then up to two of the fields it tests set — to values near
    its boundaries (lengths one or two off) — and sometimes cut short (its IP length fixed up to the cut or
    not)."""
    version = draw(st.sampled_from([4, 4, 6]))
    kind = draw(st.sampled_from(["tcp", "udp"] + (["echo", "error", "error"] if version == 4 else [])))
    if kind == "tcp":
        proto, body = TCP, tcp(draw(ports), draw(ports), draw(st.integers(0, 255)), bytes(4 * draw(st.integers(0, 2))),
                               draw(payloads))
    elif kind == "udp":
        proto, body = UDP, udp(draw(ports), draw(ports), draw(payloads))
    elif kind == "echo":
        proto, body = ICMP, echo(draw(st.sampled_from(ECHO_TYPES[4])), draw(ports), draw(payloads))
    else:
        inner = draw(st.sampled_from([TCP, UDP, UDP, ICMP, 47]))
        inner_body = {TCP: tcp(draw(ports), draw(ports)), UDP: udp(draw(ports), draw(ports), draw(payloads)),
                      ICMP: echo(8, draw(ports)), 47: draw(payloads)}[inner]
        about = ipv4(A4, B4, inner, inner_body, flags_offset=draw(FIELD_VALUES["flags"]))
        if draw(st.booleans()):   # cut, often where the 8 quoted bytes end
            about = about[:draw(st.sampled_from([27, 28, 29, 20, 24]) | st.integers(20, len(about)))]
        proto, body = ICMP, icmp(draw(st.sampled_from([3, 11, 12])), draw(st.integers(0, 15)), bytes(4), about)
    packet = bytearray(ipv4(A4, B4, proto, body) if version == 4 else ipv6(A6, B6, [], proto, body))
    for _ in range(draw(st.integers(0, 2))):
        offset, width, what = draw(st.sampled_from(FAST_FIELDS[version] + FAST_FIELDS[version, kind]))
        if offset + width <= len(packet):
            value = int.from_bytes(packet[offset:offset + width], "big")
            value = draw(FIELD_VALUES[what] if what in FIELD_VALUES else st.integers(value - 2, value + 2))
            packet[offset:offset + width] = (value % 256 ** width).to_bytes(width, "big")
    if draw(st.integers(0, 3)) == 0:
        del packet[len(packet) - draw(st.integers(1, len(packet))):]
        if draw(st.booleans()) and len(packet) >= 6:   # IPv4 total length or IPv6 payload length
            packet[2:4] = len(packet).to_bytes(2, "big") if version == 4 else packet[2:4]
            packet[4:6] = max(len(packet) - 40, 0).to_bytes(2, "big") if version == 6 else packet[4:6]
    return bytes(packet)


FAST_CASES = [
    ("v4 TCP", TCP4),
    ("v4 TCP with options", ipv4(A4, B4, TCP, tcp(1, 2, options=bytes(12)))),
    ("v4 UDP, no data: the shortest", ipv4(A4, B4, UDP, udp(1, 2))),
    ("v4 UDP, bytes after the total length", ipv4(A4, B4, UDP, udp(1, 2, b"data")) + bytes(6)),
    ("v4 DF", ipv4(A4, B4, UDP, udp(1, 2), flags_offset=0x4000)),
    ("v4 echo request", ipv4(A4, B4, ICMP, echo(8, 7))),
    ("v4 echo reply", ipv4(B4, A4, ICMP, echo(0, 7))),
    ("v4 unreachable about TCP, header + 8 quoted", ipv4(R4, A4, ICMP, icmp(3, 4, bytes(4), TCP4[:28]))),
    ("v4 time exceeded about UDP", ipv4(R4, A4, ICMP, icmp(11, 0, bytes(4), ipv4(A4, B4, UDP, udp(1, 2))))),
    ("v4 parameter problem about a first fragment", ipv4(R4, A4, ICMP, icmp(12, 0, bytes(4),
                                                                          ipv4(A4, B4, UDP, udp(1, 2), flags_offset=0x2000)))),
    ("v6 TCP", ipv6(A6, B6, [], TCP, tcp(1, 2))),
    ("v6 UDP, no data", ipv6(A6, B6, [], UDP, udp(1, 2))),
]


@pytest.mark.parametrize("packet", [pytest.param(case[1], id=case[0]) for case in FAST_CASES])
def test_the_fast_path_takes_the_common_packets(packet: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """These never reach the checked walk (so the property tests below do exercise the fast path), and the
    answer is the walk's."""
    expected = parse_flow_checked(packet)

    def walked(_packet: bytes) -> object:
        raise AssertionError("the fast path declined a common packet")

    monkeypatch.setattr(distributor_packet, "parse_flow_checked", walked)
    assert parse_flow(packet) == expected
    assert disagreement(packet) is None


@settings(max_examples=examples(3000))
@given(fast_path_shaped())
def test_fast_path_is_the_checked_walk_on_its_shapes(packet: bytes) -> None:
    assert parse_flow(packet) == parse_flow_checked(packet), packet.hex()
    assert disagreement(packet) is None, packet.hex()


@settings(max_examples=examples(1000))
@given(st.one_of(packets(), mutated()))
def test_fast_path_is_the_checked_walk_on_generated_packets(packet: bytes) -> None:
    assert parse_flow(packet) == parse_flow_checked(packet), packet.hex()
