"""Flow specs: a one-line way to write a packet, turned into real bytes (with dpkt) for `overlay explain`.

Grammar (addresses v4 or v6; IPv6 with a port goes in brackets)::

    tcp SRC:PORT > DST:PORT [flags S|SA|A|F|R...] [size N] [ttl N] [frag]
    udp SRC:PORT > DST:PORT [size N] [ttl N] [frag]
    icmp SRC > DST [echo|reply] [id N] [size N] [ttl N]  (ICMPv6 when the addresses are v6)
    icmp SRC > DST unreachable|frag-needed|time-exceeded|too-big [mtu N] [ttl N] quoting <tcp|udp|icmp spec>

Numbers are decimal and bounded by their header field: PORT, `id` and `mtu` 0..65535, `ttl` 0..255,
`size` (payload bytes) up to what the IP length field allows for that protocol. A word that does not
apply to the protocol (`flags` on udp, `mtu` without an error type) is an error, not silently ignored.
`frag` makes a non-first fragment (offset 1480, no ports on the wire). An ICMP error quotes the packet
that the inner spec builds, as a router would (IP header + first 8 bytes).

Hex input (`looks_like_hex`): text made only of hex digits, with whitespace anywhere and one optional
leading `0x`, is packet bytes, whatever its length; anything else is a flow spec. The two never overlap:
a flow spec always holds `>` and a protocol word that is not hex.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field

import dpkt

_TCP_FLAGS = {"F": dpkt.tcp.TH_FIN, "S": dpkt.tcp.TH_SYN, "R": dpkt.tcp.TH_RST, "P": dpkt.tcp.TH_PUSH,
              "A": dpkt.tcp.TH_ACK, "U": dpkt.tcp.TH_URG}
_ERRORS_V4 = {"unreachable": (3, 1), "frag-needed": (3, 4), "too-big": (3, 4), "time-exceeded": (11, 0)}
_ERRORS_V6 = {"unreachable": (1, 3), "frag-needed": (2, 0), "too-big": (2, 0), "time-exceeded": (3, 0)}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_WITH_VALUE = ("flags", "size", "mtu", "id", "ttl")
_BOUNDS = {"mtu": 65535, "id": 65535, "ttl": 255}  # the width of the header field each one fills
_TRANSPORT_HEADER = {"tcp": 20, "udp": 8, "icmp": 8, "icmpv6": 8}  # ICMP: the echo header before the payload
_MAX_QUOTING = 8  # errors quoting errors: deeper than any real packet, and no input reaches the recursion limit


class FlowSpecError(ValueError):
    pass


def looks_like_hex(text: str) -> bool:
    stripped = _strip_hex(text)
    return bool(stripped) and all(c in _HEX_DIGITS for c in stripped)


def parse_hex(text: str) -> bytes:
    stripped = _strip_hex(text)
    if len(stripped) % 2:
        raise FlowSpecError(f"odd number of hex digits ({len(stripped)}): a byte is two")
    try:
        return bytes.fromhex(stripped)
    except ValueError as exc:
        raise FlowSpecError(f"not valid hex: {exc}") from None


def _strip_hex(text: str) -> str:
    stripped = "".join(text.split())
    return stripped[2:] if stripped[:2].lower() == "0x" else stripped


def build_packet(spec: str) -> bytes:
    words = spec.replace(">", " > ").split()
    if not words:
        raise FlowSpecError("empty flow spec")
    packet, rest = _build(words, 0)
    if rest:
        raise FlowSpecError(f"unexpected words at the end: {' '.join(rest)}")
    return packet


def _number(name: str, text: str, high: int) -> int:
    """A decimal 0..high. ASCII digits only: str.isdigit() also accepts '²', which int() refuses, and a
    length check first keeps int() away from its digit limit."""
    if text.isascii() and text.isdigit() and len(text) <= len(str(high)) and int(text) <= high:
        return int(text)
    shown = text if text.isascii() and text.isdigit() else repr(text)
    raise FlowSpecError(f"{name} {shown}: must be a number 0..{high}")


def _endpoint(text: str, with_port: bool) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    host, port = text, None
    if with_port:
        if text.startswith("["):
            host, _, port_text = text[1:].partition("]:")
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        else:
            raise FlowSpecError(f"{text!r}: expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535):
            raise FlowSpecError(f"{text}: port must be a number 0..65535")
        port = int(port_text)
    try:
        return ipaddress.ip_address(host.strip("[]")), port
    except ValueError:
        raise FlowSpecError(f"{host!r} is not an IP address") from None


@dataclass
class _Options:
    """The words after SRC > DST, as written (numbers checked once the whole spec is known)."""

    values: dict[str, str] = field(default_factory=dict)
    fragment: bool = False
    echo: str | None = None  # "echo" | "reply"
    error: str | None = None  # an ICMP error type


def _options(words: list[str]) -> tuple[_Options, list[str]]:
    """Read options up to `quoting` (returned with what follows it)."""
    options = _Options()
    rest = list(words)
    while rest and rest[0] != "quoting":
        word = rest.pop(0).lower()
        if word in _WITH_VALUE:
            if not rest or rest[0] == "quoting":
                raise FlowSpecError(f"{word} needs a value")
            options.values[word] = rest.pop(0)
        elif word == "frag":
            options.fragment = True
        elif word in ("echo", "reply"):
            options.echo = word
        elif word in _ERRORS_V4:
            if options.error is not None and options.error != word:
                raise FlowSpecError(f"{options.error} and {word}: one ICMP error type only")
            options.error = word
        else:
            raise FlowSpecError(f"unknown word {word!r}")
    return options, rest


def _check_applies(proto: str, options: _Options) -> None:
    """Refuse words that would be silently ignored for this kind of packet."""
    icmp = proto in ("icmp", "icmpv6")
    if "flags" in options.values and proto != "tcp":
        raise FlowSpecError("flags: only for tcp")
    if (options.echo or options.error) and not icmp:
        raise FlowSpecError(f"{options.echo or options.error}: only for icmp")
    if options.error is not None:
        if options.echo is not None:
            raise FlowSpecError(f"{options.echo}: not with an icmp error type ({options.error})")
        for word in ("size", "id"):
            if word in options.values:
                raise FlowSpecError(f"{word}: not of an icmp error (it quotes a packet)")
    if "id" in options.values and not icmp:
        raise FlowSpecError("id: only for icmp echo/reply")
    if "mtu" in options.values and options.error not in ("frag-needed", "too-big"):
        raise FlowSpecError("mtu: only for an icmp error that carries one (frag-needed, too-big)")


def _max_size(proto: str, version: int, fragment: bool) -> int:
    """The largest payload the IP length field can describe: IPv4's total length counts its own header,
    IPv6's payload length does not but counts a fragment header."""
    overhead = _TRANSPORT_HEADER[proto] + (20 if version == 4 else 8 if fragment else 0)
    return 65535 - overhead


