"""The traffic manager's sans-I/O core: packets and the time in, verdicts and rewritten packets out.

The runtime feeds `receive` with inner packets the distributor sent, `from_local` with packets the TM
host's own stack sent, and calls `expire` at `next_deadline()`; it sends results with action "overlay"
back to the distributor and delivers "local" ones to the host. Nothing here reads a clock or a socket.

Where is the decision made? `receive`: management address → local; a tracked flow → its rewrite
(`conntrack.Half`); an ICMP error → the flow it quotes; otherwise `_open` decides whether the packet
opens a connection (`_open_nat` / `_open_firewall`) or is dropped as invalid — the signal that a
distributor sent a flow to the wrong TM.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from overlay import compiled
from overlay.checksum import add_deltas, checksum_delta
from overlay.tm import reasons as R
from overlay.tm.balancer import Server, Service
from overlay.tm.config import DEFAULT_TIMEOUTS, TMConfig
from overlay.tm.conntrack import Conn, ConnTable, Half
from overlay.tm.firewall import RuleList, compile_prefixes, in_prefixes
from overlay.tm.fragments import FragmentTracker
from overlay.tm.replication import (
    KIND_DNAT, KIND_FIREWALL, KIND_HAIRPIN, KIND_SNAT, Acknowledgements, BatchHeader, StandbyCache, decode_entries, entry_of,
    pack, split,
)
from overlay.tm.packet import (
    ADDRESS_LENGTH, ECHO_REPLY_MARK, ICMP, ICMPV6, TCP, UDP, IcmpError, parse_first_fragment, parse_fragment, parse_ip,
    parse_transport,
)
from overlay.tm.ports import PortAllocator
from overlay.tm.rewrite import rewrite, rewrite_addresses, translate_icmp_error
from overlay.tm.states import (
    FIN, ICMP_ECHO, RST, STATE_NAMES, SYN, TCP_ESTABLISHED, TCP_SYN_SENT, UDP_REPLIED, UDP_UNREPLIED, tcp_next,
    tcp_opens,
)

OVERLAY = "overlay"
LOCAL = "local"
DROP = "drop"
BOUNCE = "bounce"    # no state here, but the distributor named a second-chance TM: hand the packet back
DECLINE = "decline"  # a last-chance packet we have no state for would open a flow: it is new, not ours
HOLD = "hold"        # a fragment that came before its first fragment: nothing to send yet
DEFER = "defer"      # strict replication: held until the standbys have the connection (flush replication now)

# How the distributor marked a packet (the GRE key's low half, decoded by the node core):
UNMARKED = 0
SECOND_CHANCE = 1  # we are a drained row's new TM: bounce what we have no state for, open only TCP SYNs
LAST_CHANCE = 2    # we are the draining TM, handed a bounce: use our state, never open any

_PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}


@dataclass(slots=True)   # built per packet: not frozen (350 ns cheaper, tests/tm/bench_tm.py); treat as read-only
class TMResult:
    action: str           # "overlay" | "local" | "drop" | "bounce" | "decline" | "hold" | "defer"
    packet: bytes | None
    reason: str
    # "overlay" only: fragments held for this first fragment, translated, to send after `packet`.
    released: tuple[bytes, ...] = ()


_BOUNCED = TMResult(BOUNCE, None, R.SECOND_CHANCE)
_KIND_OF_REASON = {R.DNAT: KIND_DNAT, R.SNAT: KIND_SNAT, R.HAIRPIN: KIND_HAIRPIN, R.FIREWALL_ALLOW: KIND_FIREWALL}
_REASONS_OF_KIND = {KIND_DNAT: (R.DNAT, R.REVERSE_DNAT), KIND_SNAT: (R.SNAT, R.REVERSE_SNAT),
                    KIND_HAIRPIN: (R.HAIRPIN, R.REVERSE_HAIRPIN)}
_DECLINED = TMResult(DECLINE, None, R.DECLINED)
_HELD = TMResult(HOLD, None, R.FRAGMENT_HELD)
HELD_PER_CONNECTION = 32   # strict mode: packets of one connection held at most; later ones go on unheld

# The fast path's fields (`TrafficManager.forward_established`). Unpacked: IPv4 version/IHL, total length,
# flags/fragment offset, protocol, header checksum; IPv6 payload length, next header (from offset 4); TCP
# data offset, flags, checksum; UDP length, checksum. Packed: the rewritten packet from its IP header to the
# end of the transport checksum, the unchanged parts as slices ("s" fields: exact lengths, by the slices).
_IPV4_FIELDS = struct.Struct("!BxHxxHxBH").unpack_from
_IPV6_FIELDS = struct.Struct("!HB").unpack_from
_TCP_FIELDS = struct.Struct("!12xBBxxH").unpack_from
_UDP_FIELDS = struct.Struct("!4xHH").unpack_from
_IPV4_TCP_REWRITE = struct.Struct("!10sH8s4s12sH").pack
_IPV4_UDP_REWRITE = struct.Struct("!10sH8s4s2sH").pack
_IPV6_TCP_REWRITE = struct.Struct("!8s32s4s12sH").pack
_IPV6_UDP_REWRITE = struct.Struct("!8s32s4s2sH").pack


class TrafficManager:
    def __init__(self, config: TMConfig) -> None:
        self._mark = UNMARKED
        self._table = ConnTable(config.conntrack.max_entries, [])
        self._fragments = FragmentTracker()
        self._dirty: dict[Conn, float] = {}    # changed since the last replication export → when it first did
        self._standby = StandbyCache(config.replication.max_standby)
        self._replication = {"sent": 0, "received": 0, "committed": 0, "batches_sent": 0, "acks_sent": 0,
                             "held": 0, "released_acked": 0, "released_timeout": 0}
        self._acks = Acknowledgements()
        self._sequence = 0
        # Strict mode: a new connection's packets, held until its standbys acknowledged its entry.
        self._held: dict[Conn, list[bytes]] = {}
        self._awaiting: set[Conn] = set()      # held connections already in a batch sent
        self._in_fragment = False
        self._allocators: dict[tuple[bytes, int], PortAllocator] = {}
        self._counts = dict.fromkeys(R.ALL_REASONS, 0)
        self._local_counts = dict.fromkeys(R.ALL_REASONS, 0)
        self._received = 0
        self._from_local = 0
        self._created = 0
        self._drops = {reason: TMResult(DROP, None, reason) for reason in R.ALL_REASONS}
        self._apply(config)

    # -- configuration ------------------------------------------------------------------------------
    def _apply(self, config: TMConfig) -> None:
        self.config = config
        self._replicate = config.replication.enabled
        self._strict = config.replication.enabled and config.replication.strict
        self._defer_timeout = config.replication.defer_timeout
        self._nat = config.mode == "nat"
        self._management = frozenset(address.packed for address in config.management)
        self._xlate: dict[int, bytes] = {address.version: address.packed for address in config.xlate}
        self._xlate_set = frozenset(self._xlate.values())
        self._natable = compile_prefixes(config.natable)
        self._fleet_xlate = compile_prefixes(config.fleet_xlate)
        self._services: dict[tuple[int, bytes, bytes], Service] = {}
        for service_config in config.services:
            protocol = TCP if service_config.protocol == "tcp" else UDP
            key = (protocol, service_config.virtual.packed, service_config.port.to_bytes(2, "big"))
            self._services[key] = Service(service_config)
        self._virtual = frozenset(vip for _, vip, _ in self._services)
        self._rules = RuleList(config.firewall_rules)
        self._table.max_entries = config.conntrack.max_entries
        timeouts = config.conntrack.timeouts
        self._table.timeouts = [float(timeouts.get(name, DEFAULT_TIMEOUTS[name])) for name in STATE_NAMES]
        # The fast path's shortcuts to the table's parts (the same objects: the table never replaces them).
        self._tcp, self._udp = self._table.tables[TCP], self._table.tables[UDP]
        self._by_state, self._timeouts = self._table.by_state, self._table.timeouts

    def reconfigure(self, config: TMConfig) -> None:
        """Swap the config; live connections keep their translations, server and port.

        Servers that left a pool keep serving their existing connections; ports of live connections stay
        reserved in the new allocators even when the port block moved.
        """
        self._apply(config)
        self._allocators = {}
        for conn in self._table.connections():
            if conn.server is not None:
                # Re-point least-connections counts at the new pool's Server objects.
                conn.server = self._find_server(conn)
                if conn.server is not None:
                    conn.server.connections += 1
            if conn.snat is not None:
                port = conn.snat[1]
                address = conn.original.addresses[:ADDRESS_LENGTH[conn.version]]  # type: ignore[index]
                allocator = self._allocator(address, conn.protocol)
                allocator.reserve(port)
                conn.snat = (allocator, port)

    def _find_server(self, conn: Conn) -> Server | None:
        """The new config's pool member this connection was DNATed to, if it is still configured."""
        half = conn.original
        assert half.addresses is not None and half.ports is not None   # only NAT connections have a server
        length = ADDRESS_LENGTH[conn.version]
        virtual = half.key[length:2 * length]
        service = self._services.get((conn.protocol, virtual, half.key[2 * length + 2:2 * length + 4]))
        if service is None:
            return None
        return service.find(half.addresses[length:], int.from_bytes(half.ports[2:4], "big"))

    def _allocator(self, address: bytes, protocol: int) -> PortAllocator:
        allocator = self._allocators.get((address, protocol))
        if allocator is None:
            allocator = self._allocators[(address, protocol)] = PortAllocator(*self.config.port_range)
        return allocator

    # -- packets --------------------------------------------------------------------------------------
    def receive(self, packet: bytes, now: float, mark: int = UNMARKED) -> TMResult:
        """An inner packet the distributor sent to this TM, with the distributor's mark:
        - SECOND_CHANCE (a draining TM may hold its connection): a packet we have no state for is bounced
          back (action "bounce", packet None: the caller returns the packet it gave us) — also a UDP or
          ICMP echo packet that would open state, *before* opening it; only a TCP SYN opens here;
        - LAST_CHANCE (we are that draining TM): state is used as always, but nothing opens: a packet
          that would open a flow is declined (action "decline": the distributor opens it elsewhere)."""
        self._received += 1
        self._mark = mark
        parsed = parse_ip(packet)
        if isinstance(parsed, str):
            if parsed == R.FRAGMENT:
                return self._fragment(packet, now)
            return self._drop(parsed)
        version, protocol, l4, end = parsed
        if (packet[16:20] if version == 4 else packet[24:40]) in self._management:
            self._counts[R.MANAGEMENT] += 1
            return TMResult(LOCAL, packet if end == len(packet) else packet[:end], R.MANAGEMENT)
        flow = parse_transport(packet, version, protocol, l4, end)
        if isinstance(flow, tuple):
            return self._flow(packet, version, protocol, l4, end, flow[0], flow[1], now)
        if isinstance(flow, str):
            return self._drop(flow)
        return self._icmp_error(packet, version, l4, end, flow, now)

    def forward_established(self, data: bytes, at: int, prefixes: tuple[bytes, bytes], now: float) -> bytes | None:
        """The fast path for the common packet, or None: nothing was changed, use `receive`.

        The inner packet is `data[at:]` (the GRE payload as it came, so the node need not copy it out);
        the result is `prefixes[0]` (IPv4) or `prefixes[1]` (IPv6) + the packet as `receive` would pass
        it, built in one go. Taken only when `receive` would return "overlay" with that very packet, and
        change nothing but what this does too — `packets.received`, the reason's counter, the connection's
        `last_seen` and its place in its state's expiry order:

        - IPv4 without options, or IPv6 whose next header is TCP or UDP itself; no fragment; the IP length
          is the packet's (no trailing bytes); the transport header as `parse_transport` checks it;
        - not to a management address;
        - its connection is in the table and not past its timeout (no standby commit, no reopen);
        - the packet leaves the state as it is: TCP established and none of SYN, RST, FIN; UDP in the
          original direction, or already replied (so no replication mark either);
        - no packet is held for strict replication (a held connection's packets queue behind them).

        The distributor's mark (second chance, last chance) only matters to a packet without state, which
        never gets here. Every test fails over to None before anything is written; what follows the last
        one is `_flow` and `rewrite` for this case (tests/tm/test_fast_path.py compares them packet by
        packet, and checks that it would notice a missed counter or refresh). One `struct` unpack per
        header and one pack for the rewritten fields instead of indexing and joining byte by byte, and
        the checksum update as a subtraction: ~2.3 → ~1.8 µs for this function on an established DNAT
        packet (the machine of tests/tm/bench_tm.py's node rows, 6.0 → 2.5 µs for the whole datagram).
        """
        size = len(data) - at
        if size < 20:
            return None
        first = data[at]
        if first == 0x45:
            _, total, fragment, protocol, ip_checksum = _IPV4_FIELDS(data, at)
            if total != size or fragment & 0x3FFF or data[at + 16:at + 20] in self._management:
                return None
            l4 = at + 20
            key = data[at + 12:at + 24]    # addresses and ports are adjacent: the flow key in one slice
        elif first >> 4 == 6:
            if size < 40:
                return None
            payload_length, protocol = _IPV6_FIELDS(data, at + 4)
            if 40 + payload_length != size or data[at + 24:at + 40] in self._management:
                return None
            l4 = at + 40
            key = data[at + 8:at + 44]
        else:
            return None
        room = size - l4 + at     # the transport header and its payload
        if protocol == TCP:
            if room < 20:
                return None
            offset, flags, l4_checksum = _TCP_FIELDS(data, l4)
            if not 20 <= (offset >> 4) << 2 <= room or flags & (SYN | RST | FIN):
                return None
            half = self._tcp.get(key)
            if half is None:
                return None
            conn = half.conn
            state = conn.state
            if state != TCP_ESTABLISHED:
                return None
        elif protocol == UDP:
            if room < 8:
                return None
            length, l4_checksum = _UDP_FIELDS(data, l4)
            if not 8 <= length <= room:
                return None
            half = self._udp.get(key)
            if half is None:
                return None
            conn = half.conn
            state = conn.state
            if half.direction and state != UDP_REPLIED:
                return None
        else:
            return None
        if conn.last_seen + self._timeouts[state] <= now or (self._held and conn in self._held):
            return None

        # Committed: `receive` → `_flow` for an unchanged state, then `rewrite`.
        self._received += 1
        conn.last_seen = now
        self._by_state[state].move_to_end(conn)
        self._counts[half.reason] += 1
        addresses = half.addresses
        if addresses is None:
            return (prefixes[0] if first == 0x45 else prefixes[1]) + data[at:]    # firewall mode: unmodified
        # RFC 1624's ~(~HC + delta), folded, as `rewrite` computes it, is HC - delta with an end-around
        # borrow for every HC and delta in 0..0xFFFF: half the arithmetic.
        if protocol == UDP and not l4_checksum:
            checksum = 0     # UDP without checksum: it stays without
        else:
            checksum = l4_checksum - half.l4_delta
            if checksum < 0:
                checksum += 0xFFFF
            if not checksum and protocol == UDP:
                checksum = 0xFFFF       # a computed 0 is sent as all ones: 0 means "no checksum" in UDP
        if first == 0x45:
            ip_checksum -= half.ip_delta
            if ip_checksum < 0:
                ip_checksum += 0xFFFF
            if protocol == TCP:   # IP header to the checksum, checksum, addresses, ports, TCP to the checksum
                return prefixes[0] + _IPV4_TCP_REWRITE(data[at:at + 10], ip_checksum, addresses, half.ports,
                                                       data[l4 + 4:l4 + 16], checksum) + data[l4 + 18:]
            return prefixes[0] + _IPV4_UDP_REWRITE(data[at:at + 10], ip_checksum, addresses, half.ports,
                                                   data[l4 + 4:l4 + 6], checksum) + data[l4 + 8:]
        if protocol == TCP:
            return prefixes[1] + _IPV6_TCP_REWRITE(data[at:at + 8], addresses, half.ports, data[l4 + 4:l4 + 16],
                                                   checksum) + data[l4 + 18:]
        return prefixes[1] + _IPV6_UDP_REWRITE(data[at:at + 8], addresses, half.ports, data[l4 + 4:l4 + 6],
                                               checksum) + data[l4 + 8:]

    def compiled_parts(self) -> tuple[Any, ...]:
        """The objects `forward_established` reads and changes, for its C twin (`_fastio.translate`, through
        `TMNode.compiled_state`): the TCP and UDP tables, management addresses, timeouts, the expiry lists,
        the held packets, the reasons' counts, and the two states it serves."""
        return (self._tcp, self._udp, self._management, self._timeouts, self._by_state, self._held, self._counts,
                TCP_ESTABLISHED, UDP_REPLIED)

    def count_received(self, count: int) -> None:
        """`packets.received` for what `_fastio.translate` passed."""
        self._received += count

    def forward_run(self, payloads: list[bytes], start: int, count: int, at: int, prefixes: tuple[bytes, bytes],
                    now: float) -> list[bytes]:
        """`forward_established` for `payloads[start:start + count]`, TCP packets of the connection whose
        packet `forward_established` has just passed (`flow_run` found them behind the same `at` bytes,
        differing only as one stream's segments do): each would take the fast path too, to the same
        translation. Counted and refreshed as that many calls would; the rewriting in C where `_fastio`
        is built (`nat_run`, the same arithmetic), else by `forward_established` itself, packet by packet."""
        if count <= 0:
            return []
        first = payloads[start]
        version = first[at] >> 4
        half = self._tcp[first[at + 12:at + 24] if version == 4 else first[at + 8:at + 44]]
        nat_run = compiled.nat_run
        if nat_run is None:
            return [self.forward_established(payload, at, prefixes, now)  # type: ignore[misc]
                    for payload in payloads[start:start + count]]
        conn = half.conn
        self._received += count
        conn.last_seen = now
        self._by_state[conn.state].move_to_end(conn)
        self._counts[half.reason] += count
        return nat_run(payloads, start, count, at, prefixes[version == 6], half.addresses, half.ports or b"\0" * 4,
                       half.ip_delta, half.l4_delta)

    def _flow(self, packet: bytes, version: int, protocol: int, l4: int, end: int, key: bytes, info: int,
              now: float) -> TMResult:
        """A TCP, UDP or echo packet: its connection's rewrite, or open one."""
        # The established path, with the table's lookup and touch inlined: each call costs ~100 ns
        # here, a third of the work (tests/tm/bench_tm.py).
        table = self._table
        half = table.tables[protocol].get(key)
        if half is None:
            if self._standby:
                half = self._commit(protocol, key, now)   # another TM's connection, replicated to us
            if half is None:
                return self._open(packet, version, protocol, l4, end, key, info, now)
        conn = half.conn
        state = conn.state
        if conn.last_seen + table.timeouts[state] <= now:
            table.remove(conn)
            table.expired += 1
            return self._open(packet, version, protocol, l4, end, key, info, now)
        if protocol == TCP:
            if state != TCP_ESTABLISHED or info & (SYN | RST | FIN):
                state, conn.closer = tcp_next(state, half.direction, info, conn.closer)
        elif protocol == UDP:
            if half.direction:
                state = UDP_REPLIED
        if state == conn.state:
            conn.last_seen = now
            table.by_state[state].move_to_end(conn)
        else:
            table.touch(conn, state, now)
            if self._replicate:
                self._dirty.setdefault(conn, now)
        reason = half.reason
        self._counts[reason] += 1
        if self._held and conn in self._held:
            return self._hold(conn, packet[:end] if half.addresses is None
                              else rewrite(packet, version, protocol, l4, end, half), reason)
        if half.addresses is None:
            return TMResult(OVERLAY, packet if end == len(packet) else packet[:end], reason)
        return TMResult(OVERLAY, rewrite(packet, version, protocol, l4, end, half), reason)

    # -- fragments ------------------------------------------------------------------------------------
    def _fragment(self, packet: bytes, now: float) -> TMResult:
        """A fragment: the first one finds or opens its connection like any packet, and the translation it
        got is remembered for the rest of the datagram (overlay/tm/fragments.py)."""
        parsed = parse_fragment(packet)
        if isinstance(parsed, str):
            return self._drop(parsed)
        version, protocol, l4, end, datagram, first = parsed
        if (packet[16:20] if version == 4 else packet[24:40]) in self._management:
            self._counts[R.MANAGEMENT] += 1
            return TMResult(LOCAL, packet[:end], R.MANAGEMENT)   # the host's own stack reassembles
        if first:
            flow = parse_first_fragment(packet, version, protocol, l4, end)
            if isinstance(flow, str):
                self._fragments.release(datagram)
                return self._drop(flow)
            # Fragments are not held for strict replication: their translation must be known now.
            self._in_fragment = True
            try:
                result = self._flow(packet, version, protocol, l4, end, flow[0], flow[1], now)
            finally:
                self._in_fragment = False
            if not datagram:
                return result    # an IPv6 atomic fragment: a whole packet
            half = self._table.tables[protocol].get(flow[0]) if result.action == OVERLAY else None
            if half is None:
                orphans = self._fragments.release(datagram)
                self._counts[R.FRAGMENT_ORPHAN] += len(orphans)
                return result
            held = self._fragments.remember(datagram, half, now)
            if not held:
                return result
            reason = R.FRAGMENT_TRANSLATED if half.addresses is not None else R.FRAGMENT_FORWARDED
            self._counts[reason] += len(held)
            if half.addresses is not None:
                held = [rewrite_addresses(fragment, version, half) for fragment in held]
            return TMResult(OVERLAY, result.packet, result.reason, tuple(held))
        half = self._fragments.lookup(datagram, now)
        if half is not None and self._table.tables[half.conn.protocol].get(half.key) is half:
            if half.addresses is None:
                self._counts[R.FRAGMENT_FORWARDED] += 1
                return TMResult(OVERLAY, packet[:end], R.FRAGMENT_FORWARDED)
            self._counts[R.FRAGMENT_TRANSLATED] += 1
            return TMResult(OVERLAY, rewrite_addresses(packet[:end], version, half), R.FRAGMENT_TRANSLATED)
        if self._mark == SECOND_CHANCE:
            return self._bounce()        # its first fragment may have reached the draining TM
        source = packet[12:16] if version == 4 else packet[8:24]
        if self._fragments.hold(datagram, source, packet[:end], now):
            self._counts[R.FRAGMENT_HELD] += 1
            return _HELD
        return self._drop(R.FRAGMENT_LIMIT)

    def from_local(self, packet: bytes, now: float) -> TMResult:
        """A packet the TM host's own stack sent: only from a management address, unmodified."""
        self._from_local += 1
        parsed: tuple[int, int, int, int] | tuple[int, int, int, int, bytes, bool] | str = parse_ip(packet)
        if parsed == R.FRAGMENT:
            parsed = parse_fragment(packet)   # the host's own fragments pass unmodified, like its packets
        if isinstance(parsed, str):
            self._local_counts[parsed] += 1
            return self._drops[parsed]
        version, end = parsed[0], parsed[3]
        if (packet[12:16] if version == 4 else packet[8:24]) not in self._management:
            self._local_counts[R.NOT_MANAGEMENT_SOURCE] += 1
            return self._drops[R.NOT_MANAGEMENT_SOURCE]
        self._local_counts[R.MANAGEMENT] += 1
        return TMResult(OVERLAY, packet if end == len(packet) else packet[:end], R.MANAGEMENT)

    def _drop(self, reason: str) -> TMResult:
        self._counts[reason] += 1
        return self._drops[reason]

    def _bounce(self) -> TMResult:
        self._counts[R.SECOND_CHANCE] += 1
        return _BOUNCED

    def _icmp_error(self, packet: bytes, version: int, l4: int, end: int, error: IcmpError, now: float) -> TMResult:
        half = self._table.lookup(error.inner_protocol, error.key, now)
        if half is None:
            if self._mark == SECOND_CHANCE:
                return self._bounce()
            return self._drop(R.INVALID_ICMP_NO_STATE)
        if half.addresses is None:
            self._counts[R.FIREWALL_RELATED] += 1
            return TMResult(OVERLAY, packet[:end], R.FIREWALL_RELATED)
        translated = translate_icmp_error(packet, version, l4, end, error, half)
        if isinstance(translated, str):
            return self._drop(translated)
        self._counts[R.ICMP_RELATED] += 1
        return TMResult(OVERLAY, translated, R.ICMP_RELATED)

    # -- new connections ------------------------------------------------------------------------------
    def _open(self, packet: bytes, version: int, protocol: int, l4: int, end: int, key: bytes, info: int,
              now: float) -> TMResult:
        """A packet without state: open a connection if it may, else drop it with the reason."""
        if protocol == TCP:
            if not tcp_opens(info):
                if info & SYN and info & (RST | FIN):
                    return self._drop(R.MALFORMED_TCP_FLAGS)
                return self._invalid(version, protocol, key)
            state = TCP_SYN_SENT
        else:
            if protocol != UDP and info:     # an echo reply never opens
                return self._invalid(version, protocol, key)
            if self._mark == SECOND_CHANCE:
                # UDP and echo requests carry no "new flow" flag: only the draining TM's state can tell an
                # old flow from a new one, so ask it before opening anything here.
                return self._bounce()
            state = UDP_UNREPLIED if protocol == UDP else ICMP_ECHO
        if self._mark == LAST_CHANCE:
            self._counts[R.DECLINED] += 1
            return _DECLINED
        if self._nat:
            return self._open_nat(packet, version, protocol, l4, end, key, state, now)
        return self._open_firewall(packet, version, protocol, end, key, state, now)

    def _invalid(self, version: int, protocol: int, key: bytes) -> TMResult:
        """No state and not an opener. To our xlate address but outside our port block, or to another
        TM's xlate address: the distributor sent another TM's traffic here (reported separately: it
        points at the distributor's owner map rather than at hashing)."""
        if self._mark == SECOND_CHANCE:
            return self._bounce()
        length = ADDRESS_LENGTH[version]
        destination = key[length:2 * length]
        if destination in self._xlate_set:
            port = int.from_bytes(key[-2:], "big")
            low, high = self.config.port_range
            if not low <= port <= high:
                return self._drop(R.INVALID_FOREIGN_PORT)
        elif in_prefixes(self._fleet_xlate, version, destination):
            return self._drop(R.INVALID_FOREIGN_XLATE)
        return self._drop(R.INVALID_NO_STATE)

    def _open_nat(self, packet: bytes, version: int, protocol: int, l4: int, end: int, key: bytes, state: int,
                  now: float) -> TMResult:
        length = ADDRESS_LENGTH[version]
        src, dst, tail = key[:length], key[length:2 * length], key[2 * length:]
        if dst in self._xlate_set or in_prefixes(self._fleet_xlate, version, dst):
            # Nothing opens toward a translation address (ours or another TM's). A UDP datagram there
            # may be a reply whose state is on another TM: invalid. A bare SYN or an echo request is
            # never a reply (a scan, a ping): no rule, so the invalid counters keep meaning "symmetry".
            if protocol == UDP:
                return self._invalid(version, protocol, key)
            return self._drop(R.NO_RULE)
        natable = in_prefixes(self._natable, version, src)
        service = None
        if dst in self._virtual:
            service = self._services.get((protocol, dst, tail[2:4])) if protocol in (TCP, UDP) else None
            if service is None:
                return self._drop(R.NO_SERVICE)
        elif not natable:
            return self._drop(R.NO_RULE)
        xlate = self._xlate.get(version) if natable else None
        if natable and xlate is None:
            return self._drop(R.NO_XLATE_ADDRESS)
        if not self._table.make_room(now):
            return self._drop(R.CONNTRACK_FULL)

        server = None
        new_dst, new_dport = dst, tail[2:4]
        if service is not None:
            server = service.choose(src)
            if server is None:
                return self._drop(R.NO_SERVER)
            new_dst, new_dport = server.packed, server.port_bytes
        snat = None
        if xlate is not None:
            allocator = self._allocator(xlate, protocol)
            port = allocator.allocate()
            if port is None and self._table.expire(now):
                port = allocator.allocate()     # connections past their timeout still held ports
            if port is None:
                return self._drop(R.PORTS_EXHAUSTED)
            snat = (allocator, port)
            new_src, new_sport = xlate, port.to_bytes(2, "big")
        else:
            new_src, new_sport = src, (tail[0:2] if protocol != ICMP and protocol != ICMPV6 else tail[1:3])

        if service is not None:
            reasons = (R.HAIRPIN, R.REVERSE_HAIRPIN) if snat else (R.DNAT, R.REVERSE_DNAT)
        else:
            reasons = (R.SNAT, R.REVERSE_SNAT)
        conn = Conn(protocol, version, state, now)
        conn.server, conn.snat = server, snat
        if protocol == TCP or protocol == UDP:
            old_ports, new_ports = tail, new_sport + new_dport
            reply_key = new_dst + new_src + new_dport + new_sport
        else:
            old_ports, new_ports = tail[1:3], new_sport      # the echo identifier
            reply_key = new_dst + new_src + ECHO_REPLY_MARK + new_sport
        _link(conn, key, reply_key, reasons, src, dst, new_src, new_dst, old_ports, new_ports)
        if self._table.clashes(protocol, reply_key):
            if snat is not None:
                snat[0].release(snat[1])
            return self._drop(R.CONNTRACK_CLASH)
        self._table.add(conn)
        self._created += 1
        if self._replicate:
            self._dirty[conn] = now
        self._counts[reasons[0]] += 1
        if self._strict and not self._in_fragment:
            return self._hold(conn, rewrite(packet, version, protocol, l4, end, conn.original), reasons[0])
        return TMResult(OVERLAY, rewrite(packet, version, protocol, l4, end, conn.original), reasons[0])

    def _open_firewall(self, packet: bytes, version: int, protocol: int, end: int, key: bytes, state: int,
                       now: float) -> TMResult:
        length = ADDRESS_LENGTH[version]
        src, dst, tail = key[:length], key[length:2 * length], key[2 * length:]
        port = int.from_bytes(tail[2:4], "big") if protocol == TCP or protocol == UDP else None
        if not self._rules.allows(version, protocol, src, dst, port):
            return self._drop(R.FIREWALL_DENY)
        if not self._table.make_room(now):
            return self._drop(R.CONNTRACK_FULL)
        if protocol == TCP or protocol == UDP:
            reply_key = dst + src + tail[2:4] + tail[0:2]
        else:
            reply_key = dst + src + ECHO_REPLY_MARK + tail[1:3]
        if self._table.clashes(protocol, reply_key):
            return self._drop(R.CONNTRACK_CLASH)
        conn = Conn(protocol, version, state, now)
        conn.original = Half(conn, 0, key, R.FIREWALL_ALLOW, None, None, 0, 0)
        conn.reply = Half(conn, 1, reply_key, R.FIREWALL_REPLY, None, None, 0, 0)
        self._table.add(conn)
        self._created += 1
        if self._replicate:
            self._dirty[conn] = now
        self._counts[R.FIREWALL_ALLOW] += 1
        if self._strict and not self._in_fragment:
            return self._hold(conn, packet[:end], R.FIREWALL_ALLOW)
        return TMResult(OVERLAY, packet if end == len(packet) else packet[:end], R.FIREWALL_ALLOW)

    # -- replication (overlay/tm/replication.py) ----------------------------------------------------------
    def export_replication(self, now: float) -> list[bytes]:
        """Batches of what changed since the last call (new connections, state changes): for the
        distributor, which hands each entry to its row's second choice. Each is numbered; the connections
        held for strict mode wait for its acknowledgements (`replication_acked`)."""
        if not self._dirty:
            return []
        tables = self._table.tables
        live = [(conn, since) for conn, since in self._dirty.items()
                if tables[conn.protocol].get(conn.original.key) is conn.original]
        self._dirty = {}
        released = [conn for conn in self._held if conn not in self._awaiting
                    and tables[conn.protocol].get(conn.original.key) is not conn.original]
        entries = [entry_of(conn, _KIND_OF_REASON[conn.original.reason], now) for conn, _ in live]
        batches = []
        start = 0
        for chunk, count in pack(entries):
            batch_conns = live[start:start + count]
            start += count
            held = [conn for conn, _ in batch_conns if conn in self._held]
            self._awaiting.update(held)
            sequence = self._sequence
            self._sequence = (sequence + 1) & 0xFFFFFFFF
            released += self._acks.sent(sequence, now, min(since for _, since in batch_conns), held)
            batches.append(BatchHeader(0, 0, sequence).pack() + chunk)
        self._replication["sent"] += len(entries)
        self._replication["batches_sent"] += len(batches)
        if released:   # connections that died while held, or batches pushed out of the bound
            self._released(released, "released_timeout")
        return batches

    def import_replication(self, batch: bytes, now: float) -> bytes | str:
        """Entries another TM replicated to us (through the distributor): the ack to send back (a batch
        header), or a reason when malformed (nothing of it is used, and it is not acknowledged)."""
        parts = split(batch)
        entries = parts if isinstance(parts, str) else decode_entries(parts[1])
        if isinstance(entries, str):
            self._counts[R.MALFORMED_REPLICATION] += 1
            return entries
        assert not isinstance(parts, str)
        for entry in entries:
            self._standby.add(entry, now)
        self._replication["received"] += len(entries)
        self._replication["acks_sent"] += 1
        return parts[0].pack()

    def replication_acked(self, ack: bytes, now: float) -> list[bytes] | str:
        """A standby's acknowledgement of one of our batches: the packets it releases (strict mode: once
        every standby has acknowledged), or a reason when malformed."""
        parts = split(ack)
        if isinstance(parts, str):
            self._counts[R.MALFORMED_REPLICATION] += 1
            return parts
        done = self._acks.ack(parts[0], now)
        return self._released(done, "released_acked") if done else []

    def release_overdue(self, now: float) -> list[bytes]:
        """Strict mode: packets held longer than `defer_timeout` without every ack go on (counted)."""
        overdue = self._acks.overdue(now, self._defer_timeout)
        return self._released(overdue, "released_timeout") if overdue else []

    def next_release(self) -> float | None:
        """When `release_overdue` next has packets to release (None: nothing is held in a batch sent)."""
        return self._acks.next_release(self._defer_timeout) if self._awaiting else None

    def _hold(self, conn: Conn, packet: bytes, reason: str) -> TMResult:
        held = self._held.setdefault(conn, [])
        if len(held) >= HELD_PER_CONNECTION:
            return TMResult(OVERLAY, packet, reason)   # bounded: the rest go on unheld
        held.append(packet)
        self._replication["held"] += 1
        return TMResult(DEFER, None, reason)

    def _released(self, conns: list[Conn], counter: str) -> list[bytes]:
        packets: list[bytes] = []
        for conn in conns:
            self._awaiting.discard(conn)
            packets += self._held.pop(conn, ())
        self._replication[counter] += len(packets)
        return packets

    def _commit(self, protocol: int, key: bytes, now: float) -> Half | None:
        """A packet we have no state for, of a connection another TM replicated to us: install it with the
        same translation, and go on. Source-NATed connections stay with their xlate's owner."""
        taken = self._standby.take(protocol, key, now, self._table.timeouts)
        if taken is None:
            return None
        entry, seen = taken
        table = self._table
        if table.clashes(protocol, entry.key) or table.clashes(protocol, entry.reply_key) or not table.make_room(now):
            return None
        conn = Conn(protocol, entry.version, entry.state, seen)
        length = ADDRESS_LENGTH[entry.version]
        if entry.kind == KIND_FIREWALL:
            conn.original = Half(conn, 0, entry.key, R.FIREWALL_ALLOW, None, None, 0, 0)
            conn.reply = Half(conn, 1, entry.reply_key, R.FIREWALL_REPLY, None, None, 0, 0)
        else:
            ports = entry.key[2 * length:]
            old_ports = ports[1:3] if protocol == ICMP or protocol == ICMPV6 else ports
            # A source-NATed connection keeps the failed TM's xlate address and port: its replies reach us
            # because the distributor routes that address to us, its backup, while it is down.
            _link(conn, entry.key, entry.reply_key, _REASONS_OF_KIND[entry.kind], entry.key[:length],
                  entry.key[length:2 * length], entry.addresses[:length], entry.addresses[length:], old_ports,
                  entry.ports)
            if entry.kind != KIND_SNAT:
                conn.server = self._find_server(conn)
        table.add(conn)
        self._replication["committed"] += 1
        if self._replicate:
            self._dirty[conn] = now       # ours now: our own second choice gets it
        return conn.original if key == entry.key else conn.reply

    # -- time -----------------------------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Remove every connection whose idle timeout has passed at `now` (and fragment state past its
        time); how many connections were removed."""
        self._counts[R.FRAGMENT_TIMEOUT] += self._fragments.expire(now)
        return self._table.expire(now)

    def next_deadline(self) -> float | None:
        """When `expire` next has work (None: nothing will expire)."""
        deadlines = [d for d in (self._table.next_deadline(), self._fragments.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    # -- status ---------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Flat, monotonically increasing counters."""
        result = {
            "packets.received": self._received,
            "packets.from_local": self._from_local,
            "conntrack.created": self._created,
            "conntrack.expired": self._table.expired,
            "conntrack.early_drop": self._table.evicted,
        }
        for reason, count in self._counts.items():
            name = R.counter_name(reason)
            result[name] = result.get(name, 0) + count
        for reason, count in self._local_counts.items():
            name = "forwarded.management" if reason == R.MANAGEMENT else R.counter_name(reason)
            result[name] = result.get(name, 0) + count
        return result

    def snapshot(self) -> dict:
        """JSON-able status: connections by state, table use, port allocators, services."""
        table = self._table
        ports: dict[str, dict[str, dict[str, int]]] = {}
        for (address, protocol), allocator in sorted(self._allocators.items()):
            entry = ports.setdefault(_address_text(address), {})
            entry[_PROTOCOL_NAMES[protocol]] = {
                "in_use": allocator.in_use, "capacity": allocator.capacity, "exhausted": allocator.exhausted,
            }
        return {
            "mode": self.config.mode,
            "connections": {"total": table.size, "by_state": table.count_by_state()},
            "table": {
                "size": table.size,
                "limit": table.max_entries,
                "fullness": round(table.size / table.max_entries, 4),
            },
            "ports": {"range": list(self.config.port_range), "by_address": ports},
            "services": [service.status() for service in self._services.values()],
            "fragments": self._fragments.status(),
            "replication": {"enabled": self._replicate, "strict": self._strict,
                            "standby_entries": len(self._standby), "pending": len(self._dirty),
                            "held_connections": len(self._held), **self._replication, **self._acks.status()},
            # Dropped packets by reason, the non-zero ones: the status page's "why" at a glance.
            "drops": {reason: self._counts[reason] + self._local_counts[reason] for reason in R.ALL_REASONS
                      if reason not in R.PASSING and self._counts[reason] + self._local_counts[reason]},
            "management": [str(address) for address in self.config.management],
            "xlate": [str(address) for address in self.config.xlate],
        }


