"""Test packets built with dpkt, a reading of them back, and an independent checksum oracle.

The oracle recomputes every checksum from scratch with a plain word-by-word RFC 1071 loop (nothing from
`overlay.checksum`), so the core's incremental updates are checked against a different computation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dpkt

A = ipaddress.ip_address

SYN = dpkt.tcp.TH_SYN
ACK = dpkt.tcp.TH_ACK
FIN = dpkt.tcp.TH_FIN
RST = dpkt.tcp.TH_RST
PSH = dpkt.tcp.TH_PUSH


def _ip(src: str, dst: str, protocol: int, payload: dpkt.Packet | bytes, ttl: int = 64) -> bytes:
    if A(src).version == 4:
        return bytes(dpkt.ip.IP(src=A(src).packed, dst=A(dst).packed, p=protocol, ttl=ttl, id=4242, data=payload))
    ip6 = dpkt.ip6.IP6(src=A(src).packed, dst=A(dst).packed, nxt=protocol, hlim=ttl, data=payload)
    ip6.plen = len(bytes(payload))
    # dpkt fills the transport checksum of IPv6 packets when packing the IP6 object.
    return bytes(ip6)


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = ACK, data: bytes = b"", seq: int = 1000) -> bytes:
    return _ip(src, dst, 6, dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=7, win=65535, data=data))


def udp(src: str, sport: int, dst: str, dport: int, data: bytes = b"payload") -> bytes:
    return _ip(src, dst, 17, dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(data), data=data))


def udp_without_checksum(src: str, sport: int, dst: str, dport: int, data: bytes = b"payload") -> bytes:
    packet = bytearray(udp(src, sport, dst, dport, data))
    packet[26:28] = b"\x00\x00"
    return bytes(packet)


def echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False) -> bytes:
    v6 = A(src).version == 6
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    body = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=b"ping")
    message = (dpkt.icmp6.ICMP6 if v6 else dpkt.icmp.ICMP)(type=kind, code=0, data=body)
    return _ip(src, dst, 58 if v6 else 1, message)


def icmp_error(src: str, dst: str, quoted: bytes, kind: str = "unreachable", mtu: int = 1400,
               quote_bytes: int | None = None) -> bytes:
    """An ICMP(v6) error from `src` to `dst` quoting `quoted` (whole, or its first `quote_bytes`)."""
    v6 = A(src).version == 6
    body = quoted if quote_bytes is None else quoted[:quote_bytes]
    codes = {
        # kind: (v4 type, v4 code, v6 type, v6 code)
        "unreachable": (3, 3, 1, 4),         # port unreachable
        "frag-needed": (3, 4, 2, 0),         # fragmentation needed / packet too big
        "time-exceeded": (11, 0, 3, 0),
    }
    v4_type, v4_code, v6_type, v6_code = codes[kind]
    if v6:
        head = (mtu if kind == "frag-needed" else 0).to_bytes(4, "big")
        message = dpkt.icmp6.ICMP6(type=v6_type, code=v6_code, data=head + body)
        return _ip(src, dst, 58, message)
    head = (mtu if kind == "frag-needed" else 0).to_bytes(4, "big")
    message = dpkt.icmp.ICMP(type=v4_type, code=v4_code, data=head + body)
    return _ip(src, dst, 1, message)


# -- reading packets back --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Flow:
    """The addresses and ports (or echo identifier) of a packet, as text for readable assertions."""

    protocol: str
    src: str
    sport: int
    dst: str
    dport: int


def flow(packet: bytes) -> Flow:
    ip = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    protocol = ip.p if packet[0] >> 4 == 4 else ip.nxt
    l4 = packet[(packet[0] & 15) * 4:] if packet[0] >> 4 == 4 else packet[40:]
    src, dst = str(A(ip.src)), str(A(ip.dst))
    if protocol in (6, 17):
        return Flow({6: "tcp", 17: "udp"}[protocol], src, int.from_bytes(l4[0:2], "big"), dst,
                    int.from_bytes(l4[2:4], "big"))
    ident = int.from_bytes(l4[4:6], "big")
    return Flow("icmp", src, ident, dst, l4[0])


def payload(packet: bytes) -> bytes:
    """The transport payload (TCP/UDP data, ICMP body after the 8-byte header)."""
    ip = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    transport = ip.data
    if isinstance(transport, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)):
        return bytes(transport)[8:]
    return bytes(transport.data)


def quoted(packet: bytes) -> bytes:
    """The packet an ICMP(v6) error quotes."""
    start = (packet[0] & 15) * 4 if packet[0] >> 4 == 4 else 40
    return packet[start + 8:]


# -- the checksum oracle -------------------------------------------------------------------------------

def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _verifies(data: bytes, pseudo: bytes = b"") -> bool:
    """A region with its checksum field in place sums to 0xFFFF (one's-complement -0)."""
    return _sum(pseudo + data) == 0xFFFF


def checksum_problems(packet: bytes, quoted_packet: bool = False) -> list[str]:
    """Every checksum of `packet` that does not verify (empty: all good). A quoted packet (inside an
    ICMP error) may be cut short: only the checksums it contains completely are checked."""
    problems: list[str] = []
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 15) * 4
        if not _verifies(packet[:header]):
            problems.append("ipv4 header")
        total = int.from_bytes(packet[2:4], "big")
        protocol, l4, src, dst = packet[9], header, packet[12:16], packet[16:20]
    else:
        total = 40 + int.from_bytes(packet[4:6], "big")
        protocol, l4, src, dst = packet[6], 40, packet[8:24], packet[24:40]
    if len(packet) < total:
        if quoted_packet:
            return problems
        return problems + ["truncated"]
    body = packet[l4:total]
    pseudo = src + dst + (b"\x00\x00" + len(body).to_bytes(2, "big") + b"\x00\x00\x00" + bytes([protocol])
                          if version == 6 else b"\x00" + bytes([protocol]) + len(body).to_bytes(2, "big"))
    if protocol == 6 and not _verifies(body, pseudo):
        problems.append("tcp")
    if protocol == 17 and body[6:8] != b"\x00\x00" and not _verifies(body, pseudo):
        problems.append("udp")
    if protocol == 1 and not _verifies(body):
        problems.append("icmp")
    if protocol == 58 and not _verifies(body, pseudo):
        problems.append("icmpv6")
    if protocol in (1, 58) and body[0] in ((3, 11, 12) if version == 4 else (1, 2, 3, 4)):
        problems += [f"quoted {problem}" for problem in checksum_problems(body[8:], quoted_packet=True)]
    return problems


