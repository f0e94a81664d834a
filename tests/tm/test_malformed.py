"""Malformed, truncated and unsupported packets are dropped with a named reason, never raise."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.tm import reasons as R
from overlay.tm.core import TrafficManager

from .addresses import CLIENT, CLIENT6, REMOTE, SERVER1, VIP, VIP6, XLATE
from .conftest import lab_config_with_dns
from .packets import A, SYN, echo, icmp_error, tcp, udp


def patched(packet: bytes, offset: int, value: bytes) -> bytes:
    return packet[:offset] + value + packet[offset + len(value):]


def ipv6_with_extension(next_header: int, extension: bytes, payload: bytes, payload_protocol: int) -> bytes:
    header = dpkt.ip6.IP6(src=A(CLIENT6).packed, dst=A(VIP6).packed, nxt=next_header, hlim=64)
    body = bytes([payload_protocol]) + extension[1:] + payload
    header.plen = len(body)
    return bytes(header)[:40] + body


V4_SYN = tcp(CLIENT, 40000, VIP, 80, SYN)
V6_SYN = tcp(CLIENT6, 40000, VIP6, 80, SYN)
TCP6_BODY = V6_SYN[40:]

MALFORMED = [
    ("empty", b"", R.MALFORMED_EMPTY),
    ("IP version 5", b"\x50" + V4_SYN[1:], R.MALFORMED_VERSION),
    ("IPv4 shorter than its header", V4_SYN[:19], R.MALFORMED_TRUNCATED_IPV4),
    ("IPv4 header length 16", patched(V4_SYN, 0, b"\x44"), R.MALFORMED_IPV4_HEADER_LENGTH),
    ("IPv4 total length below the header", patched(V4_SYN, 2, b"\x00\x10"), R.MALFORMED_IPV4_TOTAL_LENGTH),
    ("IPv4 total length beyond the bytes", patched(V4_SYN, 2, b"\x05\xdc"), R.MALFORMED_TRUNCATED_IPV4),
    ("IPv4 first fragment cut inside the TCP header", patched(patched(V4_SYN, 6, b"\x20\x00"), 2, b"\x00\x1e")[:30],
     R.MALFORMED_TRUNCATED_TCP),
    ("IPv4 first fragment of a UDP length below 8", patched(patched(udp(CLIENT, 1, VIP, 53), 6, b"\x20\x00"), 24, b"\x00\x04"),
     R.MALFORMED_UDP_LENGTH),
    ("a fragmented ICMP error", patched(icmp_error(REMOTE, XLATE, udp(XLATE, 1024, REMOTE, 53)), 6, b"\x20\x00"),
     R.UNSUPPORTED_FRAGMENT),
    ("IPv4 GRE is not tracked", patched(V4_SYN, 9, b"\x2f"), R.UNSUPPORTED_PROTOCOL),
    ("ICMPv6 number inside IPv4", patched(V4_SYN, 9, b"\x3a"), R.UNSUPPORTED_PROTOCOL),
    ("IPv6 shorter than its header", V6_SYN[:39], R.MALFORMED_TRUNCATED_IPV6),
    ("IPv6 payload length beyond the bytes", patched(V6_SYN, 4, b"\x05\xdc"), R.MALFORMED_TRUNCATED_IPV6),
    ("IPv6 fragment header cut short", ipv6_with_extension(44, bytes(4), b"", 6), R.MALFORMED_IPV6_FRAGMENT),
    ("IPv6 first fragment then a routing header", ipv6_with_extension(44, bytes([0, 0, 0, 1, 0, 0, 0, 9]), bytes([6, 0]) + bytes(6), 43),
     R.UNSUPPORTED_IPV6_EXTENSION),
    ("IPv6 routing header", ipv6_with_extension(43, bytes(8), TCP6_BODY, 6), R.UNSUPPORTED_IPV6_EXTENSION),
    ("IPv6 hop-by-hop running past the end", ipv6_with_extension(0, b"\x06\x05" + bytes(6), b"", 6),
     R.MALFORMED_IPV6_EXTENSION),
    ("bytes cut inside the TCP header", V4_SYN[:30], R.MALFORMED_TRUNCATED_IPV4),
    ("TCP header cut by the IP length", patched(V4_SYN, 2, b"\x00\x1e")[:30], R.MALFORMED_TRUNCATED_TCP),
    ("TCP data offset 4", patched(V4_SYN, 32, b"\x40"), R.MALFORMED_TCP_OFFSET),
    ("TCP data offset past the end", patched(V4_SYN, 32, b"\xf0"), R.MALFORMED_TCP_OFFSET),
    ("UDP shorter than 8 bytes", patched(udp(CLIENT, 1, VIP, 53), 2, b"\x00\x1a")[:26], R.MALFORMED_TRUNCATED_UDP),
    ("UDP length beyond the packet", patched(udp(CLIENT, 1, VIP, 53), 24, b"\x00\xff"), R.MALFORMED_UDP_LENGTH),
    ("UDP length below 8", patched(udp(CLIENT, 1, VIP, 53), 24, b"\x00\x04"), R.MALFORMED_UDP_LENGTH),
    ("ICMP shorter than 8 bytes", patched(echo(SERVER1, REMOTE, 1), 2, b"\x00\x1a")[:26], R.MALFORMED_TRUNCATED_ICMP),
    ("ICMP timestamp request", patched(echo(SERVER1, REMOTE, 1), 20, b"\x0d"), R.UNSUPPORTED_ICMP_TYPE),
    ("ICMP error quoting IPv6 in IPv4",
     icmp_error("192.0.2.1", XLATE, tcp(CLIENT6, 1, VIP6, 80, SYN)), R.MALFORMED_ICMP_INNER),
]


@pytest.mark.parametrize("description, packet, reason", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_packet_is_dropped_with_its_reason(description: str, packet: bytes, reason: str) -> None:
    tm = TrafficManager(lab_config_with_dns())
    result = tm.receive(packet, 1.0)
    assert (result.action, result.packet, result.reason) == ("drop", None, reason)
    assert tm.counters()[R.counter_name(reason)] == 1


def test_ipv6_destination_options_are_skipped() -> None:
    packet = ipv6_with_extension(60, bytes(8), TCP6_BODY, 6)
    tm = TrafficManager(lab_config_with_dns())
    result = tm.receive(packet, 1.0)
    assert (result.action, result.reason) == ("overlay", "dnat")


VALID = [tcp(CLIENT, 40000, VIP, 80, SYN), udp(SERVER1, 5, REMOTE, 53), echo(SERVER1, REMOTE, 9),
         icmp_error("192.0.2.1", XLATE, tcp(XLATE, 1024, REMOTE, 443, SYN)), V6_SYN]
ACTIONS = {"overlay", "local", "drop"}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(data: bytes) -> None:
    tm = TrafficManager(lab_config_with_dns())
    for packet in (data, b"\x45" + data, b"\x60" + data):
        result = tm.receive(packet, 1.0)
        assert result.action in ACTIONS and result.reason in R.ALL_REASONS
        assert tm.from_local(packet, 1.0).reason in R.ALL_REASONS


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 200), st.integers(0, 255), st.integers(0, 200))
def test_mutated_and_truncated_packets_never_raise(packet: bytes, offset: int, value: int, cut: int) -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(tcp(SERVER1, 5555, REMOTE, 443, SYN), 0.0)   # some state for errors to refer to
    mutated = bytearray(packet)
    if offset < len(mutated):
        mutated[offset] = value
    result = tm.receive(bytes(mutated[:len(mutated) - cut] if cut < len(mutated) else mutated), 1.0)
    assert result.action in ACTIONS and result.reason in R.ALL_REASONS
    assert (result.packet is None) == (result.action == "drop")
