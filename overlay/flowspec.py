"""Flow specs: a one-line way to write a packet, turned into real bytes (with dpkt) for `overlay explain`.

Grammar (addresses v4 or v6; IPv6 with a port goes in brackets)::

    tcp SRC:PORT > DST:PORT [flags S|SA|A|F|R...] [size N] [frag]
    udp SRC:PORT > DST:PORT [size N] [frag]
    icmp SRC > DST [echo|reply] [id N]                  (ICMPv6 when the addresses are v6)
    icmp SRC > DST unreachable|frag-needed|time-exceeded|too-big [mtu N] quoting <tcp|udp|icmp spec>

`frag` makes a non-first fragment (offset 1480, no ports on the wire). An ICMP error quotes the packet
that the inner spec builds, as a router would (IP header + first 8 bytes).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import dpkt

_TCP_FLAGS = {"F": dpkt.tcp.TH_FIN, "S": dpkt.tcp.TH_SYN, "R": dpkt.tcp.TH_RST, "P": dpkt.tcp.TH_PUSH,
              "A": dpkt.tcp.TH_ACK, "U": dpkt.tcp.TH_URG}
_ERRORS_V4 = {"unreachable": (3, 1), "frag-needed": (3, 4), "too-big": (3, 4), "time-exceeded": (11, 0)}
_ERRORS_V6 = {"unreachable": (1, 3), "frag-needed": (2, 0), "too-big": (2, 0), "time-exceeded": (3, 0)}


class FlowSpecError(ValueError):
    pass


def looks_like_hex(text: str) -> bool:
    stripped = "".join(text.split()).removeprefix("0x")
    return len(stripped) >= 40 and all(c in "0123456789abcdefABCDEF" for c in stripped)


def parse_hex(text: str) -> bytes:
    stripped = "".join(text.split()).removeprefix("0x")
    try:
        return bytes.fromhex(stripped)
    except ValueError as exc:
        raise FlowSpecError(f"not valid hex: {exc}") from None


def build_packet(spec: str) -> bytes:
    words = spec.replace(">", " > ").split()
    if not words:
        raise FlowSpecError("empty flow spec")
    packet, rest = _build(words)
    if rest:
        raise FlowSpecError(f"unexpected words at the end: {' '.join(rest)}")
    return packet


def _endpoint(text: str, with_port: bool) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    host, port = text, None
    if with_port:
        if text.startswith("["):
            host, _, port_text = text[1:].partition("]:")
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        else:
            raise FlowSpecError(f"{text!r}: expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise FlowSpecError(f"{text!r}: bad port")
        port = int(port_text)
    try:
        return ipaddress.ip_address(host.strip("[]")), port
    except ValueError:
        raise FlowSpecError(f"{host!r} is not an IP address") from None


def _build(words: list[str]) -> tuple[bytes, list[str]]:
    proto = words[0].lower()
    if proto not in ("tcp", "udp", "icmp", "icmpv6"):
        raise FlowSpecError(f"a flow spec starts with tcp, udp or icmp, not {words[0]!r}")
    if len(words) < 4 or words[2] != ">":
        raise FlowSpecError(f"expected '{proto} SRC > DST'")
    with_ports = proto in ("tcp", "udp")
    src, sport = _endpoint(words[1], with_ports)
    dst, dport = _endpoint(words[3], with_ports)
    if src.version != dst.version:
        raise FlowSpecError("source and destination must be the same IP version")
    rest = words[4:]
    options: dict[str, str] = {}
    flags_text = "S"
    fragment = False
    error: str | None = None
    while rest and rest[0] != "quoting":
        word = rest.pop(0).lower()
        if word in ("flags", "size", "mtu", "id", "ttl"):
            if not rest:
                raise FlowSpecError(f"{word} needs a value")
            value = rest.pop(0)
            if word == "flags":
                flags_text = value.upper()
            else:
                if not value.isdigit():
                    raise FlowSpecError(f"{word} needs a number")
                options[word] = value
        elif word == "frag":
            fragment = True
        elif word in ("echo", "reply"):
            options["icmp"] = word
        elif word in _ERRORS_V4:
            error = word
        else:
            raise FlowSpecError(f"unknown word {word!r}")
    quoted: bytes | None = None
    if rest and rest[0] == "quoting":
        if error is None:
            raise FlowSpecError("'quoting' only follows an ICMP error type")
        quoted, rest = _build(rest[1:])
    if error is not None and quoted is None:
        raise FlowSpecError(f"an ICMP {error} must be 'quoting' the packet it is about")
    size = int(options.get("size", 0))
    payload = b"\0" * size
    if proto == "tcp":
        flags = 0
        for letter in flags_text:
            if letter not in _TCP_FLAGS:
                raise FlowSpecError(f"unknown TCP flag {letter!r} (use F S R P A U)")
            flags |= _TCP_FLAGS[letter]
        transport: bytes = bytes(dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=1000, win=65535, data=payload))
        number = 6
    elif proto == "udp":
        transport = bytes(dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + size, data=payload))
        number = 17
    else:
        number = 1 if src.version == 4 else 58
        if error is not None:
            table = _ERRORS_V4 if src.version == 4 else _ERRORS_V6
            icmp_type, code = table[error]
            mtu = int(options.get("mtu", 1400))
            assert quoted is not None
            body = quoted[: (quoted[0] & 0x0F) * 4 + 8] if src.version == 4 else quoted[:1232]
            fourth = struct.pack("!HH", 0, mtu) if (icmp_type, code) == (3, 4) else (
                struct.pack("!I", mtu) if src.version == 6 and icmp_type == 2 else b"\0\0\0\0")
            transport = struct.pack("!BBH", icmp_type, code, 0) + fourth + body
        else:
            echo_request = options.get("icmp", "echo") == "echo"
            icmp_type = (8 if echo_request else 0) if src.version == 4 else (128 if echo_request else 129)
            transport = struct.pack("!BBHHH", icmp_type, 0, 0, int(options.get("id", 1)), 1) + payload
    return _ip(src, dst, number, transport, fragment, int(options.get("ttl", 64))), rest


def _ip(src, dst, proto: int, transport: bytes, fragment: bool, ttl: int) -> bytes:  # type: ignore[no-untyped-def]
    if src.version == 4:
        ip = dpkt.ip.IP(src=src.packed, dst=dst.packed, p=proto, ttl=ttl, id=1, data=transport)
        if fragment:
            ip.offset = 185  # in 8-byte units: byte 1480, a non-first fragment (no transport header)
        else:
            ip.df = 1
        ip.len = 20 + len(transport)
        packet = bytearray(bytes(ip))
        if proto in (6, 17, 1) and not fragment:
            _fix_checksum(packet, 20, proto, src.packed, dst.packed, 4)
        return bytes(packet)
    if fragment:
        fragment_header = struct.pack("!BBHI", proto, 0, 185 << 3, 1)
        ip6 = dpkt.ip6.IP6(src=src.packed, dst=dst.packed, nxt=44, hlim=ttl, plen=len(fragment_header) + len(transport))
        return bytes(ip6.pack_hdr()) + fragment_header + transport
    ip6 = dpkt.ip6.IP6(src=src.packed, dst=dst.packed, nxt=proto, hlim=ttl, plen=len(transport))
    packet = bytearray(ip6.pack_hdr() + transport)
    _fix_checksum(packet, 40, proto, src.packed, dst.packed, 6)
    return bytes(packet)


def _fix_checksum(packet: bytearray, offset: int, proto: int, src: bytes, dst: bytes, version: int) -> None:
    from overlay.checksum import internet_checksum, pseudo_header_sum

    position = {6: 16, 17: 6, 1: 2, 58: 2}[proto]
    struct.pack_into("!H", packet, offset + position, 0)
    segment = packet[offset:]
    initial = 0 if proto == 1 else pseudo_header_sum(src, dst, proto, len(segment))
    value = internet_checksum(segment, initial)
    if proto == 17 and value == 0:
        value = 0xFFFF
    struct.pack_into("!H", packet, offset + position, value)


def describe(packet: bytes) -> str:
    """A one-line human description of an IP packet (for traces and errors)."""
    try:
        if packet[0] >> 4 == 4:
            ip = dpkt.ip.IP(packet)
            src, dst, proto = socket.inet_ntop(socket.AF_INET, ip.src), socket.inet_ntop(socket.AF_INET, ip.dst), ip.p
            payload = ip.data
            version = "IPv4"
        else:
            ip6 = dpkt.ip6.IP6(packet)
            src, dst, proto = socket.inet_ntop(socket.AF_INET6, ip6.src), socket.inet_ntop(socket.AF_INET6, ip6.dst), ip6.p
            payload = ip6.data
            version = "IPv6"
    except (dpkt.UnpackError, IndexError, struct.error, ValueError):
        return f"unparseable packet ({len(packet)} bytes)"
    names = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}
    text = f"{version} {names.get(proto, f'proto {proto}')} {src}"
    if isinstance(payload, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        text += f":{payload.sport} > {dst}:{payload.dport}"
    else:
        text += f" > {dst}"
    return f"{text} ({len(packet)} bytes)"
