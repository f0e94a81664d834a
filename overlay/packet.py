"""The distributor's packet view: what a decision needs of an IPv4/IPv6 packet — version, addresses,
protocol, ports, fragment and ICMP-error facts — or the reason it is refused. Never raises on any input.

It reads the packet through the checked views of `overlay.wire`, the ones the TM reads it through, so a
packet is malformed, an ICMP error about a flow, or a flow with ports for both roles alike
(tests/test_wire_agreement.py). The flow's addresses and ports are its flow key unpacked.

Hot path: the common packet — IPv4 without options or IPv6 without extension headers, not a fragment, TCP or
UDP, or an ICMPv4 echo or error quoting an IPv4 TCP/UDP header without options — is read by one
`struct.unpack_from` of its header and the same length tests the views make, in the order they make them,
and its `Flow` is built from the unpacked fields (no flow key, no view tuples). Anything the fast path does not
accept, well formed or not, goes through the full checked walk (`parse_flow_checked`), which is the
definition: the fast path must return exactly what it returns (tests/test_wire_agreement.py compares the two
on every generated packet). ENVIRONMENT.md measured dpkt at ~20x the cost; `tests/test_packet.py` checks this
view against dpkt on the same packets.

ICMP errors are turned around: an error travels in the reverse direction of the packet it quotes, so the
returned flow is the *quoted* flow with source and destination swapped (and ports swapped) — the quoted
key turned around, as the TM looks it up. That is the flow the error belongs to, and deciding on it sends
the error to the TM that holds the state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlay.wire import reasons as R
from overlay.wire.icmp import ECHO_REPLY, ECHO_REQUEST, ERRORS, WHOLE, quote
from overlay.wire.views import IcmpError, parse_first_fragment, parse_fragment, parse_ip, parse_transport

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# Flow keys (overlay.wire.views) unpacked: addresses, then ports or the echo mark and identifier.
_PORTS_KEY4, _PORTS_KEY6 = struct.Struct("!4s4sHH").unpack, struct.Struct("!16s16sHH").unpack
_ECHO_KEY = {4: struct.Struct("!4s4sxH").unpack, 6: struct.Struct("!16s16sxH").unpack}
# Refusals of the transport view that still leave a flow to decide on, by its addresses (no ports).
_PORTLESS = frozenset({R.UNSUPPORTED_PROTOCOL, R.UNSUPPORTED_IPV6_EXTENSION, R.UNSUPPORTED_ICMP_TYPE})
_ICMP4_ECHO, _ICMP4_ERRORS = frozenset({ECHO_REQUEST[4], ECHO_REPLY[4]}), ERRORS[4]   # the fast path's ICMP types


@dataclass(slots=True)
class Flow:  # not frozen: frozen dataclasses cost ~1 µs more to build, and this is built per packet
    """What the distributor decides on. `sport`/`dport` are None when the packet carries no ports
    (non-first fragments, protocols without ports). For ICMP echo both are the identifier."""

    version: int
    src: bytes  # 4 or 16 packed bytes
    dst: bytes
    proto: int
    sport: int | None
    dport: int | None
    fragment: bool  # any fragment (first or not): hashing must not use ports
    icmp_error: bool  # the flow is the reversed quoted flow of an ICMP error
    icmp_type: int | None = None


# The fast path's unpacks. IPv4 (version 4, IHL 5 tested first) from offset 0: total length, flags/fragment
# offset, protocol, addresses, then the first 6 transport bytes — TCP/UDP ports and the UDP length, or ICMP
# type/code, checksum and echo identifier. IPv6 from offset 4: payload length, next header, addresses, ports
# and the UDP length. A quoted IPv4 header (IHL 5 tested first) from its flags byte: flags/offset, protocol,
# addresses, the quoted ports.
_FAST4 = struct.Struct("!2xH2xHxB2x4s4sHHH").unpack_from
_FAST6 = struct.Struct("!4xHBx16s16sHHH").unpack_from
_FAST_QUOTE4 = struct.Struct("!HxB2x4s4sHH").unpack_from


def parse_flow(packet: bytes) -> Flow | str:
    """The packet's flow, or the reason (`overlay.wire.reasons`) we refuse to decide on it.

    The fast path below accepts only packets `parse_flow_checked` accepts, with the same result; every test
    it makes is that walk's test for this shape of packet (see `overlay.wire.views`), so a packet it declines
    is simply read again by the walk."""
    size = len(packet)
    if size >= 28:
        first = packet[0]
        if first == 0x45:   # IPv4, no options: the transport header is at 20
            total, flags_offset, protocol, src, dst, sport, dport, word = _FAST4(packet)
            if total <= size and not flags_offset & 0x3FFF:
                if protocol == PROTO_TCP:
                    # views.parse_transport: 20 bytes of TCP, data offset in [20, end - l4]
                    if total >= 40 and 20 <= (packet[32] >> 4) << 2 <= total - 20:
                        return Flow(4, src, dst, PROTO_TCP, sport, dport, False, False)
                elif protocol == PROTO_UDP:
                    if 8 <= word <= total - 20:   # the UDP length, in [8, end - l4] (so 8 bytes are there)
                        return Flow(4, src, dst, PROTO_UDP, sport, dport, False, False)
                elif protocol == PROTO_ICMP and total >= 28:   # 8 bytes of ICMP; sport: type and code
                    kind = sport >> 8
                    if kind in _ICMP4_ECHO:       # word: the identifier
                        return Flow(4, src, dst, PROTO_ICMP, word, word, False, False, kind)
                    if kind in _ICMP4_ERRORS and total >= 56 and packet[28] == 0x45:
                        # icmp.quote: the quoted IPv4 header (no options) and 8 bytes after it are there
                        inner_flags, inner, inner_src, inner_dst, inner_sport, inner_dport = _FAST_QUOTE4(packet, 34)
                        if not inner_flags & 0x1FFF and (inner == PROTO_TCP or inner == PROTO_UDP):
                            # a whole packet or a first fragment: the quoted flow, turned around
                            return Flow(4, inner_dst, inner_src, inner, inner_dport, inner_sport,
                                        inner_flags & 0x2000 != 0, True, kind)
        elif first >> 4 == 6 and size >= 48:   # IPv6, the transport header right after the fixed header
            payload_length, next_header, src, dst, sport, dport, word = _FAST6(packet)
            if 40 + payload_length <= size:
                if next_header == PROTO_TCP:
                    if payload_length >= 20 and 20 <= (packet[52] >> 4) << 2 <= payload_length:
                        return Flow(6, src, dst, PROTO_TCP, sport, dport, False, False)
                elif next_header == PROTO_UDP and 8 <= word <= payload_length:
                    return Flow(6, src, dst, PROTO_UDP, sport, dport, False, False)
    return parse_flow_checked(packet)


def parse_flow_checked(packet: bytes) -> Flow | str:
    """`parse_flow` through the checked views alone: the definition the fast path is held to."""
    parsed = parse_ip(packet)
    if isinstance(parsed, str):
        return _fragment(packet) if parsed == R.FRAGMENT else parsed
    version, protocol, l4, end = parsed
    found = parse_transport(packet, version, protocol, l4, end)
    if isinstance(found, tuple):
        if protocol == PROTO_TCP or protocol == PROTO_UDP:
            src, dst, sport, dport = (_PORTS_KEY4 if version == 4 else _PORTS_KEY6)(found[0])
            return Flow(version, src, dst, protocol, sport, dport, False, False)
        src, dst, ident = _ECHO_KEY[version](found[0])
        return Flow(version, src, dst, protocol, ident, ident, False, False, packet[l4])
    if isinstance(found, IcmpError):    # about a flow with ports or an echo identifier: that flow, turned around
        inner = found.inner_protocol
        if inner == PROTO_TCP or inner == PROTO_UDP:
            src, dst, sport, dport = (_PORTS_KEY4 if version == 4 else _PORTS_KEY6)(found.key)
        else:
            src, dst, sport = _ECHO_KEY[version](found.key)
            dport = sport
        return Flow(version, src, dst, inner, sport, dport, found.inner_fragment, True, packet[l4])
    return _without_ports(packet, version, protocol, l4, end, found, False)


def _without_ports(packet: bytes, version: int, protocol: int, l4: int, end: int, reason: str,
                   fragment: bool) -> Flow | str:
    """A packet the transport view found no flow key in: still a flow on its addresses when it is well
    formed — a protocol without ports, ICMP neither echo nor an error, a fragmented ICMP error, or an error
    whose quote has no ports (then the quoted addresses, turned around)."""
    if reason == R.INVALID_ICMP_NO_STATE:
        quoted = quote(packet, version, l4 + 8, end)
        assert not isinstance(quoted, str)    # the transport view accepted this quote
        inner_protocol, _, inner_fragment = quoted
        src, dst = _addresses(packet, version, l4 + 8)
        return Flow(version, dst, src, inner_protocol, None, None, inner_fragment != WHOLE, True, packet[l4])
    if reason in _PORTLESS or reason == R.UNSUPPORTED_FRAGMENT:
        src, dst = _addresses(packet, version, 0)
        icmp_type = packet[l4] if reason == R.UNSUPPORTED_ICMP_TYPE or reason == R.UNSUPPORTED_FRAGMENT else None
        return Flow(version, src, dst, protocol, None, None, fragment, False, icmp_type)
    return reason


def _fragment(packet: bytes) -> Flow | str:
    """A fragment: ports from the first one (a fragmented ICMP error is decided on its own addresses, it
    cannot be turned around reliably); a later one carries none."""
    parsed = parse_fragment(packet)
    if isinstance(parsed, str):
        return parsed
    version, protocol, l4, end, _datagram, first = parsed
    if not first:
        src, dst = _addresses(packet, version, 0)
        return Flow(version, src, dst, protocol, None, None, True, False)
    found = parse_first_fragment(packet, version, protocol, l4, end)
    if isinstance(found, str):
        return _without_ports(packet, version, protocol, l4, end, found, True)
    if protocol == PROTO_TCP or protocol == PROTO_UDP:
        src, dst, sport, dport = (_PORTS_KEY4 if version == 4 else _PORTS_KEY6)(found[0])
        return Flow(version, src, dst, protocol, sport, dport, True, False)
    src, dst, ident = _ECHO_KEY[version](found[0])
    return Flow(version, src, dst, protocol, ident, ident, True, False, packet[l4])


def _addresses(packet: bytes, version: int, ip: int) -> tuple[bytes, bytes]:
    """Source and destination of the IP header at `ip`."""
    if version == 4:
        return packet[ip + 12:ip + 16], packet[ip + 16:ip + 20]
    return packet[ip + 8:ip + 24], packet[ip + 24:ip + 40]
