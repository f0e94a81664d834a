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
