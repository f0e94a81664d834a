"""The distributor's packet view: one pass over an IPv4/IPv6 packet that yields exactly what a decision
needs — version, addresses, protocol, ports, fragment and ICMP-error facts — or a named reason why the
packet is malformed. Never raises on any input.

Hot path: `struct.unpack_from` on the buffer and plain integer tests (ENVIRONMENT.md measured dpkt at
~20x the cost). `tests/test_packet.py` checks this parser against dpkt on the same packets.

ICMP errors are turned around here: an error travels in the reverse direction of the packet it quotes,
so the returned flow is the *quoted* flow with source and destination swapped (and ports swapped). That
is the flow the error belongs to, and deciding on it sends the error to the TM that holds the state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

_IPV6_EXTENSIONS = {0, 43, 44, 60, 51, 135, 139, 140}  # hop-by-hop, routing, fragment, dest opts, AH, ...
_MAX_EXTENSIONS = 8  # bound the walk: a chain longer than this is refused, not followed

ICMP4_ERRORS = {3, 4, 5, 11, 12}
ICMP4_ECHO = {0, 8}
ICMP6_ERRORS = {1, 2, 3, 4}
ICMP6_ECHO = {128, 129}

_V4 = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")
_V6 = struct.Struct("!IHBB16s16s")


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


class Malformed(Exception):
    """Internal signal; `parse_flow` converts it to a reason string."""


def parse_flow(packet: bytes) -> Flow | str:
    """The packet's flow, or a reason string (`malformed:...`) for anything we refuse to decide on."""
    try:
        return _parse(packet, quoted=False)
    except Malformed as exc:
        return f"malformed:{exc}"
    except (struct.error, IndexError):
        return "malformed:truncated"


def _parse(packet: bytes, quoted: bool) -> Flow:
    if not packet:
        raise Malformed("empty")
    version = packet[0] >> 4
    if version == 4:
        return _parse_v4(packet, quoted)
    if version == 6:
        return _parse_v6(packet, quoted)
    raise Malformed(f"ip-version-{version}")


def _parse_v4(packet: bytes, quoted: bool) -> Flow:
    if len(packet) < 20:
        raise Malformed("truncated-ipv4")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _V4.unpack_from(packet, 0)
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        raise Malformed("bad-ipv4-header-length")
    if len(packet) < ihl:
        raise Malformed("truncated-ipv4")
    if not quoted:
        # A quoted header is often cut short by the router that quoted it; only a live packet must be whole.
        if total < ihl:
            raise Malformed("bad-ipv4-total-length")
        if total > len(packet):
            raise Malformed("truncated-ipv4")
    offset = frag & 0x1FFF
    more = bool(frag & 0x2000)
    fragment = more or offset != 0
    if offset != 0:
        return Flow(4, src, dst, proto, None, None, True, False)
    end = len(packet) if quoted else total
    return _transport(4, src, dst, proto, packet, ihl, end, fragment, quoted)


def _parse_v6(packet: bytes, quoted: bool) -> Flow:
    if len(packet) < 40:
        raise Malformed("truncated-ipv6")
    _vtf, payload_length, next_header, _hops, src, dst = _V6.unpack_from(packet, 0)
    end = 40 + payload_length
    if not quoted and end > len(packet):
        raise Malformed("truncated-ipv6")
    if quoted:
        end = len(packet)
    offset = 40
    fragment = False
    for _ in range(_MAX_EXTENSIONS):
        if next_header not in _IPV6_EXTENSIONS:
            break
        if offset + 8 > end:
            raise Malformed("truncated-ipv6-extension")
        if next_header == 44:  # fragment header: fixed 8 bytes
            fragment_offset = int.from_bytes(packet[offset + 2 : offset + 4], "big") >> 3
            fragment = True
            if fragment_offset != 0:
                return Flow(6, src, dst, packet[offset], None, None, True, False)
            next_header = packet[offset]
            offset += 8
        elif next_header == 51:  # AH counts its length in 4-octet units, minus 2
            length = (packet[offset + 1] + 2) * 4
            next_header = packet[offset]
            offset += length
        else:
            length = (packet[offset + 1] + 1) * 8
            next_header = packet[offset]
            offset += length
    else:
        raise Malformed("ipv6-extension-chain-too-long")
    if offset > end:
        raise Malformed("truncated-ipv6-extension")
    return _transport(6, src, dst, next_header, packet, offset, end, fragment, quoted)


def _transport(
    version: int, src: bytes, dst: bytes, proto: int, packet: bytes, offset: int, end: int, fragment: bool, quoted: bool
) -> Flow:
    available = end - offset
    if proto == PROTO_TCP or proto == PROTO_UDP:
        # Quoted headers only promise the first 8 bytes (RFC 792); the ports are in the first 4.
        need = 4 if quoted else (20 if proto == PROTO_TCP else 8)
        if available < need:
            raise Malformed("truncated-tcp" if proto == PROTO_TCP else "truncated-udp")
        if proto == PROTO_TCP and not quoted and packet[offset + 12] >> 4 < 5:
            raise Malformed("bad-tcp-data-offset")
        sport, dport = _PORTS.unpack_from(packet, offset)
        return Flow(version, src, dst, proto, sport, dport, fragment, False)
    if (proto == PROTO_ICMP and version == 4) or (proto == PROTO_ICMPV6 and version == 6):
        if available < (4 if quoted else 8):
            raise Malformed("truncated-icmp")
        icmp_type = packet[offset]
        errors = ICMP4_ERRORS if version == 4 else ICMP6_ERRORS
        if icmp_type in errors and not quoted:
            if fragment:
                # A fragmented ICMP error cannot be turned around reliably; decide by its own addresses.
                return Flow(version, src, dst, proto, None, None, True, False, icmp_type)
            inner = _parse(packet[offset + 8 : end], quoted=True)
            if inner.version != version:
                raise Malformed("icmp-quotes-other-ip-version")
            return Flow(
                version, inner.dst, inner.src, inner.proto, inner.dport, inner.sport, inner.fragment, True, icmp_type
            )
        echo = ICMP4_ECHO if version == 4 else ICMP6_ECHO
        if icmp_type in echo and available >= 8:
            ident = int.from_bytes(packet[offset + 4 : offset + 6], "big")
            return Flow(version, src, dst, proto, ident, ident, fragment, False, icmp_type)
        return Flow(version, src, dst, proto, None, None, fragment, False, icmp_type)
    return Flow(version, src, dst, proto, None, None, fragment, False)
