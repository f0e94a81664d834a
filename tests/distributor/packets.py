"""Real test packets, built with dpkt (and by hand only where dpkt cannot: IPv6 extension chains).

Every builder returns wire bytes. Addresses are text (`"198.51.100.10"`, `"2001:db8:1::10"`); the
version follows from the address. dpkt fills lengths and checksums, so what the distributor sees is what
a kernel would have put into its TUN.
"""

from __future__ import annotations

import ipaddress
import struct

import dpkt

TCP_SYN = dpkt.tcp.TH_SYN
TCP_ACK = dpkt.tcp.TH_ACK

# IPv6 extension header numbers.
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
DEST_OPTS = 60


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def version_of(address: str) -> int:
    return ipaddress.ip_address(address).version


def transport(proto: int, sport: int, dport: int, flags: int = TCP_SYN, payload: bytes = b"") -> dpkt.Packet:
    if proto == 6:
        return dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=1000, data=payload)
    if proto == 17:
        return dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)  # dpkt leaves ulen at 8
    raise ValueError(proto)


def _checksummed_v6(src: bytes, dst: bytes, nxt: int, segment: bytes, checksum_offset: int) -> bytes:
    """Fill the upper-layer checksum of an IPv6 payload (dpkt only does it for a bare IP6 object)."""
    body = bytearray(segment)
    body[checksum_offset : checksum_offset + 2] = b"\0\0"
    pseudo = src + dst + struct.pack("!IxxxB", len(body), nxt)
    struct.pack_into("!H", body, checksum_offset, rfc1071(pseudo + bytes(body)))
    return bytes(body)


def rfc1071(data: bytes) -> int:
    """Independent Internet checksum (a textbook loop, not overlay.checksum) to verify what the core emits."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    src: str, dst: str, proto: int, data: bytes | dpkt.Packet, *, df: bool = False, mf: bool = False,
    offset_units: int = 0, options: bytes = b"", ident: int = 1, ttl: int = 64,
) -> bytes:
    """An IPv4 packet; `options` (a multiple of 4 bytes) lengthen the header."""
    assert len(options) % 4 == 0
    off = (dpkt.ip.IP_DF if df else 0) | (dpkt.ip.IP_MF if mf else 0) | offset_units
    ip = dpkt.ip.IP(src=packed(src), dst=packed(dst), p=proto, id=ident, ttl=ttl, _flags_offset=off, data=data, opts=options)
    ip.hl = 5 + len(options) // 4
    return bytes(ip)


def ipv6(src: str, dst: str, proto: int, data: bytes | dpkt.Packet, *, extensions: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """An IPv6 packet with an extension chain: each (type, body) — the builder writes next-header and
    length bytes. Bodies are padded to the header's unit (8 bytes)."""
    s, d = packed(src), packed(dst)
    segment = bytes(data)
    if isinstance(data, dpkt.tcp.TCP):
        segment = _checksummed_v6(s, d, 6, segment, 16)
    elif isinstance(data, dpkt.udp.UDP):
        segment = _checksummed_v6(s, d, 17, segment, 6)
    elif proto == 58 and len(segment) >= 4:
        segment = _checksummed_v6(s, d, 58, segment, 2)
    chain = b""
    types = [kind for kind, _ in extensions] + [proto]
    for (kind, body), nxt in zip(extensions, types[1:]):
        if kind == FRAGMENT:
            assert len(body) == 6
            chain += bytes([nxt, 0]) + body
        else:
            body = body + b"\0" * (-(len(body) + 2) % 8)
            chain += bytes([nxt, (len(body) + 2) // 8 - 1]) + body
    payload = chain + segment
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), types[0], 64, s, d) + payload


def fragment_body(offset_units: int, more: bool, ident: int = 7) -> bytes:
    """The 6 bytes after next-header/reserved of an IPv6 fragment header."""
    return struct.pack("!HI", (offset_units << 3) | int(more), ident)


def ip(src: str, dst: str, proto: int, data: bytes | dpkt.Packet, **kwargs: object) -> bytes:
    if version_of(src) == 4:
        return ipv4(src, dst, proto, data, **kwargs)  # type: ignore[arg-type]
    return ipv6(src, dst, proto, data, **kwargs)  # type: ignore[arg-type]


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = TCP_SYN, payload: bytes = b"", **kwargs: object) -> bytes:
    return ip(src, dst, 6, transport(6, sport, dport, flags, payload), **kwargs)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", **kwargs: object) -> bytes:
    return ip(src, dst, 17, transport(17, sport, dport, payload=payload), **kwargs)


def echo(src: str, dst: str, ident: int, request: bool = True) -> bytes:
    if version_of(src) == 4:
        kind = 8 if request else 0
        return ipv4(src, dst, 1, dpkt.icmp.ICMP(type=kind, data=dpkt.icmp.ICMP.Echo(id=ident, seq=1, data=b"ping")))
    kind = 128 if request else 129
    body = struct.pack("!BBHHH", kind, 0, 0, ident, 1) + b"ping"
    return ipv6(src, dst, 58, body)


def icmp_error(
    router: str, about: bytes, *, kind: str = "too-big", mtu: int = 1400, quote: int | None = None, **ip_options: object
) -> bytes:
    """The ICMP error a router at `router` sends to the source of `about`, quoting it: RFC 792 routers
    quote the IP header + 8 bytes (IPv4), RFC 4443 as much as fits in 1280 (IPv6). `kind` is `too-big`
    (v4 frag-needed / v6 packet-too-big), `unreachable` or `time-exceeded`; `ip_options` go to the IP builder."""
    version = about[0] >> 4
    if version == 4:
        header_length = (about[0] & 0x0F) * 4
        quoted = about[: header_length + 8] if quote is None else about[:quote]
        source = str(ipaddress.IPv4Address(about[12:16]))
        if kind == "too-big":
            icmp = dpkt.icmp.ICMP(type=3, code=4, data=dpkt.icmp.ICMP.Unreach(mtu=mtu, data=quoted))
        elif kind == "unreachable":
            icmp = dpkt.icmp.ICMP(type=3, code=1, data=dpkt.icmp.ICMP.Unreach(data=quoted))
        else:
            icmp = dpkt.icmp.ICMP(type=11, code=0, data=dpkt.icmp.ICMP.TimeExceed(data=quoted))
        return ipv4(router, source, 1, icmp, **ip_options)  # type: ignore[arg-type]
    quoted = about[: 1280 - 48] if quote is None else about[:quote]
    source = str(ipaddress.IPv6Address(about[8:24]))
    kinds = {"too-big": (2, 0, mtu), "unreachable": (1, 3, 0), "time-exceeded": (3, 0, 0)}
    kind_type, code, value = kinds[kind]
    body = struct.pack("!BBHI", kind_type, code, 0, value) + quoted
    return ipv6(router, source, 58, body, **ip_options)  # type: ignore[arg-type]


def verify_ipv4_header(packet: bytes) -> bool:
    return rfc1071(packet[: (packet[0] & 0x0F) * 4]) == 0


def verify_icmp(packet: bytes) -> bool:
    """True when the ICMP (v4) or ICMPv6 (pseudo-header) checksum of `packet` verifies."""
    if packet[0] >> 4 == 4:
        header_length = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        return rfc1071(packet[header_length:total]) == 0
    length = struct.unpack_from("!H", packet, 4)[0]
    pseudo = packet[8:40] + struct.pack("!IxxxB", length, 58)
    return rfc1071(pseudo + packet[40 : 40 + length]) == 0
