"""TUN offloads (issue 10): the virtio-net header and the two transformations it makes user space do.

A TUN opened with `IFF_VNET_HDR` and given `TUNSETOFFLOAD` CSUM|TSO4|TSO6 hands the distributor TCP
*super-packets* — up to 64 KB of one flow in one read, with a 10-byte `virtio_net_hdr` in front saying
how the kernel would have cut them (`gso_size`) — and any packet may come with its checksum left partial
(`NEEDS_CSUM`: the pseudo-header sum in the field, the rest for whoever sends it). On the way back the
same header lets us write one super-packet for a run of segments and have the kernel cut it late.

The overlay carries ordinary segments, never super-packets: each GRE-in-UDP datagram holds exactly the
packet the kernel would have read us without offloads, so a TM (ours or anyone's) needs nothing new.

- `split(header, packet)`: a read → the packets the plain TUN would have given, byte for byte what the
  kernel's own segmentation makes (`tcp_gso_segment`: sequence numbers, IPv4 ids counting up, FIN and PSH
  only on the last segment, CWR only on the first, every checksum complete).
- `coalesce(packets)`: a batch of packets to write → writes, each behind its header: a run of segments
  of one TCP flow that the kernel would cut back into exactly those segments becomes one super-packet;
  anything else goes alone behind an empty header. A run is only formed of packets whose checksums are
  right, so a corrupt packet is never "repaired" by the recomputation: it reaches the stack as it came.

This is the reference implementation, and the fallback where the compiled `overlay._fastio` is missing:
`_fastio` does the same in C (`read_batch`/`write_batch` with `vnet`), and tests/runtime/test_offload.py
checks both against each other on random mixes and against the kernel's own segmentation.
"""

from __future__ import annotations

import struct

from overlay.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum

