"""IPv6 (RFC 8200): which extension headers the views walk over, how, and the fragment header.

A walk follows `Next Header` from header to header. It skips only the headers that change neither the
addresses nor the ports a flow is known by, and stops at anything else: an upper-layer header, the
fragment header (the views read it themselves), or an extension header it does not walk.
"""

from __future__ import annotations

from overlay.wire.reasons import MALFORMED_IPV6_CHAIN, MALFORMED_IPV6_EXTENSION

HEADER_LENGTH = 40

# Hop-by-hop options and destination options: both count their length in 8-octet units, the first 8 not
# counted, and carry nothing a flow is known by.
SKIPPED = frozenset({0, 60})
FRAGMENT = 44   # fixed 8 bytes: next header, reserved, offset (13 bits) | 2 reserved | M, identification
# Extension headers a walk stops at: routing (43: the destination field names the next segment, not the
# final one the upper-layer checksum covers, RFC 8200 8.1), AH (51: its integrity check covers the addresses
# a NAT rewrites, RFC 4302), Mobility (135), HIP (139), Shim6 (140), experimental (253, 254). A TM does not
# track packets behind them (`unsupported:ipv6-extension`); the distributor decides them on addresses.
NOT_WALKED = frozenset({43, 51, 135, 139, 140, 253, 254})
# RFC 8200 4.1: each extension header occurs at most once, destination options at most twice, so a
# conforming chain of walked headers is at most 3 long; 8 bounds the walk with room to spare.
MAX_EXTENSIONS = 8


def walk(packet: bytes, next_header: int, offset: int, end: int) -> tuple[int, int] | str:
    """Skip the walked headers starting at `offset` (the first of type `next_header`), within `end`:
    (the next header where the walk stopped, its offset) or a malformed reason."""
    for _ in range(MAX_EXTENSIONS + 1):
        if next_header not in SKIPPED:
            return next_header, offset
        if offset + 8 > end:
            return MALFORMED_IPV6_EXTENSION
        next_header, offset = packet[offset], offset + ((packet[offset + 1] + 1) << 3)
        if offset > end:
            return MALFORMED_IPV6_EXTENSION
    return MALFORMED_IPV6_CHAIN