def _swap(ports: bytes) -> bytes:
    """Source and destination port swapped (a reply's view); an echo identifier stays as it is."""
    return ports[2:4] + ports[0:2] if len(ports) == 4 else ports


def _link(conn: Conn, key: bytes, reply_key: bytes, reasons: tuple[str, str], src: bytes, dst: bytes,
          new_src: bytes, new_dst: bytes, old_ports: bytes, new_ports: bytes) -> None:
    """Both directions' rewrites, with the checksum deltas precomputed from the values the keys fix.

    The reply undoes exactly what the original direction changed, so its deltas are the one's-complement
    negation of the original's (`0xFFFF - delta`): each is computed once per connection.
    """
    new_addresses = new_src + new_dst
    ip_delta = checksum_delta(src + dst, new_addresses)
    port_delta = checksum_delta(old_ports, new_ports)
    # ICMPv4 has no pseudo-header; TCP, UDP and ICMPv6 checksums cover the addresses too.
    l4_delta = port_delta if conn.protocol == ICMP else add_deltas(ip_delta, port_delta)
    conn.original = Half(conn, 0, key, reasons[0], new_addresses, new_ports, ip_delta, l4_delta)
    conn.reply = Half(conn, 1, reply_key, reasons[1], dst + src, _swap(old_ports), 0xFFFF - ip_delta,
                      0xFFFF - l4_delta)


def _address_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))