# linux/virtio_net.h
VNET_HEADER = struct.Struct("=BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HEADER_LEN = VNET_HEADER.size      # 10
F_NEEDS_CSUM = 0x01
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
GSO_ECN = 0x80
EMPTY_HEADER = bytes(VNET_HEADER_LEN)

# linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MAX_SUPER = 65535   # an IPv4 total length (and, for simplicity, an IPv6 packet) fits 16 bits

# Why a read was not usable; the TUN counts them as `tun_rx_offload_<reason>` and drops the packet.
SHORT, BAD_CSUM_OFFSET, UNSUPPORTED_GSO, BAD_GSO = "short", "bad-csum-offset", "unsupported-gso", "bad-gso"


def _fold_complement(total: int) -> int:
    return internet_checksum(b"", total)


def complete_checksum(packet: bytearray, start: int, offset: int) -> None:
    """What the kernel's `skb_checksum_help` does for a partial checksum: sum from `start` to the end
    (the field already holds the pseudo-header sum) and store the complement there; a zero is sent as
    0xFFFF (either means "no error" to a receiver, and for UDP zero would mean "no checksum")."""
    value = internet_checksum(packet[start:])
    packet[start + offset:start + offset + 2] = (value or 0xFFFF).to_bytes(2, "big")


def _addresses(packet: bytes | bytearray) -> tuple[bytes, bytes]:
    if packet[0] >> 4 == 4:
        return bytes(packet[12:16]), bytes(packet[16:20])
    return bytes(packet[8:24]), bytes(packet[24:40])


def _ipv4_header_checksum(segment: bytearray, length: int) -> None:
    segment[10:12] = b"\0\0"
    segment[10:12] = internet_checksum(segment[:length]).to_bytes(2, "big")


def split(header: bytes, packet: bytes) -> list[bytes] | str:
    """One TUN read (its vnet header, then the packet) → the packets a TUN without offloads would have
    given, or the reason it cannot be used (a short or inconsistent header: nothing the kernel makes)."""
    if len(header) < VNET_HEADER_LEN:
        return SHORT
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HEADER.unpack_from(header)
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            if csum_start + csum_offset + 2 > len(packet):
                return BAD_CSUM_OFFSET
            completed = bytearray(packet)
            complete_checksum(completed, csum_start, csum_offset)
            return [bytes(completed)]
        return [packet]
    if gso not in (GSO_TCPV4, GSO_TCPV6):
        return UNSUPPORTED_GSO   # UFO/USO: never asked for (TUNSETOFFLOAD sets TSO only)
    version = packet[0] >> 4 if packet else 0
    if (version, gso) not in ((4, GSO_TCPV4), (6, GSO_TCPV6)) or gso_size == 0:
        return BAD_GSO
    # The TCP header starts where the kernel says the checksum starts (after any IPv6 extension headers).
    l4 = csum_start
    if l4 < (20 if version == 4 else 40) or l4 + 20 > len(packet) or csum_offset != 16:
        return BAD_GSO
    header_length = l4 + (packet[l4 + 12] >> 4) * 4
    if header_length < l4 + 20 or header_length > len(packet):
        return BAD_GSO
    ihl = (packet[0] & 0x0F) * 4
    if version == 4 and not 20 <= ihl <= l4:
        return BAD_GSO     # the IPv4 header must end where TCP starts, or before
    src, dst = _addresses(packet)
    ip_id = int.from_bytes(packet[4:6], "big")
    sequence = int.from_bytes(packet[l4 + 4:l4 + 8], "big")
    tcp_flags = packet[l4 + 13]
    payload = packet[header_length:]
    if header_length + min(len(payload), gso_size) > (65535 if version == 4 else 65535 + 40):
        return BAD_GSO     # a segment whose length its IP header cannot hold
    offsets = range(0, max(len(payload), 1), gso_size)
    segments: list[bytes] = []
    for index, start in enumerate(offsets):
        segment = bytearray(packet[:header_length])
        segment += payload[start:start + gso_size]
        if version == 4:
            segment[2:4] = len(segment).to_bytes(2, "big")
            segment[4:6] = ((ip_id + index) & 0xFFFF).to_bytes(2, "big")
            _ipv4_header_checksum(segment, ihl)
        else:
            segment[4:6] = (len(segment) - 40).to_bytes(2, "big")
        segment[l4 + 4:l4 + 8] = ((sequence + start) & 0xFFFFFFFF).to_bytes(4, "big")
        each = tcp_flags
        if index < len(offsets) - 1:
            each &= ~(_FIN | _PSH)
        if index:
            each &= ~_CWR
        segment[l4 + 13] = each
        segment[l4 + 16:l4 + 18] = b"\0\0"
        value = internet_checksum(segment[l4:], pseudo_header_sum(src, dst, 6, len(segment) - l4))
        segment[l4 + 16:l4 + 18] = value.to_bytes(2, "big")
        segments.append(bytes(segment))
    return segments


def _checksums_valid(packet: bytes, version: int, l4: int) -> bool:
    if version == 4 and ones_complement_sum(packet[:l4]) != 0xFFFF:
        return False
    src, dst = _addresses(packet)
    total = ones_complement_sum(packet[l4:]) + pseudo_header_sum(src, dst, 6, len(packet) - l4)
    return _fold_complement(total) == 0


class _Segment:
    """What `coalesce` needs to know of a packet that may join a run (None from `_segment`: it may not)."""

    __slots__ = ("packet", "version", "l4", "header_length", "payload", "ip_id", "sequence", "flags")

    def __init__(self, packet: bytes, version: int, l4: int, header_length: int) -> None:
        self.packet = packet
        self.version = version
        self.l4 = l4
        self.header_length = header_length
        self.payload = len(packet) - header_length
        self.ip_id = int.from_bytes(packet[4:6], "big")
        self.sequence = int.from_bytes(packet[l4 + 4:l4 + 8], "big")
        self.flags = packet[l4 + 13]


def _segment(packet: bytes, coalescing: bool = True) -> _Segment | None:
    """`packet` as a TCP segment of a stream: ACK and at most PSH and ECE, not a fragment, lengths exact, no
    IP options beyond what the header holds. `coalescing` (a super-packet is made of it): it must also carry
    data and have right checksums, so the kernel's recomputation never "repairs" a corrupt one; without (a
    train's run, `flow_run`: handled as each of its packets would be), checksums are not looked at."""
    if len(packet) < 40:
        return None
    version = packet[0] >> 4
    if version == 4:
        l4 = (packet[0] & 0x0F) * 4
        if (l4 < 20 or packet[9] != 6 or int.from_bytes(packet[2:4], "big") != len(packet)
                or int.from_bytes(packet[6:8], "big") & 0x3FFF):
            return None
    elif version == 6:
        l4 = 40
        if packet[6] != 6 or int.from_bytes(packet[4:6], "big") + 40 != len(packet):
            return None
    else:
        return None
    if l4 + 20 > len(packet):
        return None
    header_length = l4 + (packet[l4 + 12] >> 4) * 4
    flags = packet[l4 + 13]
    if (header_length < l4 + 20 or header_length > len(packet) or (coalescing and header_length == len(packet))
            or not flags & _ACK or flags & ~(_ACK | _PSH | _ECE)):
        return None
    if coalescing and not _checksums_valid(packet, version, l4):
        return None
    return _Segment(packet, version, l4, header_length)


def _masked(segment: _Segment) -> bytes:
    """The header with what differs between the segments of one super-packet blanked out."""
    header = bytearray(segment.packet[:segment.header_length])
    l4 = segment.l4
    if segment.version == 4:
        header[2:6] = b"\0" * 4
        header[10:12] = b"\0\0"
    else:
        header[4:6] = b"\0\0"
    header[l4 + 4:l4 + 8] = b"\0" * 4
    header[l4 + 13] &= ~_PSH
    header[l4 + 16:l4 + 18] = b"\0\0"
    return bytes(header)


def _joins(head: _Segment, head_mask: bytes, run: list[_Segment], candidate: _Segment) -> bool:
    last = run[-1]
    return (candidate.version == head.version and candidate.header_length == head.header_length
            and candidate.l4 == head.l4
            and candidate.payload <= head.payload
            and candidate.sequence == (last.sequence + last.payload) & 0xFFFFFFFF
            and (head.version == 6 or candidate.ip_id == (head.ip_id + len(run)) & 0xFFFF)
            and head.header_length + sum(each.payload for each in run) + candidate.payload <= MAX_SUPER
            and _masked(candidate) == head_mask)


def _super_packet(run: list[_Segment]) -> bytes:
    head = run[0]
    l4 = head.l4
    packet = bytearray(head.packet[:head.header_length])
    for each in run:
        packet += each.packet[each.header_length:]
    if head.version == 4:
        packet[2:4] = len(packet).to_bytes(2, "big")
        _ipv4_header_checksum(packet, l4)
    else:
        packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
    packet[l4 + 13] = head.flags | (run[-1].flags & _PSH)
    src, dst = _addresses(packet)
    # A partial checksum: the folded pseudo-header sum (the super-packet's TCP length), not complemented.
    packet[l4 + 16:l4 + 18] = pseudo_header_sum(src, dst, 6, len(packet) - l4).to_bytes(2, "big")
    header = VNET_HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4 if head.version == 4 else GSO_TCPV6, head.header_length,
                              head.payload, l4, 16)
    return header + bytes(packet)


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Packets to write into a TUN with a vnet header → the writes (header included), in order: a run
    of consecutive segments of one flow — equal payloads but the last, which may be shorter; sequence
    numbers and IPv4 ids following on; PSH only on the last; headers otherwise identical — is one
    super-packet that the kernel's segmentation turns back into exactly those segments."""
    return [write for write, _ in coalesce_counted(packets)]


