"""Rewriting packets of tracked connections, with incremental (RFC 1624) checksum updates.

`rewrite` is the per-packet hot path: the connection's `Half` already holds the new addresses and ports
and the folded checksum deltas, so it joins the unchanged slices with the new fields and fixes one or
two checksums with an addition and a fold.

`translate_icmp_error` is the slow path for ICMP errors about a tracked flow (PMTU discovery and
traceroute): the outer destination and the quoted packet are turned into what the other side of the
NAT sent or expects, and every checksum that covers a changed word is updated: the outer IPv4 header,
the quoted IPv4 header, the quoted transport checksum when the quote includes it, and the ICMP checksum
(ICMPv6: pseudo-header included). Every changed field starts at an even offset from the start of the
region its checksum covers, which is what the incremental update needs.
"""

from __future__ import annotations

from overlay.checksum import add_deltas, apply_delta, checksum_delta
from overlay.tm import reasons as R
from overlay.tm.conntrack import Half
from overlay.tm.packet import ADDRESS_LENGTH, ADDRESS_OFFSET, ICMPV6, TCP, UDP, IcmpError


def rewrite(packet: bytes, version: int, protocol: int, l4: int, end: int, half: Half) -> bytes:
    # Joining slices of the immutable packet with the new fields measured ~13 % faster than copying
    # into a bytearray and assigning into it (tests/tm/bench_tm.py), and it allocates the result once.
    if end != len(packet):
        packet = packet[:end]
    ports: bytes = half.ports  # type: ignore[assignment]   # a NAT half: never None here
    if version == 4:
        total = ((packet[10] << 8 | packet[11]) ^ 0xFFFF) + half.ip_delta
        checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
        head = packet[:10] + checksum.to_bytes(2, "big") + half.addresses + packet[20:l4]  # type: ignore[operator]
    else:
        head = packet[:8] + half.addresses + packet[40:l4]  # type: ignore[operator]
    if protocol == TCP:
        at = l4 + 16
    elif protocol == UDP:
        at = l4 + 6
        if not (packet[at] or packet[at + 1]):
            # IPv4 UDP without checksum: nothing to update.
            return head + ports + packet[l4 + 4:]
    else:
        # ICMP: the checksum (offset 2) comes before the identifier (offset 4).
        total = ((packet[l4 + 2] << 8 | packet[l4 + 3]) ^ 0xFFFF) + half.l4_delta
        checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
        return head + packet[l4:l4 + 2] + checksum.to_bytes(2, "big") + ports + packet[l4 + 6:]
    total = ((packet[at] << 8 | packet[at + 1]) ^ 0xFFFF) + half.l4_delta
    checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
    if not checksum and protocol == UDP:
        checksum = 0xFFFF       # a computed 0 is sent as all ones: 0 means "no checksum" in UDP
    return head + ports + packet[l4 + 4:at] + checksum.to_bytes(2, "big") + packet[at + 2:]


def rewrite_addresses(packet: bytes, version: int, half: Half) -> bytes:
    """A non-first fragment of a translated datagram: only the addresses change (the ports and the
    transport checksum live in the first fragment), and with them the IPv4 header checksum."""
    addresses: bytes = half.addresses  # type: ignore[assignment]   # a NAT half: never None here
    if version == 4:
        total = ((packet[10] << 8 | packet[11]) ^ 0xFFFF) + half.ip_delta
        checksum = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
        return packet[:10] + checksum.to_bytes(2, "big") + addresses + packet[20:]
    return packet[:8] + addresses + packet[40:]


def _replace(buf: bytearray, at: int, new: bytes) -> int:
    """Write `new` at `at` and return its checksum delta."""
    end = at + len(new)
    delta = checksum_delta(buf[at:end], new)
    buf[at:end] = new
    return delta


def _update_checksum(buf: bytearray, at: int, delta: int) -> int:
    """Apply `delta` to the 16-bit checksum at `at`; return the delta of that rewrite itself (the
    checksum field is covered by an enclosing checksum, e.g. the ICMP one)."""
    old = bytes(buf[at:at + 2])
    value = apply_delta(old[0] << 8 | old[1], delta)
    new = value.to_bytes(2, "big")
    buf[at:at + 2] = new
    return checksum_delta(old, new)


def translate_icmp_error(packet: bytes, version: int, l4: int, end: int, error: IcmpError, half: Half) -> bytes | str:
    """The error rewritten for the other side of the NAT, or a reason to drop it.

    `half` is the tracked direction the error travels in, found by the swapped key of the quoted packet:
    its key is (s, d, sport, dport) and it rewrites to (s2, d2, sport2, dport2). The quote is a packet
    d → s as the reporter saw it, so it becomes d2 → s2; the error goes to d, so it now goes to d2; and
    when the reporter is the peer s itself, it now comes from s2. An error from a router on the path
    keeps its source, so traceroute still shows the hops.
    """
    assert half.addresses is not None and half.ports is not None
    length = ADDRESS_LENGTH[version]
    src_at = ADDRESS_OFFSET[version]
    dst_at = src_at + length
    key = half.key
    s, d = key[:length], key[length:2 * length]
    s2, d2 = half.addresses[:length], half.addresses[length:]
    if packet[dst_at:dst_at + length] != d:
        return R.MALFORMED_ICMP_MISMATCH
    buf = bytearray(packet[:end])

    # Outer header: destination to the real sender; source too if the peer itself reported.
    outer_source = s2 if buf[src_at:dst_at] == s else bytes(buf[src_at:dst_at])
    outer_delta = _replace(buf, src_at, outer_source + d2)
    if version == 4:
        _update_checksum(buf, 10, outer_delta)
    icmp_delta = outer_delta if version == 6 else 0   # ICMPv6 covers the pseudo-header, ICMPv4 does not

    # The quoted packet: addresses, its IPv4 header checksum, ports or echo identifier, its checksum.
    inner_ip, inner_l4 = error.inner_ip, error.inner_l4
    inner_src_at = inner_ip + src_at
    address_delta = _replace(buf, inner_src_at, d2 + s2)
    icmp_delta += address_delta
    if version == 4:
        icmp_delta += _update_checksum(buf, inner_ip + 10, address_delta)
    protocol = error.inner_protocol
    if protocol == TCP or protocol == UDP:
        port_delta = _replace(buf, inner_l4, half.ports[2:4] + half.ports[0:2])
        checksum_at = inner_l4 + (16 if protocol == TCP else 6)
        pseudo_delta = address_delta
    else:
        port_delta = _replace(buf, inner_l4 + 4, half.ports)
        checksum_at = inner_l4 + 2
        pseudo_delta = address_delta if protocol == ICMPV6 else 0
    icmp_delta += port_delta
    # The quote may stop before the transport checksum (RFC 792 only promises 8 bytes); a zero UDP
    # checksum means "none" and stays zero.
    if checksum_at + 2 <= end and not (protocol == UDP and not (buf[checksum_at] or buf[checksum_at + 1])):
        icmp_delta += _update_checksum(buf, checksum_at, add_deltas(pseudo_delta, port_delta))

    _update_checksum(buf, l4 + 2, add_deltas(icmp_delta))
    return bytes(buf)
