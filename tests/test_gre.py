"""overlay.gre: GRE-in-UDP payloads byte for byte (the worked example of docs/wire-format.md), round
trips, what peers may send us, and what we refuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import gre
from tests.distributor import packets as P

INNER_V4 = P.tcp("198.51.100.10", 40000, "203.0.113.80", 80)
INNER_V6 = P.tcp("2001:db8:1::10", 40000, "2001:db8:80::80", 80)

ENCODE_CASES = [
    # description, inner, key, protocol, expected payload
    ("IPv4 inner, no key: 4-byte header, protocol 0x0800", INNER_V4, None, None, bytes.fromhex("00000800") + INNER_V4),
    ("IPv6 inner, no key: protocol 0x86DD", INNER_V6, None, None, bytes.fromhex("000086dd") + INNER_V6),
    ("key present: K bit (0x2000) and 4 key bytes", INNER_V4, 0x00070002, None, bytes.fromhex("20000800" "00070002") + INNER_V4),
    ("key 0 is still a key field", INNER_V4, 0, None, bytes.fromhex("20000800" "00000000") + INNER_V4),
    ("keepalive protocol", b"OVKA", None, gre.KEEPALIVE_PROTOCOL, bytes.fromhex("000088b5") + b"OVKA"),
]


@pytest.mark.parametrize(("inner", "key", "protocol", "expected"), [pytest.param(*c[1:], id=c[0]) for c in ENCODE_CASES])
def test_encapsulate(inner: bytes, key: int | None, protocol: int | None, expected: bytes) -> None:
    assert gre.encapsulate(inner, key=key, protocol=protocol) == expected


DECODE_CASES = [
    # description, payload, expected (protocol, key, sequence, inner) or None
    ("plain", bytes.fromhex("00000800") + INNER_V4, (0x0800, None, None, INNER_V4)),
    ("key", bytes.fromhex("2000 86dd 0000002a") + INNER_V6, (0x86DD, 42, None, INNER_V6)),
    ("checksum, key and sequence (RFC 2890 order)", bytes.fromhex("b000 0800 abcd0000 00000007 00000009") + INNER_V4, (0x0800, 7, 9, INNER_V4)),
    ("sequence only", bytes.fromhex("1000 0800 00000005") + INNER_V4, (0x0800, None, 5, INNER_V4)),
    ("empty inner", bytes.fromhex("00000800"), (0x0800, None, None, b"")),
    # Negative cases: None means "refused".
    ("empty", b"", None),
    ("3 bytes", bytes.fromhex("000008"), None),
    ("version 1 (PPTP's enhanced GRE)", bytes.fromhex("00010800") + INNER_V4, None),
    ("routing present (RFC 1701, deprecated)", bytes.fromhex("40000800") + INNER_V4, None),
    ("key flag, key cut short", bytes.fromhex("20000800 0000"), None),
    ("sequence flag, sequence cut short", bytes.fromhex("30000800 00000001 00"), None),
    ("checksum flag, checksum cut short", bytes.fromhex("80000800 00"), None),
]


@pytest.mark.parametrize(("payload", "expected"), [pytest.param(*c[1:], id=c[0]) for c in DECODE_CASES])
def test_decapsulate(payload: bytes, expected: tuple[object, ...] | None) -> None:
    frame = gre.decapsulate(payload)
    if expected is None:
        assert frame is None
    else:
        assert frame is not None and (frame.protocol, frame.key, frame.sequence, frame.inner) == expected


@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_round_trip(inner: bytes, key: int | None) -> None:
    frame = gre.decapsulate(gre.encapsulate(inner, key=key, protocol=gre.PROTO_IPV4))
    assert frame is not None and (frame.protocol, frame.key, frame.inner) == (gre.PROTO_IPV4, key, inner)


@given(st.binary(max_size=40))
def test_decapsulate_never_raises(payload: bytes) -> None:
    frame = gre.decapsulate(payload)
    assert frame is None or isinstance(frame.inner, bytes)


@pytest.mark.parametrize(
    ("underlay_ipv6", "key", "overhead"),
    [(False, None, 32), (False, 1, 36), (True, None, 52), (True, 1, 56)],
)
def test_overhead(underlay_ipv6: bool, key: int | None, overhead: int) -> None:
    """Outer IP (20/40) + UDP (8) + GRE (4, or 8 with a key)."""
    assert gre.overhead(underlay_ipv6, key) == overhead


@pytest.mark.parametrize(
    ("fleet", "fallback", "key"),
    [(None, 0, None), (None, 3, 3), (7, 0, 0x70000), (0xFFFF, 0xFFFF, 0xFFFFFFFF)],
)
def test_key_layout(fleet: int | None, fallback: int, key: int | None) -> None:
    """High 16 bits: fleet id; low 16 bits: the second-chance TM (0 = none); no key at all without either."""
    assert gre.make_key(fleet, fallback) == key
    assert gre.key_fallback(key) == fallback


def test_worked_example_of_the_wire_format_doc() -> None:
    """docs/wire-format.md walks through exactly these bytes."""
    inner = P.udp("198.51.100.10", 40000, "203.0.113.80", 53, payload=b"hi")
    payload = gre.encapsulate(inner, key=gre.make_key(1, 0))
    assert payload.hex() == "20000800" "00010000" + inner.hex()
    assert inner.hex() == "4500001e0001000040111440c633640acb0071509c400035000a946c6869"
    assert struct.unpack("!HH", payload[:4]) == (gre.FLAG_KEY, gre.PROTO_IPV4)