def coalesce_counted(packets: list[bytes]) -> list[tuple[bytes, int]]:
    """`coalesce`, with how many of `packets` each write carries."""
    writes: list[tuple[bytes, int]] = []
    index, count = 0, len(packets)
    while index < count:
        packet = packets[index]
        head = _segment(packet)
        index += 1
        if head is None or head.flags & _PSH:
            writes.append((EMPTY_HEADER + packet, 1))
            continue
        run, mask = [head], _masked(head)
        while index < count:
            candidate = _segment(packets[index])
            if candidate is None or not _joins(head, mask, run, candidate):
                break
            run.append(candidate)
            index += 1
            if candidate.payload < head.payload or candidate.flags & _PSH:
                break
        writes.append((_super_packet(run) if len(run) > 1 else EMPTY_HEADER + packet, len(run)))
    return writes


def flow_run(payloads: list[bytes], start: int, offset: int) -> int:
    """How many of `payloads[start:]` (at least 1) carry, behind the same `offset` bytes of outer header,
    TCP packets of one flow whose headers differ only where the segments of one stream do (lengths, IPv4
    id and checksum, sequence number, PSH, TCP checksum): what a node decides for the first from its
    headers, it decides for each of them. A UDP GRO train is cut into such runs (runtime/udp.py)."""
    if not 0 <= start < len(payloads) or offset < 0:
        raise IndexError("flow_run: start or offset out of range")
    first = payloads[start]
    head = _segment(first[offset:], coalescing=False) if len(first) > offset else None
    if head is None:
        return 1
    mask, outer = _masked(head), first[:offset]
    run = 1
    for payload in payloads[start + 1:]:
        if len(payload) <= offset or payload[:offset] != outer:
            break
        candidate = _segment(payload[offset:], coalescing=False)
        if (candidate is None or candidate.version != head.version or candidate.header_length != head.header_length
                or _masked(candidate) != mask):
            break
        run += 1
    return run
