"""The connection table: both directions of every connection, their rewrites, states and expiry.

Each connection is indexed twice, by the flow key of each direction as packets *arrive* at the TM
(original: as the opener sent it; reply: as the peer answers the translated packet). A lookup returns a
`Half`: the direction and everything needed to rewrite a packet of that direction, precomputed once per
connection (new addresses and ports and the RFC 1624 checksum deltas), so the per-packet work is a dict
lookup, two slice assignments and two checksum additions.

Expiry: a connection's deadline is `last_seen + timeout(state)`. One OrderedDict per state keeps its
connections ordered by `last_seen` (a packet moves its connection to the end, O(1)); since all members
of a state share one timeout, the front is always the next to expire. `expire(now)` pops fronts that are
due; a lookup also treats a due connection as gone, so results never depend on when `expire` ran.
Changing a timeout (reconfigure) keeps every per-state order valid.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from overlay.tm.packet import ICMP, ICMPV6, TCP, UDP
from overlay.tm.states import EVICTABLE, STATE_NAMES

if TYPE_CHECKING:
    from overlay.tm.balancer import Server
    from overlay.tm.ports import PortAllocator


class Half:
    """One direction of a connection: its lookup key and how to rewrite its packets.

    `addresses` is the new source+destination (None: pass unmodified, as in firewall mode); `ports` the
    new source+destination ports (TCP/UDP) or the new echo identifier (ICMP). `ip_delta` fixes the IPv4
    header checksum, `l4_delta` the transport checksum (pseudo-header included where it has one).
    """

    __slots__ = ("conn", "direction", "key", "reason", "addresses", "ports", "ip_delta", "l4_delta")

    def __init__(self, conn: Conn, direction: int, key: bytes, reason: str, addresses: bytes | None,
                 ports: bytes | None, ip_delta: int, l4_delta: int) -> None:
        self.conn = conn
        self.direction = direction
        self.key = key
        self.reason = reason
        self.addresses = addresses
        self.ports = ports
        self.ip_delta = ip_delta
        self.l4_delta = l4_delta


class Conn:
    __slots__ = ("protocol", "version", "original", "reply", "state", "closer", "last_seen", "server", "snat")

    def __init__(self, protocol: int, version: int, state: int, now: float) -> None:
        self.protocol = protocol
        self.version = version
        self.original: Half
        self.reply: Half
        self.state = state
        self.closer = -1                 # direction of the first FIN (TCP)
        self.last_seen = now
        self.server: Server | None = None                        # DNAT target, for least-connections
        self.snat: tuple[PortAllocator, int] | None = None        # allocated source port, released at the end


class ConnTable:
    def __init__(self, max_entries: int, timeouts: list[float]) -> None:
        self.tables: dict[int, dict[bytes, Half]] = {TCP: {}, UDP: {}, ICMP: {}, ICMPV6: {}}
        self.by_state: list[OrderedDict[Conn, None]] = [OrderedDict() for _ in STATE_NAMES]
        self.timeouts = timeouts
        self.max_entries = max_entries
        self.size = 0
        self.expired = 0
        self.evicted = 0

    def lookup(self, protocol: int, key: bytes, now: float) -> Half | None:
        half = self.tables[protocol].get(key)
        if half is not None:
            conn = half.conn
            if conn.last_seen + self.timeouts[conn.state] <= now:
                self.remove(conn)
                self.expired += 1
                return None
        return half

    def clashes(self, protocol: int, key: bytes) -> bool:
        return key in self.tables[protocol]

    def add(self, conn: Conn) -> None:
        table = self.tables[conn.protocol]
        table[conn.original.key] = conn.original
        table[conn.reply.key] = conn.reply
        self.by_state[conn.state][conn] = None
        self.size += 1
        if conn.server is not None:
            conn.server.connections += 1

    def touch(self, conn: Conn, state: int, now: float) -> None:
        """A packet of `conn` was seen at `now` and left it in `state`."""
        conn.last_seen = now
        if state == conn.state:
            self.by_state[state].move_to_end(conn)
        else:
            del self.by_state[conn.state][conn]
            self.by_state[state][conn] = None
            conn.state = state

    def remove(self, conn: Conn) -> None:
        table = self.tables[conn.protocol]
        table.pop(conn.original.key, None)
        table.pop(conn.reply.key, None)
        del self.by_state[conn.state][conn]
        self.size -= 1
        if conn.server is not None:
            conn.server.connections -= 1
        if conn.snat is not None:
            allocator, port = conn.snat
            allocator.release(port)

    def expire(self, now: float) -> int:
        removed = 0
        for state, members in enumerate(self.by_state):
            timeout = self.timeouts[state]
            while members:
                conn = next(iter(members))
                if conn.last_seen + timeout > now:
                    break
                self.remove(conn)
                removed += 1
        self.expired += removed
        return removed

    def next_deadline(self) -> float | None:
        deadline: float | None = None
        for state, members in enumerate(self.by_state):
            if members:
                due = next(iter(members)).last_seen + self.timeouts[state]
                if deadline is None or due < deadline:
                    deadline = due
        return deadline

    def make_room(self, now: float) -> bool:
        """True when one more connection fits: after expiring due entries and, if still full, evicting
        the oldest entry of the first non-empty evictable state (see `states.EVICTABLE`)."""
        if self.size < self.max_entries:
            return True
        self.expire(now)
        while self.size >= self.max_entries:
            for state in EVICTABLE:
                members = self.by_state[state]
                if members:
                    self.remove(next(iter(members)))
                    self.evicted += 1
                    break
            else:
                return False
        return True

    def connections(self) -> list[Conn]:
        return [conn for members in self.by_state for conn in members]

    def count_by_state(self) -> dict[str, int]:
        return {name: len(members) for name, members in zip(STATE_NAMES, self.by_state)}