# -- fragments: made and put back together independently of the core ---------------------------------------

def fragments(packet: bytes, size: int, ident: int = 0x4242) -> list[bytes]:
    """`packet` fragmented into pieces of at most `size` bytes of IP packet each, as a sender would
    (IPv4: MF and 8-byte offsets, header checksums; IPv6: a fragment header with identification `ident`)."""
    if packet[0] >> 4 == 4:
        header, body = packet[:20], packet[20:]
        step = (size - 20) // 8 * 8
        pieces = []
        for start in range(0, len(body), step):
            chunk = body[start:start + step]
            more = start + step < len(body)
            fragment = bytearray(header + chunk)
            fragment[2:4] = (20 + len(chunk)).to_bytes(2, "big")
            fragment[6:8] = ((0x2000 if more else 0) | start // 8).to_bytes(2, "big")
            fragment[10:12] = b"\x00\x00"
            fragment[10:12] = (~_sum(bytes(fragment[:20])) & 0xFFFF).to_bytes(2, "big")
            pieces.append(bytes(fragment))
        return pieces
    header, next_header, body = packet[:40], packet[6], packet[40:]
    step = (size - 48) // 8 * 8
    pieces = []
    for start in range(0, len(body), step):
        chunk = body[start:start + step]
        more = start + step < len(body)
        fragment_header = bytes([next_header, 0]) + (start | more).to_bytes(2, "big") + ident.to_bytes(4, "big")
        fixed = bytearray(header)
        fixed[4:6] = (8 + len(chunk)).to_bytes(2, "big")
        fixed[6] = 44
        pieces.append(bytes(fixed) + fragment_header + chunk)
    return pieces


def reassemble(pieces: list[bytes]) -> bytes:
    """The datagram the receiver rebuilds from `pieces` (any order); AssertionError when they do not
    make exactly one whole datagram."""
    if pieces[0][0] >> 4 == 4:
        keyed = {int.from_bytes(p[6:8], "big") & 0x1FFF: p for p in pieces}
        assert len(keyed) == len(pieces) and len({p[12:20] + p[4:6] + p[9:10] for p in pieces}) == 1
        body = b""
        for offset in sorted(keyed):
            piece = keyed[offset]
            assert offset * 8 == len(body), "a hole or an overlap"
            body += piece[20:int.from_bytes(piece[2:4], "big")]
        assert not int.from_bytes(keyed[max(keyed)][6:8], "big") & 0x2000, "the last fragment has MF"
        header = bytearray(keyed[0][:20])
        header[2:4] = (20 + len(body)).to_bytes(2, "big")
        header[6:8] = b"\x00\x00"
        header[10:12] = b"\x00\x00"
        header[10:12] = (~_sum(bytes(header)) & 0xFFFF).to_bytes(2, "big")
        return bytes(header) + body
    keyed6 = {int.from_bytes(p[42:44], "big") & 0xFFF8: p for p in pieces}
    assert len(keyed6) == len(pieces) and len({p[8:40] + p[44:48] for p in pieces}) == 1
    body = b""
    for offset in sorted(keyed6):
        assert offset == len(body), "a hole or an overlap"
        body += keyed6[offset][48:]
    assert not keyed6[max(keyed6)][43] & 1, "the last fragment has M"
    header = bytearray(keyed6[0][:40])
    header[4:6] = len(body).to_bytes(2, "big")
    header[6] = keyed6[0][40]
    return bytes(header) + body
