"""Connection state replicated to a hot standby, so a TM's connections survive its crash (conntrackd's
model: the standby keeps an external cache and commits an entry when the connection's packets arrive).

Each TM batches what changed in its connection table — new connections and state changes — and sends
the batch to its distributor (GRE 0x88B9, sealed like every datagram). The distributor looks each entry's
original flow up in its table and forwards it to the row's *second choice*: the TM that takes the row if
this one fails. That TM keeps the entries in a bounded cache; when a packet arrives that it has no state
for, it looks in the cache first and, on a hit, commits the entry into its connection table with the
same translation, and the connection goes on. Sans-I/O.

What this covers: connections to a virtual service (DNAT) and firewall-mode connections. A source-NATed
connection's replies go to the address of the TM that chose it, so they cannot reach the standby: they
are not committed (counted as `replication.not_ours`) until xlate ownership moves with the failover.
Connections whose entry had not been sent yet when the TM died (the replication interval) are lost.

Entry wire format (big-endian), one after another in a batch:

    version(1) protocol(1) state(1) kind(1) idle_ms(4) | original key | reply key | new addresses, new ports

Keys are the conntrack keys (8+4 or 32+4 bytes for TCP/UDP, 8+3 or 32+3 for echo); new addresses and
ports only for kinds that translate (absent for firewall).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from overlay.tm.conntrack import Conn
from overlay.tm.packet import ADDRESS_LENGTH, ICMP, ICMPV6

KIND_DNAT = 0
KIND_SNAT = 1
KIND_HAIRPIN = 2
KIND_FIREWALL = 3
_KINDS = (KIND_DNAT, KIND_SNAT, KIND_HAIRPIN, KIND_FIREWALL)

_HEADER = struct.Struct("!BBBBI")
BATCH_BYTES = 1200   # one batch fits one datagram on any underlay


@dataclass(frozen=True, slots=True)
class Entry:
    version: int
    protocol: int
    state: int
    kind: int
    idle: float            # seconds since its last packet, when it was sent
    key: bytes             # the original direction's conntrack key
    reply_key: bytes
    addresses: bytes       # the original direction's new source + destination (b"" for firewall)
    ports: bytes           # the original direction's new ports (or echo id)


def _lengths(version: int, protocol: int) -> tuple[int, int]:
    """(key length, ports length) for a family and protocol."""
    address = ADDRESS_LENGTH[version]
    if protocol == ICMP or protocol == ICMPV6:
        return 2 * address + 3, 2
    return 2 * address + 4, 4


def entry_of(conn: Conn, kind: int, now: float) -> Entry:
    original = conn.original
    return Entry(conn.version, conn.protocol, conn.state, kind, max(0.0, now - conn.last_seen), original.key,
                 conn.reply.key, original.addresses or b"", original.ports or b"")


def encode(entries: list[Entry]) -> list[bytes]:
    """Entries packed into batches of at most BATCH_BYTES."""
    batches: list[bytes] = []
    current = bytearray()
    for entry in entries:
        packed = _HEADER.pack(entry.version, entry.protocol, entry.state, entry.kind,
                              min(int(entry.idle * 1000), 0xFFFFFFFF)) \
            + entry.key + entry.reply_key + entry.addresses + entry.ports
        if current and len(current) + len(packed) > BATCH_BYTES:
            batches.append(bytes(current))
            current = bytearray()
        current += packed
    if current:
        batches.append(bytes(current))
    return batches


def decode(batch: bytes) -> list[Entry] | str:
    """The entries of a batch, or a reason it is malformed (nothing of a malformed batch is used)."""
    entries: list[Entry] = []
    offset = 0
    while offset < len(batch):
        if offset + _HEADER.size > len(batch):
            return "malformed:replication-header"
        version, protocol, state, kind, idle_ms = _HEADER.unpack_from(batch, offset)
        if version not in ADDRESS_LENGTH or kind not in _KINDS or protocol not in (1, 6, 17, 58):
            return "malformed:replication-entry"
        key_length, ports_length = _lengths(version, protocol)
        translated = kind != KIND_FIREWALL
        size = 2 * key_length + ((2 * ADDRESS_LENGTH[version] + ports_length) if translated else 0)
        start = offset + _HEADER.size
        if start + size > len(batch):
            return "malformed:replication-entry"
        key = batch[start:start + key_length]
        reply_key = batch[start + key_length:start + 2 * key_length]
        rest = batch[start + 2 * key_length:start + size]
        addresses = rest[:2 * ADDRESS_LENGTH[version]] if translated else b""
        ports = rest[2 * ADDRESS_LENGTH[version]:] if translated else b""
        entries.append(Entry(version, protocol, state, kind, idle_ms / 1000, key, reply_key, addresses, ports))
        offset = start + size
    return entries


class StandbyCache:
    """Entries other TMs replicated to us, by (protocol, key) of both directions; the oldest go first when
    it is full. An entry stays until its connection's state would have timed out (`timeouts[state]`)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, bytes], tuple[Entry, float]] = OrderedDict()
        self.received = 0

    def __len__(self) -> int:
        return len(self._entries) // 2

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, entry: Entry, now: float) -> None:
        self.received += 1
        seen = now - entry.idle
        for key in (entry.key, entry.reply_key):
            index = (entry.protocol, key)
            self._entries.pop(index, None)
            self._entries[index] = (entry, seen)
        while len(self._entries) > 2 * self.max_entries:
            self._entries.popitem(last=False)

    def take(self, protocol: int, key: bytes, now: float, timeouts: list[float]) -> tuple[Entry, float] | None:
        """The entry for a packet's key (either direction), removed from the cache; None when there is none
        or it would have timed out by now. Returns (entry, the time of its last packet)."""
        found = self._entries.get((protocol, key))
        if found is None:
            return None
        entry, seen = found
        self._entries.pop((protocol, entry.key), None)
        self._entries.pop((protocol, entry.reply_key), None)
        if seen + timeouts[entry.state] <= now:
            return None
        return entry, seen
