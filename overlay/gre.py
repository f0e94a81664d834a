"""GRE-in-UDP (RFC 8086) framing: the GRE header (RFC 2784, key and sequence per RFC 2890) that rides
inside a UDP datagram. The kernel's UDP socket adds the outer IP and UDP headers, so this module only
builds and parses the UDP payload: ``GRE header || inner packet``.

Wire format (every field big-endian)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |C| |K|S| Reserved0       | Ver |         Protocol Type         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      Checksum (optional)      |       Reserved1 (optional)    |
    |                         Key (optional)                        |
    |                 Sequence Number (optional)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

We emit at most the key (4 or 8 bytes of GRE); we accept checksum, key and sequence from peers. The
checksum is not verified: UDP's own checksum already covers the payload.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

UDP_PORT = 4754  # RFC 8086 "GRE-in-UDP"
PROTO_IPV4 = 0x0800
PROTO_IPV6 = 0x86DD
# IEEE 802 "local experimental" EtherTypes. Keepalives: a TM agent echoes them unchanged. Second chance
# (how a draining TM finishes its connections while a new TM takes its rows — GLB Director's "second
# chance" in overlay terms): a TM that has no state for a packet the distributor marked (key, below)
# returns it under SECOND_CHANCE_PROTOCOL, and the distributor hands it to the draining TM the key names,
# marked LAST_CHANCE. A draining TM that has no state for it either and would *open* one (UDP, ICMP
# echo: nothing tells a new flow from an old one but state) declines it under DECLINED_PROTOCOL, and the
# distributor sends it, unmarked, to the row's TM, which opens it there.
KEEPALIVE_PROTOCOL = 0x88B5
SECOND_CHANCE_PROTOCOL = 0x88B6
DECLINED_PROTOCOL = 0x88B7
# A TM or edge tells the distributor where it is (sealed, empty): behind NAT, the distributor can only
# reach it at the endpoint its datagrams come from, and these keep the NAT's binding alive.
ANNOUNCE_PROTOCOL = 0x88B8
# Connection state a TM replicates (overlay/tm/replication.py): TM → distributor → the row's second choice.
REPLICATION_PROTOCOL = 0x88B9
# A standby's acknowledgement of a replication batch: standby → distributor → the batch's origin.
REPLICATION_ACK_PROTOCOL = 0x88BA

# The 32-bit GRE key: high 16 bits an optional fleet id (`underlay.gre_key`), low 16 bits the mark:
# 0 none, 1-0xFFFE the second-chance TM's stable id (`[[tm]] id`), LAST_CHANCE on the bounce's way to it.
FLEET_ID_MAX = 0xFFFF
TM_ID_MAX = 0xFFFE
LAST_CHANCE = 0xFFFF


def make_key(fleet_id: int | None, mark: int) -> int | None:
    """The GRE key to send: None (no key field at all) when there is neither a fleet id nor a mark."""
    if fleet_id is None and not mark:
        return None
    return ((fleet_id or 0) << 16) | mark


def key_fallback(key: int | None) -> int:
    """The mark in a received key (0 when there is no key)."""
    return 0 if key is None else key & 0xFFFF


def key_fleet(key: int | None) -> int:
    """The fleet id in a received key (0 when there is no key: the same as a fleet without an id)."""
    return 0 if key is None else key >> 16


def default_tm_id(name: str) -> int:
    """A TM's id when its config gives none: derived from the name alone, so adding or removing other TMs
    (a reload) never re-targets second-chance marks already in flight. Collisions are refused by the
    config, which then asks for an explicit `id`."""
    digest = hashlib.sha256(b"overlay-tm-id\0" + name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % TM_ID_MAX + 1

FLAG_CHECKSUM = 0x8000
FLAG_ROUTING = 0x4000
FLAG_KEY = 0x2000
FLAG_SEQUENCE = 0x1000
VERSION_MASK = 0x0007

# Outer overhead that encapsulation adds on the underlay, for MTU arithmetic.
UDP_HEADER = 8
IPV4_HEADER = 20
IPV6_HEADER = 40

_HEADER = struct.Struct("!HH")
_HEADER_KEY = struct.Struct("!HHI")
_PLAIN_V4 = _HEADER.pack(0, PROTO_IPV4)
_PLAIN_V6 = _HEADER.pack(0, PROTO_IPV6)


def gre_header_length(key: int | None) -> int:
    return 8 if key is not None else 4


def overhead(underlay_ipv6: bool, key: int | None) -> int:
    """Bytes encapsulation adds to an inner packet: outer IP + UDP + GRE."""
    return (IPV6_HEADER if underlay_ipv6 else IPV4_HEADER) + UDP_HEADER + gre_header_length(key)


def encapsulate(inner: bytes, *, key: int | None = None, protocol: int | None = None) -> bytes:
    """The UDP payload that carries `inner`. The protocol defaults from the inner IP version nibble."""
    if protocol is None:
        protocol = PROTO_IPV6 if inner and inner[0] >> 4 == 6 else PROTO_IPV4
    if key is None:
        if protocol == PROTO_IPV4:
            return _PLAIN_V4 + inner
        if protocol == PROTO_IPV6:
            return _PLAIN_V6 + inner
        return _HEADER.pack(0, protocol) + inner
    return _HEADER_KEY.pack(FLAG_KEY, protocol, key & 0xFFFFFFFF) + inner


@dataclass(slots=True)   # built per datagram: not frozen (~350 ns cheaper); treat as read-only
class Decapsulated:
    protocol: int
    key: int | None
    sequence: int | None
    inner: bytes


def decapsulate(payload: bytes) -> Decapsulated | None:
    """Parse a GRE-in-UDP payload; None when it is not a GRE header we accept (malformed, version ≠ 0,
    routing present, or shorter than its flags promise)."""
    if len(payload) < 4:
        return None
    flags, protocol = _HEADER.unpack_from(payload, 0)
    if flags & (VERSION_MASK | FLAG_ROUTING):
        return None
    offset = 4
    if flags & FLAG_CHECKSUM:
        offset += 4
    key = sequence = None
    if flags & FLAG_KEY:
        if len(payload) < offset + 4:
            return None
        key = int.from_bytes(payload[offset : offset + 4], "big")
        offset += 4
    if flags & FLAG_SEQUENCE:
        if len(payload) < offset + 4:
            return None
        sequence = int.from_bytes(payload[offset : offset + 4], "big")
        offset += 4
    if len(payload) < offset:
        return None
    return Decapsulated(protocol, key, sequence, bytes(payload[offset:]))
