"""Hot-path parsing of the raw IPv4/IPv6 packets a traffic manager receives: offsets and flow keys.

Written for CPython speed (indexing and slicing of `bytes`, no objects per packet beyond the key) — dpkt
is for tests. A parser returns either a tuple of offsets or a reason string from `overlay.tm.reasons`;
it never raises on malformed input.

A *flow key* is the bytes a connection-table lookup uses: the packet's source and destination addresses
as they sit in the header (8 bytes for IPv4, 32 for IPv6) followed by the 4 port bytes (TCP, UDP) or by
`b"Q"`/`b"P"` and the 2-byte identifier (ICMP echo request/reply). The key of a reply is therefore the
key of the request with its halves swapped, which is all the connection table needs. Keys of different
protocols live in different tables; IPv4 and IPv6 keys differ in length, so they cannot collide.
"""

from __future__ import annotations

from overlay.tm import reasons as R

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

ECHO_REQUEST_MARK = b"Q"
ECHO_REPLY_MARK = b"P"

# ICMP types by IP version: echo request, echo reply, and the errors that quote a packet.
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
ICMP_ERRORS = {4: frozenset({3, 11, 12}), 6: frozenset({1, 2, 3, 4})}
ICMP_PROTOCOL = {4: ICMP, 6: ICMPV6}

# IPv6 extension headers we skip (they do not change addresses or ports); the others are refused.
_IPV6_SKIPPABLE = frozenset({0, 60})          # hop-by-hop options, destination options
_IPV6_REFUSED = frozenset({43, 51, 135, 139, 140, 253, 254})   # routing (changes the pseudo-header), AH, ...
_IPV6_FRAGMENT = 44
_MAX_IPV6_EXTENSIONS = 8

# Where the address pair starts in the IP header, and how long one address is.
ADDRESS_OFFSET = {4: 12, 6: 8}
ADDRESS_LENGTH = {4: 4, 6: 16}


def parse_ip(packet: bytes) -> tuple[int, int, int, int] | str:
    """(version, protocol, transport offset, end of the IP packet) or a malformed/unsupported reason.

    `end` may be less than `len(packet)`: bytes after the IP total length are not part of the packet.
    A fragment (IPv4 MF or offset, an IPv6 fragment header) returns `R.FRAGMENT`: `parse_fragment` has it,
    off the hot path.
    """
    size = len(packet)
    if not size:
        return R.MALFORMED_EMPTY
    version = packet[0] >> 4
    if version == 4:
        if size < 20:
            return R.MALFORMED_TRUNCATED_IPV4
        header = (packet[0] & 0x0F) << 2
        if header < 20:
            return R.MALFORMED_IPV4_HEADER_LENGTH
        total = packet[2] << 8 | packet[3]
        if total < header:
            return R.MALFORMED_IPV4_TOTAL_LENGTH
        if total > size:
            return R.MALFORMED_TRUNCATED_IPV4
        if packet[6] & 0x3F or packet[7]:     # MF flag or a fragment offset: `parse_fragment` has it
            return R.FRAGMENT
        return 4, packet[9], header, total
    if version == 6:
        if size < 40:
            return R.MALFORMED_TRUNCATED_IPV6
        end = 40 + (packet[4] << 8 | packet[5])
        if end > size:
            return R.MALFORMED_TRUNCATED_IPV6
        next_header = packet[6]
        offset = 40
        for _ in range(_MAX_IPV6_EXTENSIONS):
            if next_header in _IPV6_SKIPPABLE:
                if offset + 8 > end:
                    return R.MALFORMED_IPV6_EXTENSION
                next_header, offset = packet[offset], offset + ((packet[offset + 1] + 1) << 3)
                if offset > end:
                    return R.MALFORMED_IPV6_EXTENSION
            elif next_header == _IPV6_FRAGMENT:
                return R.FRAGMENT
            elif next_header in _IPV6_REFUSED:
                return R.UNSUPPORTED_IPV6_EXTENSION
            else:
                return 6, next_header, offset, end
        return R.UNSUPPORTED_IPV6_EXTENSION
    return R.MALFORMED_VERSION


def parse_fragment(packet: bytes) -> tuple[int, int, int, int, bytes, bool] | str:
    """A packet `parse_ip` called a fragment: (version, protocol, transport offset, end, datagram key,
    first) or a reason. The datagram key is what every fragment of one datagram repeats — addresses,
    protocol, identification. `first` is offset 0 (its transport header follows); an IPv6 atomic fragment
    (offset 0, no more fragments) comes back with an empty key: it is a whole packet.
    """
    if packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) << 2
        end = packet[2] << 8 | packet[3]
        first = not ((packet[6] & 0x1F) or packet[7])
        return 4, packet[9], header, end, packet[12:20] + packet[9:10] + packet[4:6], first
    end = 40 + (packet[4] << 8 | packet[5])
    next_header, offset = packet[6], 40
    while next_header in _IPV6_SKIPPABLE:      # parse_ip checked these fit
        next_header, offset = packet[offset], offset + ((packet[offset + 1] + 1) << 3)
    if offset + 8 > end:
        return R.MALFORMED_IPV6_FRAGMENT
    protocol = packet[offset]
    fragment_offset = (packet[offset + 2] << 8 | packet[offset + 3]) >> 3
    more = packet[offset + 3] & 1
    l4 = offset + 8
    first = fragment_offset == 0
    if first:
        for _ in range(_MAX_IPV6_EXTENSIONS):
            if protocol not in _IPV6_SKIPPABLE:
                break
            if l4 + 8 > end:
                return R.MALFORMED_IPV6_EXTENSION
            protocol, l4 = packet[l4], l4 + ((packet[l4 + 1] + 1) << 3)
            if l4 > end:
                return R.MALFORMED_IPV6_EXTENSION
        if protocol == _IPV6_FRAGMENT or protocol in _IPV6_REFUSED or protocol in _IPV6_SKIPPABLE:
            return R.UNSUPPORTED_IPV6_EXTENSION
    key = b"" if first and not more else packet[8:40] + bytes((protocol,)) + packet[offset + 4:offset + 8]
    return 6, protocol, l4, end, key, first


