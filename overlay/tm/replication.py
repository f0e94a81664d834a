"""Connection state replicated to a hot standby, so a TM's connections survive its crash (conntrackd's
model: the standby keeps an external cache and commits an entry when the connection's packets arrive).

Each TM batches what changed in its connection table — new connections and state changes — and sends
the batch to its distributor (GRE 0x88B9, sealed like every datagram). The distributor looks each entry's
original flow up in its table and forwards it to the row's *second choice*: the TM that takes the row if
this one fails. That TM keeps the entries in a bounded cache; when a packet arrives that it has no state
for, it looks in the cache first and, on a hit, commits the entry into its connection table with the
same translation, and the connection goes on. Sans-I/O.

Source-NATed connections also go to the TM's designated backup (`[[tm]] backup`), which takes its
xlate's replies while it is down. Connections whose entry had not reached the standby when the TM died —
younger than about one interval — are lost: the loss window. Strict mode closes it (pfsync's `defer`):
a new connection's packets are held at its TM until every standby has acknowledged its entry.

Acknowledgements: every batch carries a sequence number, and every standby acknowledges every batch it
took (GRE 0x88BA, standby → distributor → origin). The origin measures its replication lag from them —
from a change to the last standby's ack — and in strict mode releases the packets it held for the batch's
connections; after `defer_timeout` without all acks it releases them anyway (counted). The distributor,
which fans a batch out, writes into each copy how many standbys it went to, so the origin knows how many
acks to wait for; to none, the distributor acknowledges itself.

Batch header (big-endian, 8 bytes), then the entries:

    format(1) targets(1) peer(2) sequence(4)

`peer` is 0 from the origin; the origin's TM id in the copies to standbys (and in their acks); the
standby's TM id in the acks the distributor forwards to the origin. An ack is the header alone.

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
BATCH_HEADER = struct.Struct("!BBHI")
BATCH_FORMAT = 1
BATCH_BYTES = 1200   # one batch, header included, fits one datagram on any underlay


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


@dataclass(frozen=True, slots=True)
class BatchHeader:
    targets: int     # how many standbys the distributor sent this batch's entries to
    peer: int        # a TM id: see the module docstring
    sequence: int

    def pack(self) -> bytes:
        return BATCH_HEADER.pack(BATCH_FORMAT, self.targets, self.peer, self.sequence)


def split(batch: bytes) -> tuple[BatchHeader, bytes] | str:
    """A batch's (or an ack's) header and its packed entries, or a reason it is malformed."""
    if len(batch) < BATCH_HEADER.size:
        return "malformed:replication-header"
    form, targets, peer, sequence = BATCH_HEADER.unpack_from(batch)
    if form != BATCH_FORMAT:
        return "malformed:replication-format"
    return BatchHeader(targets, peer, sequence), batch[BATCH_HEADER.size:]


def pack(entries: list[Entry]) -> list[tuple[bytes, int]]:
    """Entries packed into chunks that fit one batch each (BATCH_BYTES with its header), in order:
    (chunk, how many entries it holds)."""
    chunks: list[tuple[bytes, int]] = []
    current = bytearray()
    count = 0
    room = BATCH_BYTES - BATCH_HEADER.size
    for entry in entries:
        packed = _HEADER.pack(entry.version, entry.protocol, entry.state, entry.kind,
                              min(int(entry.idle * 1000), 0xFFFFFFFF)) \
            + entry.key + entry.reply_key + entry.addresses + entry.ports
        if current and len(current) + len(packed) > room:
            chunks.append((bytes(current), count))
            current, count = bytearray(), 0
        current += packed
        count += 1
    if current:
        chunks.append((bytes(current), count))
    return chunks


def encode(entries: list[Entry], sequence: int = 0) -> list[bytes]:
    """Entries in whole batches, numbered from `sequence` (the origin's view: targets and peer 0)."""
    return [BatchHeader(0, 0, (sequence + index) & 0xFFFFFFFF).pack() + chunk
            for index, (chunk, _) in enumerate(pack(entries))]


def decode(batch: bytes) -> list[Entry] | str:
    """The entries of a batch (header and all), or a reason it is malformed (nothing of it is used)."""
    parts = split(batch)
    if isinstance(parts, str):
        return parts
    return decode_entries(parts[1])


def decode_entries(batch: bytes) -> list[Entry] | str:
    """Packed entries (a batch without its header), or a reason they are malformed."""
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


@dataclass(slots=True)
class _Sent:
    sent: float              # when the batch left
    oldest: float            # when the oldest change in it was made
    held: list[Conn]         # strict mode: connections whose packets wait for this batch's acks
    acks: int = 0


class Acknowledgements:
    """The origin's batches awaiting their standbys' acknowledgements: the measured replication lag, and in
    strict mode which held connections each ack completes. Bounded: a batch unacknowledged after HORIZON
    seconds (a lost datagram, a standby gone) is counted as `unacked` and forgotten."""

    HORIZON = 5.0
    MAX_BATCHES = 4096

    def __init__(self) -> None:
        self._batches: OrderedDict[int, _Sent] = OrderedDict()
        self.acked = 0            # batches every standby acknowledged
        self.unacked = 0          # batches given up on
        self.lag_last_ms = 0.0    # from the oldest change in a batch to its last ack
        self.lag_max_ms = 0.0
        self.rtt_last_ms = 0.0    # from a batch's sending to its last ack

    def __len__(self) -> int:
        return len(self._batches)

    def sent(self, sequence: int, now: float, oldest: float, held: list[Conn]) -> list[Conn]:
        """Record a batch; returns the held connections of batches pushed out to stay bounded."""
        self._batches[sequence] = _Sent(now, oldest, held)
        released: list[Conn] = []
        while len(self._batches) > self.MAX_BATCHES:
            _, dropped = self._batches.popitem(last=False)
            self.unacked += 1
            released += dropped.held
        return released

    def ack(self, header: BatchHeader, now: float) -> list[Conn] | None:
        """A standby's ack (through the distributor); the batch's held connections once every standby it
        went to has acknowledged it, else None."""
        batch = self._batches.get(header.sequence)
        if batch is None:
            return None      # a duplicate, or a batch given up on
        batch.acks += 1
        if batch.acks < header.targets:
            return None
        del self._batches[header.sequence]
        self.acked += 1
        self.rtt_last_ms = round((now - batch.sent) * 1000, 3)
        self.lag_last_ms = round((now - batch.oldest) * 1000, 3)
        self.lag_max_ms = max(self.lag_max_ms, self.lag_last_ms)
        return batch.held

    def overdue(self, now: float, timeout: float) -> list[Conn]:
        """Held connections of batches sent `timeout` or more ago and not yet fully acknowledged (their
        packets go on without the guarantee); batches past HORIZON are given up on."""
        released: list[Conn] = []
        for sequence, batch in list(self._batches.items()):
            if batch.sent + timeout > now:
                break
            if batch.held:
                released += batch.held
                batch.held = []
            if batch.sent + self.HORIZON <= now:
                del self._batches[sequence]
                self.unacked += 1
        return released

    def next_release(self, timeout: float) -> float | None:
        """When `overdue` next releases held connections (None: nothing is held)."""
        for batch in self._batches.values():
            if batch.held:
                return batch.sent + timeout
        return None

    def status(self) -> dict[str, float | int]:
        return {"awaiting_ack": len(self._batches), "acked_batches": self.acked, "unacked_batches": self.unacked,
                "lag_ms": self.lag_last_ms, "lag_max_ms": self.lag_max_ms, "ack_rtt_ms": self.rtt_last_ms}


class StandbyLag:
    """The distributor's view, per (origin, standby): when each batch was fanned out, and how long each
    standby took to acknowledge it (distributor → standby → distributor). Bounded per origin."""

    MAX_BATCHES = 1024

    def __init__(self) -> None:
        self._fanned: dict[str, OrderedDict[int, float]] = {}
        self.last_batch: dict[str, float] = {}                 # origin → when its last batch came
        self.peers: dict[tuple[str, str], list[float]] = {}    # (origin, standby) → [acks, last ms, max ms]

    def fanned(self, origin: str, sequence: int, now: float) -> None:
        self.last_batch[origin] = now
        batches = self._fanned.setdefault(origin, OrderedDict())
        batches[sequence] = now
        if len(batches) > self.MAX_BATCHES:
            batches.popitem(last=False)

    def acked(self, origin: str, standby: str, sequence: int, now: float) -> None:
        batches = self._fanned.get(origin)
        sent = batches.get(sequence) if batches is not None else None
        if sent is None:
            return
        lag = round((now - sent) * 1000, 3)
        record = self.peers.setdefault((origin, standby), [0, 0.0, 0.0])
        record[0] += 1
        record[1] = lag
        record[2] = max(record[2], lag)

    def status(self, now: float) -> dict[str, dict]:
        result: dict[str, dict] = {}
        for origin, seen in sorted(self.last_batch.items()):
            result[origin] = {"last_batch_age_s": round(now - seen, 3), "standbys": {}}
        for (origin, standby), (acks, last, most) in sorted(self.peers.items()):
            result.setdefault(origin, {"standbys": {}})["standbys"][standby] = {
                "acks": int(acks), "lag_ms": last, "lag_max_ms": most}
        return result
