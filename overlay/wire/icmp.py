"""ICMP (RFC 792) and ICMPv6 (RFC 4443): which types are echo and which are errors about a flow, per IP
family, and the checked view of the packet an error quotes.

An error about a flow travels back toward the sender of the packet it quotes, so both roles relate it to
that flow: the distributor sends it to the TM holding the flow's state, the TM translates it with the flow.
"""

from __future__ import annotations

from overlay.wire import ipv6
from overlay.wire.reasons import MALFORMED_ICMP_INNER

PROTOCOL = {4: 1, 6: 58}   # the ICMP of each IP family; the other family's number is just a protocol
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
# Errors related to the flow they quote: destination unreachable (fragmentation needed included), time
# exceeded, parameter problem; ICMPv6 destination unreachable, packet too big, time exceeded, parameter
# problem (the four of RFC 4443, as Linux conntrack's icmpv6_is_err). Not ICMPv4 source quench (4): RFC 6633
# deprecates it and RFC 9293 has TCP ignore it. Not redirect (5): advice about the sender's own link, which
# means nothing past a NAT and Linux NAT drops for NATed connections (nf_nat_icmp_reply_translation). Both are
# plain ICMP here: decided on their own addresses, not tracked by a TM.
ERRORS = {4: frozenset({3, 11, 12}), 6: frozenset({1, 2, 3, 4})}
# An error quotes the IP header and at least 8 bytes of what followed (RFC 792; RFC 1812 4.3.2.3 makes it a
# MUST), all of it when there was less. The views read those 8 bytes of a quoted TCP, UDP or ICMP header (the
# ports, the UDP checksum, the echo identifier): such a quote cut shorter is malformed for both roles. Of
# another protocol, or of a later fragment, nothing past the IP header is read, and a datagram with less
# than 8 bytes after it is quoted whole: the IP header suffices.
QUOTED_TRANSPORT_BYTES = 8
_READ_IN_QUOTES = {4: frozenset({6, 17, 1}), 6: frozenset({6, 17, 58})}

# What the quoted packet is, as `quote` says it.
WHOLE, FIRST_FRAGMENT, LATER_FRAGMENT = 0, 1, 2


def quote(packet: bytes, version: int, inner: int, end: int) -> tuple[int, int, int] | str:
    """The packet an ICMP error of IP `version` quotes from `inner` to `end`: (protocol, transport offset,
    WHOLE / FIRST_FRAGMENT / LATER_FRAGMENT) or a reason.

    The quote must be of the error's family and hold its IP header — IPv6: with the extension headers a walk
    skips and a fragment header — and the 8 bytes after it that the views read (QUOTED_TRANSPORT_BYTES). Its
    length fields are not checked: a quote is cut short by design."""
    if version == 4:
        if inner + 20 > end or packet[inner] >> 4 != 4:
            return MALFORMED_ICMP_INNER
        l4 = inner + ((packet[inner] & 0x0F) << 2)
        if l4 < inner + 20 or l4 > end:
            return MALFORMED_ICMP_INNER
        protocol = packet[inner + 9]
        if packet[inner + 6] & 0x1F or packet[inner + 7]:
            fragment = LATER_FRAGMENT
        else:
            fragment = FIRST_FRAGMENT if packet[inner + 6] & 0x20 else WHOLE
    else:
        if inner + ipv6.HEADER_LENGTH > end or packet[inner] >> 4 != 6:
            return MALFORMED_ICMP_INNER
        walked = _walk_quoted_ipv6(packet, inner, end)
        if isinstance(walked, str):
            return walked
        protocol, l4, fragment = walked
    if fragment != LATER_FRAGMENT and protocol in _READ_IN_QUOTES[version] and l4 + QUOTED_TRANSPORT_BYTES > end:
        return MALFORMED_ICMP_INNER
    return protocol, l4, fragment


def _walk_quoted_ipv6(packet: bytes, inner: int, end: int) -> tuple[int, int, int] | str:
    """The quoted IPv6 packet's walked headers and fragment header: (protocol, its offset, fragment kind)."""
    walked = ipv6.walk(packet, packet[inner + 6], inner + ipv6.HEADER_LENGTH, end)
    if isinstance(walked, str):
        return MALFORMED_ICMP_INNER
    protocol, l4 = walked
    fragment = WHOLE
    if protocol == ipv6.FRAGMENT:
        if l4 + 8 > end:
            return MALFORMED_ICMP_INNER
        fragment = LATER_FRAGMENT if (packet[l4 + 2] << 8 | packet[l4 + 3]) >> 3 else FIRST_FRAGMENT
        walked = ipv6.walk(packet, packet[l4], l4 + 8, end) if fragment == FIRST_FRAGMENT else (packet[l4], l4 + 8)
        if isinstance(walked, str):
            return MALFORMED_ICMP_INNER
        protocol, l4 = walked
    return protocol, l4, fragment