def parse_first_fragment(packet: bytes, version: int, protocol: int, l4: int,
                         end: int) -> tuple[bytes, int] | str:
    """`parse_transport` for a first fragment: the transport header is whole, the rest of the datagram is
    not here (so a UDP length cannot be checked against this packet). ICMP errors are never fragmented
    by a sane sender: refused."""
    if protocol == UDP:
        if l4 + 8 > end:
            return R.MALFORMED_TRUNCATED_UDP
        if (packet[l4 + 4] << 8 | packet[l4 + 5]) < 8:
            return R.MALFORMED_UDP_LENGTH
        return (packet[12:20] if version == 4 else packet[8:40]) + packet[l4:l4 + 4], 0
    flow = parse_transport(packet, version, protocol, l4, end)
    if isinstance(flow, IcmpError):
        return R.UNSUPPORTED_FRAGMENT
    return flow


class IcmpError:
    """Offsets of an ICMP error and the key of the flow it reports, seen in the error's direction.

    The quoted packet travelled toward the reporter; the error travels back. So the lookup key is the
    quoted packet's key with source and destination swapped: the key a packet of the error's direction
    of that same flow would have.
    """

    __slots__ = ("inner_ip", "inner_l4", "inner_protocol", "key")

    def __init__(self, inner_ip: int, inner_l4: int, inner_protocol: int, key: bytes) -> None:
        self.inner_ip = inner_ip
        self.inner_l4 = inner_l4
        self.inner_protocol = inner_protocol
        self.key = key


def parse_transport(packet: bytes, version: int, protocol: int, l4: int,
                    end: int) -> tuple[bytes, int] | IcmpError | str:
    """(flow key, info) — info is the TCP flags, 0 for UDP, 0/1 for ICMP echo request/reply — or an
    `IcmpError`, or a reason."""
    if version == 4:
        addresses = packet[12:20]
    else:
        addresses = packet[8:40]
    if protocol == TCP:
        if l4 + 20 > end:
            return R.MALFORMED_TRUNCATED_TCP
        data_offset = packet[l4 + 12] >> 4
        if data_offset < 5 or l4 + (data_offset << 2) > end:
            return R.MALFORMED_TCP_OFFSET
        return addresses + packet[l4:l4 + 4], packet[l4 + 13]
    if protocol == UDP:
        if l4 + 8 > end:
            return R.MALFORMED_TRUNCATED_UDP
        length = packet[l4 + 4] << 8 | packet[l4 + 5]
        if length < 8 or l4 + length > end:
            return R.MALFORMED_UDP_LENGTH
        return addresses + packet[l4:l4 + 4], 0
    if protocol == ICMP_PROTOCOL[version]:
        if l4 + 8 > end:
            return R.MALFORMED_TRUNCATED_ICMP
        kind = packet[l4]
        if kind == ECHO_REQUEST[version]:
            return addresses + ECHO_REQUEST_MARK + packet[l4 + 4:l4 + 6], 0
        if kind == ECHO_REPLY[version]:
            return addresses + ECHO_REPLY_MARK + packet[l4 + 4:l4 + 6], 1
        if kind in ICMP_ERRORS[version]:
            return _parse_icmp_error(packet, version, l4 + 8, end)
        return R.UNSUPPORTED_ICMP_TYPE
    return R.UNSUPPORTED_PROTOCOL


def _parse_icmp_error(packet: bytes, version: int, inner: int, end: int) -> IcmpError | str:
    """The quoted header: an IP header of the outer version and at least 8 bytes of its transport."""
    if version == 4:
        if inner + 20 > end or packet[inner] >> 4 != 4:
            return R.MALFORMED_ICMP_INNER
        header = (packet[inner] & 0x0F) << 2
        if header < 20 or inner + header + 8 > end:
            return R.MALFORMED_ICMP_INNER
        if packet[inner + 6] & 0x1F or packet[inner + 7]:   # a non-first fragment quotes no ports
            return R.INVALID_ICMP_NO_STATE
        protocol = packet[inner + 9]
        source_address = packet[inner + 12:inner + 16]
        destination_address = packet[inner + 16:inner + 20]
    else:
        header = 40
        if inner + 48 > end or packet[inner] >> 4 != 6:
            return R.MALFORMED_ICMP_INNER
        protocol = packet[inner + 6]
        source_address = packet[inner + 8:inner + 24]
        destination_address = packet[inner + 24:inner + 40]
    l4 = inner + header
    swapped = destination_address + source_address
    if protocol == TCP or protocol == UDP:
        key = swapped + packet[l4 + 2:l4 + 4] + packet[l4:l4 + 2]
    elif protocol == ICMP_PROTOCOL[version]:
        kind = packet[l4]
        if kind == ECHO_REQUEST[version]:
            key = swapped + ECHO_REPLY_MARK + packet[l4 + 4:l4 + 6]
        elif kind == ECHO_REPLY[version]:
            key = swapped + ECHO_REQUEST_MARK + packet[l4 + 4:l4 + 6]
        else:
            return R.INVALID_ICMP_NO_STATE
    else:
        return R.INVALID_ICMP_NO_STATE
    return IcmpError(inner, l4, protocol, key)