def _build(words: list[str], depth: int) -> tuple[bytes, list[str]]:
    proto = words[0].lower()
    if proto not in _TRANSPORT_HEADER:
        raise FlowSpecError(f"a flow spec starts with tcp, udp or icmp, not {words[0]!r}")
    if len(words) < 4 or words[2] != ">":
        raise FlowSpecError(f"expected '{proto} SRC > DST'")
    with_ports = proto in ("tcp", "udp")
    src, sport = _endpoint(words[1], with_ports)
    dst, dport = _endpoint(words[3], with_ports)
    if src.version != dst.version:
        raise FlowSpecError("source and destination must be the same IP version")
    options, rest = _options(words[4:])
    _check_applies(proto, options)
    quoted: bytes | None = None
    if rest:  # it starts with "quoting"
        if options.error is None:
            raise FlowSpecError("'quoting' only follows an ICMP error type")
        if len(rest) == 1:
            raise FlowSpecError("quoting needs a flow spec after it")
        if depth >= _MAX_QUOTING:
            raise FlowSpecError(f"quoting nested more than {_MAX_QUOTING} deep")
        quoted, rest = _build(rest[1:], depth + 1)
    if options.error is not None and quoted is None:
        raise FlowSpecError(f"an ICMP {options.error} must be 'quoting' the packet it is about")
    values = options.values
    size = _number("size", values.get("size", "0"), _max_size(proto, src.version, options.fragment))
    numbers = {name: _number(name, text, _BOUNDS[name]) for name, text in values.items() if name in _BOUNDS}
    payload = b"\0" * size
    if proto == "tcp":
        flags = 0
        for letter in values.get("flags", "S").upper():
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
        if options.error is not None:
            table = _ERRORS_V4 if src.version == 4 else _ERRORS_V6
            icmp_type, code = table[options.error]
            mtu = numbers.get("mtu", 1400)
            assert quoted is not None
            body = quoted[: (quoted[0] & 0x0F) * 4 + 8] if src.version == 4 else quoted[:1232]
            fourth = struct.pack("!HH", 0, mtu) if (icmp_type, code) == (3, 4) else (
                struct.pack("!I", mtu) if src.version == 6 and icmp_type == 2 else b"\0\0\0\0")
            transport = struct.pack("!BBH", icmp_type, code, 0) + fourth + body
        else:
            echo_request = (options.echo or "echo") == "echo"
            icmp_type = (8 if echo_request else 0) if src.version == 4 else (128 if echo_request else 129)
            transport = struct.pack("!BBHHH", icmp_type, 0, 0, numbers.get("id", 1), 1) + payload
    return _ip(src, dst, number, transport, options.fragment, numbers.get("ttl", 64)), rest


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


def format_endpoint(address: str, port: int) -> str:
    """ADDRESS:PORT, IPv6 in brackets ([2001:db8::1]:80, never the ambiguous 2001:db8::1:80): the form
    flow specs and `--from-peer` read back."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def describe(packet: bytes) -> str:
    """A one-line human description of an IP packet (for traces and errors)."""
    headline = _headline_problem(packet)
    if headline is not None:
        return headline
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
    text = f"{version} {names.get(proto, f'proto {proto}')} "
    if isinstance(payload, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        text += f"{format_endpoint(src, payload.sport)} > {format_endpoint(dst, payload.dport)}"
    else:
        text += f"{src} > {dst}"
    return f"{text} ({len(packet)} bytes)"


def _headline_problem(packet: bytes) -> str | None:
    """What is wrong before any header can be read: say it plainly rather than "unparseable"."""
    if not packet:
        return "empty packet (0 bytes)"
    version = packet[0] >> 4
    if version not in (4, 6):
        return f"not an IP packet: version {version} ({len(packet)} bytes)"
    header = 20 if version == 4 else 40
    if len(packet) < header:
        return f"IPv{version} packet too short: {len(packet)} bytes, its header alone is {header}"
    return None
