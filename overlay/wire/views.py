"""Checked views of a whole IPv4/IPv6 packet, read by both roles: where the transport header is, what a
fragment is, and the flow key.

Written for CPython speed: indexing and slicing of `bytes`, offsets returned in tuples, no object per packet
beyond the key. A view returns offsets or a reason string (`overlay.wire.reasons`); it never raises.

A *flow key* is the bytes a connection-table lookup uses: the packet's source and destination addresses as
they sit in the header (8 bytes for IPv4, 32 for IPv6) followed by the 4 port bytes (TCP, UDP) or by
`b"Q"`/`b"P"` and the 2-byte identifier (ICMP echo request/reply). The key of a reply is therefore the key
of the request with its halves swapped. For an ICMP error the key is the quoted packet's key turned around:
the key a packet of the error's direction of that flow would have. Keys of different protocols live in
different tables; IPv4 and IPv6 keys differ in length, so they cannot collide.

The distributor's `overlay.packet.parse_flow` repeats, on a fast path of its own, the tests these views make
for the common packet (IPv4 without options / IPv6 without extension headers, TCP, UDP, ICMPv4 echo, an ICMPv4
error about TCP/UDP): a check changed here must change there too, or tests/test_wire_agreement.py fails.
"""

from __future__ import annotations

import struct

from overlay.wire import reasons as R
from overlay.wire.icmp import ECHO_REPLY, ECHO_REQUEST, ERRORS, FIRST_FRAGMENT, LATER_FRAGMENT, quote
from overlay.wire.icmp import PROTOCOL as ICMP_PROTOCOL
from overlay.wire.ipv6 import FRAGMENT as IPV6_FRAGMENT
from overlay.wire.ipv6 import NOT_WALKED, SKIPPED, walk

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

ECHO_REQUEST_MARK = b"Q"
ECHO_REPLY_MARK = b"P"

# The fields `parse_ip` reads: IPv4 version/IHL, total length, flags/fragment offset, protocol; IPv6 payload
# length and next header (from offset 4).
_IPV4_FIELDS = struct.Struct("!BxHxxHxB").unpack_from
_IPV6_FIELDS = struct.Struct("!HB").unpack_from

# Where the address pair starts in the IP header, and how long one address is.
ADDRESS_OFFSET = {4: 12, 6: 8}
ADDRESS_LENGTH = {4: 4, 6: 16}


def parse_ip(packet: bytes) -> tuple[int, int, int, int] | str:
    """(version, protocol, transport offset, end of the IP packet) or a malformed reason.

    `end` may be less than `len(packet)`: bytes after the IP total length are not part of the packet. IPv6
    extension headers that `ipv6.walk` skips are skipped; the protocol is where the walk stopped, which may
    be an extension header it does not walk (`parse_transport` refuses those). A fragment (IPv4 MF or
    offset, an IPv6 fragment header) returns `R.FRAGMENT`: `parse_fragment` reads it.
    """
    size = len(packet)
    if not size:
        return R.MALFORMED_EMPTY
    version = packet[0] >> 4
    if version == 4:
        if size < 20:
            return R.MALFORMED_TRUNCATED_IPV4
        # One unpack of the four fields costs less than indexing them one byte at a time.
        first, total, flags_offset, protocol = _IPV4_FIELDS(packet)
        header = (first & 0x0F) << 2
        if not 20 <= header <= total <= size:     # one chained test on the hot path, the reason after
            if header < 20:
                return R.MALFORMED_IPV4_HEADER_LENGTH
            return R.MALFORMED_IPV4_TOTAL_LENGTH if total < header else R.MALFORMED_TRUNCATED_IPV4
        if flags_offset & 0x3FFF:     # MF flag or a fragment offset
            return R.FRAGMENT
        return 4, protocol, header, total
    if version == 6:
        if size < 40:
            return R.MALFORMED_TRUNCATED_IPV6
        payload_length, next_header = _IPV6_FIELDS(packet, 4)
        end = 40 + payload_length
        if end > size:
            return R.MALFORMED_TRUNCATED_IPV6
        if next_header in SKIPPED:
            walked = walk(packet, next_header, 40, end)
            if isinstance(walked, str):
                return walked
            next_header, offset = walked
            if next_header == IPV6_FRAGMENT:
                return R.FRAGMENT
            return 6, next_header, offset, end
        if next_header == IPV6_FRAGMENT:
            return R.FRAGMENT
        return 6, next_header, 40, end
    return R.MALFORMED_VERSION


