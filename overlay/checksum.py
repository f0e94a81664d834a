"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624), shared by every role.

A NAT rewrites a few 16-bit words of a packet and must fix every checksum that covers them without
summing the whole packet again. RFC 1624 eqn. 3 gives the update that stays correct in one's-complement
arithmetic (including the -0 corner that eqn. 2 of RFC 1141 gets wrong):

    HC' = ~(~HC + ~m + m')

`checksum_delta(old, new)` computes the sum of `~m + m'` over all the changed words once, so a rewrite
that is the same for every packet of a connection (addresses and ports are fixed by the flow) can
precompute it and pay one addition and a fold per packet in `apply_delta`.

All functions take 16-bit aligned byte strings: callers only rewrite fields that start at an even
offset from the start of the checksummed region (addresses, ports, identifiers, checksums all do).
"""

from __future__ import annotations



def _fold(total: int) -> int:
    """Reduce a non-negative sum of 16-bit words to 16 bits with end-around carry.

    Modulo 0xFFFF is the same reduction (2**16 ≡ 1), except that a non-zero sum that is a multiple of
    0xFFFF folds to 0xFFFF (one's-complement "negative zero"), never to 0, exactly as RFC 1071's loop.
    """
    if total <= 0xFFFF:
        return total
    folded = total % 0xFFFF
    return folded if folded else 0xFFFF


def ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit one's-complement sum of `data` (odd length is padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # Summing as one big integer and folding is exact: carries wrap around modulo 0xFFFF.
    # The whole buffer as one integer is the sum of its 16-bit words times powers of 2**16 ≡ 1.
    return _fold(int.from_bytes(data, "big"))


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum to store: the complement of the one's-complement sum of `data` plus `initial`
    (the pseudo-header sum, when there is one)."""
    return ~_fold(ones_complement_sum(data) + initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The folded one's-complement sum of the IPv4 (4-byte addresses) or IPv6 (16-byte) pseudo-header."""
    return _fold(ones_complement_sum(src) + ones_complement_sum(dst) + protocol + (length & 0xFFFF) + (length >> 16))


def checksum_delta(old: bytes | bytearray | memoryview, new: bytes | bytearray | memoryview) -> int:
    """The folded sum of `~m + m'` over the 16-bit words of `old` → `new` (equal, even lengths)."""
    if len(old) != len(new) or len(old) % 2:
        raise ValueError("checksum_delta needs two byte strings of the same even length")
    words = len(old) // 2
    # ~m for every word at once: (0xFFFF... - m) is the bitwise complement of each 16-bit word.
    complement = (1 << (16 * words)) - 1 - int.from_bytes(old, "big")
    return _fold(complement + int.from_bytes(new, "big"))


def add_deltas(*deltas: int) -> int:
    """Combine precomputed deltas into one folded delta."""
    return _fold(sum(deltas))


def apply_delta(checksum: int, delta: int) -> int:
    """RFC 1624 eqn. 3: the updated checksum field after changes whose folded `~m + m'` sum is `delta`."""
    total = (~checksum & 0xFFFF) + delta
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def update_field(checksum: int, old: bytes | bytearray | memoryview, new: bytes | bytearray | memoryview) -> int:
    """The checksum after replacing the aligned field `old` by `new` (a one-off `checksum_delta` + apply)."""
    return apply_delta(checksum, checksum_delta(old, new))
