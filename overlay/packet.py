"""The distributor's packet view: what a decision needs of an IPv4/IPv6 packet — version, addresses,
protocol, ports, fragment and ICMP-error facts — or the reason it is refused. Never raises on any input.

It reads the packet through the checked views of `overlay.wire`, the ones the TM reads it through, so a
packet is malformed, an ICMP error about a flow, or a flow with ports for both roles alike
(tests/test_wire_agreement.py). The flow's addresses and ports are its flow key unpacked. Hot path: one
`struct` unpack of the key and plain integer tests (ENVIRONMENT.md measured dpkt at ~20x the cost);
`tests/test_packet.py` checks this view against dpkt on the same packets.

ICMP errors are turned around: an error travels in the reverse direction of the packet it quotes, so the
returned flow is the *quoted* flow with source and destination swapped (and ports swapped) — the quoted
key turned around, as the TM looks it up. That is the flow the error belongs to, and deciding on it sends
the error to the TM that holds the state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from overlay.wire import reasons as R
from overlay.wire.icmp import WHOLE, quote
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


def parse_flow(packet: bytes) -> Flow | str:
    """The packet's flow, or the reason (`overlay.wire.reasons`) we refuse to decide on it."""
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