def parse_fragment(packet: bytes) -> tuple[int, int, int, int, bytes, bool] | str:
    """A packet `parse_ip` called a fragment: (version, protocol, transport offset, end, datagram key,
    first) or a reason. The datagram key is what every fragment of one datagram repeats — addresses,
    protocol, identification. `first` is offset 0 (its transport header follows; IPv6: after the walked
    headers that follow the fragment header); an IPv6 atomic fragment (offset 0, no more fragments) comes
    back with an empty key: it is a whole packet.
    """
    if packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) << 2
        end = packet[2] << 8 | packet[3]
        first = not ((packet[6] & 0x1F) or packet[7])
        return 4, packet[9], header, end, packet[12:20] + packet[9:10] + packet[4:6], first
    end = 40 + (packet[4] << 8 | packet[5])
    walked = walk(packet, packet[6], 40, end)   # parse_ip walked it to a fragment header
    if isinstance(walked, str):
        return walked
    offset = walked[1]
    if offset + 8 > end:
        return R.MALFORMED_IPV6_FRAGMENT
    protocol = next_header = packet[offset]
    more = packet[offset + 3] & 1
    first = not (packet[offset + 2] << 8 | packet[offset + 3]) >> 3
    l4 = offset + 8
    if first:
        walked = walk(packet, protocol, l4, end)
        if isinstance(walked, str):
            return walked
        protocol, l4 = walked
    # The fragment header's next header, not the walked protocol: every fragment of the datagram repeats
    # it, while only the first carries the headers after it.
    key = b"" if first and not more else packet[8:40] + bytes((next_header,)) + packet[offset + 4:offset + 8]
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
    if isinstance(flow, IcmpError) or flow == R.INVALID_ICMP_NO_STATE:
        return R.UNSUPPORTED_FRAGMENT
    return flow


class IcmpError:
    """Offsets of an ICMP error's quoted packet and the key of the flow it reports, seen in the error's
    direction (the quoted key turned around), and whether the quoted packet is a first fragment."""

    __slots__ = ("inner_ip", "inner_l4", "inner_protocol", "key", "inner_fragment")

    def __init__(self, inner_ip: int, inner_l4: int, inner_protocol: int, key: bytes, inner_fragment: bool) -> None:
        self.inner_ip = inner_ip
        self.inner_l4 = inner_l4
        self.inner_protocol = inner_protocol
        self.key = key
        self.inner_fragment = inner_fragment


def parse_transport(packet: bytes, version: int, protocol: int, l4: int,
                    end: int) -> tuple[bytes, int] | IcmpError | str:
    """(flow key, info) — info is the TCP flags, 0 for UDP, 0/1 for ICMP echo request/reply — or an
    `IcmpError`, or a reason."""
    if version == 4:
        start, stop = 12, 20
    else:
        start, stop = 8, 40
    if protocol == TCP:
        if l4 + 20 > end:
            return R.MALFORMED_TRUNCATED_TCP
        if not 20 <= (packet[l4 + 12] >> 4) << 2 <= end - l4:     # the data offset, in bytes
            return R.MALFORMED_TCP_OFFSET
        # Without IPv4 options or IPv6 extension headers the ports follow the addresses: one slice.
        return packet[start:l4 + 4] if l4 == stop else packet[start:stop] + packet[l4:l4 + 4], packet[l4 + 13]
    if protocol == UDP:
        if l4 + 8 > end:
            return R.MALFORMED_TRUNCATED_UDP
        if not 8 <= (packet[l4 + 4] << 8 | packet[l4 + 5]) <= end - l4:
            return R.MALFORMED_UDP_LENGTH
        return packet[start:l4 + 4] if l4 == stop else packet[start:stop] + packet[l4:l4 + 4], 0
    if protocol == ICMP_PROTOCOL[version]:
        if l4 + 8 > end:
            return R.MALFORMED_TRUNCATED_ICMP
        kind = packet[l4]
        if kind == ECHO_REQUEST[version]:
            return packet[start:stop] + ECHO_REQUEST_MARK + packet[l4 + 4:l4 + 6], 0
        if kind == ECHO_REPLY[version]:
            return packet[start:stop] + ECHO_REPLY_MARK + packet[l4 + 4:l4 + 6], 1
        if kind in ERRORS[version]:
            return _icmp_error(packet, version, l4 + 8, end)
        return R.UNSUPPORTED_ICMP_TYPE
    if version == 6 and (protocol in NOT_WALKED or protocol == IPV6_FRAGMENT):   # where a walk stopped
        return R.UNSUPPORTED_IPV6_EXTENSION
    return R.UNSUPPORTED_PROTOCOL


def _icmp_error(packet: bytes, version: int, inner: int, end: int) -> IcmpError | str:
    quoted = quote(packet, version, inner, end)
    if isinstance(quoted, str):
        return quoted
    protocol, l4, fragment = quoted
    if fragment == LATER_FRAGMENT:     # no transport header: no ports to find the flow by
        return R.INVALID_ICMP_NO_STATE
    length = ADDRESS_LENGTH[version]
    source = inner + ADDRESS_OFFSET[version]
    swapped = packet[source + length:source + 2 * length] + packet[source:source + length]
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
    return IcmpError(inner, l4, protocol, key, fragment == FIRST_FRAGMENT)
