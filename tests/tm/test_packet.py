"""The hot-path parser against dpkt (differential): same offsets, addresses, ports, flags and identifiers
for random valid packets of every kind the core tracks, IPv4 (with options) and IPv6."""

from __future__ import annotations

import ipaddress

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.tm.packet import ECHO_REPLY_MARK, ECHO_REQUEST_MARK, IcmpError, parse_ip, parse_transport

v4 = st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv4Address(n).packed)
v6 = st.integers(0, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n).packed)
ports = st.integers(0, 65535)
payloads = st.binary(max_size=40)
# IPv4 options: NOPs padded to a multiple of 4 bytes, so the header length varies from 20 to 60.
options = st.integers(0, 10).map(lambda words: b"\x01" * (4 * words))


def transport(kind: str, version: int, sport: int, dport: int, flags: int, data: bytes) -> dpkt.Packet:
    if kind == "tcp":
        return dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=data)
    if kind == "udp":
        return dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(data), data=data)
    echo_type = {("request", 4): 8, ("reply", 4): 0, ("request", 6): 128, ("reply", 6): 129}[(kind, version)]
    body = dpkt.icmp.ICMP.Echo(id=sport, seq=dport, data=data)
    return (dpkt.icmp.ICMP if version == 4 else dpkt.icmp6.ICMP6)(type=echo_type, data=body)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["tcp", "udp", "request", "reply"]), st.sampled_from([4, 6]), v4, v4, v6, v6, ports, ports,
       st.integers(0, 255), payloads, options)
def test_parser_agrees_with_dpkt(kind, version, s4, d4, s6, d6, sport, dport, flags, data, opts) -> None:
    protocol = {"tcp": 6, "udp": 17}.get(kind, 1 if version == 4 else 58)
    body = transport(kind, version, sport, dport, flags, data)
    if version == 4:
        packet = bytes(dpkt.ip.IP(src=s4, dst=d4, p=protocol, hl=5 + len(opts) // 4, opts=opts, data=body))
        src, dst = s4, d4
    else:
        header = dpkt.ip6.IP6(src=s6, dst=d6, nxt=protocol, hlim=64, data=body)
        header.plen = len(bytes(body))
        packet = bytes(header)
        src, dst = s6, d6
    reference = dpkt.ip.IP(packet) if version == 4 else dpkt.ip6.IP6(packet)

    parsed = parse_ip(packet)
    assert parsed == (version, protocol, 20 + len(opts) if version == 4 else 40, len(packet))
    key, info = parse_transport(packet, *parsed[:4])  # type: ignore[misc]
    assert key[:2 * len(src)] == src + dst == bytes(reference.src) + bytes(reference.dst)
    tail = key[2 * len(src):]
    if kind in ("tcp", "udp"):
        segment = reference.data
        assert tail == segment.sport.to_bytes(2, "big") + segment.dport.to_bytes(2, "big")
        assert info == (segment.flags if kind == "tcp" else 0)
    else:
        mark = ECHO_REQUEST_MARK if kind == "request" else ECHO_REPLY_MARK
        assert tail == mark + reference.data.data.id.to_bytes(2, "big")
        assert info == (0 if kind == "request" else 1)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["tcp", "udp", "request", "reply"]), v4, v4, ports, ports, st.integers(8, 60))
def test_icmp_error_key_is_the_quoted_flow_seen_from_the_other_side(kind, s4, d4, sport, dport, quote) -> None:
    protocol = {"tcp": 6, "udp": 17}.get(kind, 1)
    inner = bytes(dpkt.ip.IP(src=s4, dst=d4, p=protocol, data=transport(kind, 4, sport, dport, 2, b"x" * 20)))
    error = bytes(dpkt.ip.IP(src=b"\xc0\x00\x02\x01", dst=s4, p=1,
                             data=dpkt.icmp.ICMP(type=3, code=1, data=bytes(4) + inner[:20 + quote])))
    parsed = parse_ip(error)
    result = parse_transport(error, *parsed[:4])  # type: ignore[misc]
    assert isinstance(result, IcmpError)
    assert (result.inner_ip, result.inner_l4, result.inner_protocol) == (28, 48, protocol)
    # The key of the other direction of the quoted flow: destination first, then source.
    if kind in ("tcp", "udp"):
        assert result.key == d4 + s4 + dport.to_bytes(2, "big") + sport.to_bytes(2, "big")
    else:
        swapped_mark = ECHO_REPLY_MARK if kind == "request" else ECHO_REQUEST_MARK
        assert result.key == d4 + s4 + swapped_mark + sport.to_bytes(2, "big")
