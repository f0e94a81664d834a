"""The distributor's sans-I/O core: bytes in, a `Verdict` out. No sockets, no clocks, no asyncio.

Where is the decision made? `Distributor.decide(flow)`, in this order (FIGS. 6-10 in overlay terms):
1. a packet that arrived *from a TM* (by its underlay address) is on its way out: forward it;
2. a packet *to a TM's management address* goes to that TM;
3. otherwise classify source (row) and destination (column) and apply the decision table cell:
   hash-src / hash-dst (keyed hash of that one endpoint → table row → TM), to-dest (the owner of the
   xlate address or port block; without one: forward, or for unknown sources hash-src), route, drop.
Forwarded packets go to the edge agent that owns the destination prefix, else back into the TUN.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from overlay import checksum, compiled, gre
from overlay.auth import Authenticator
from overlay.addrsets import PrefixIndex
from overlay.decision import (
    DROP,
    HASH_DST,
    HASH_SRC,
    NAT_ABLE,
    NODE,
    ROUTE,
    TO_DEST,
    VIRTUAL,
    XLATE,
    column_of,
    row_of,
)
from overlay.distributor.config import DistributorConfig
from overlay.tm import replication
from overlay.tm.packet import ADDRESS_LENGTH
from overlay.packet import PROTO_ICMP, PROTO_ICMPV6, Flow, parse_flow
from overlay.selection import SelectionTable, TableKey, cheap_table, table_for, table_key

ACTION_TM = "tm"
ACTION_FORWARD = "forward"
ACTION_LOCAL = "local"
ACTION_DROP = "drop"
ACTION_FANOUT = "fanout"   # control datagrams to several TMs (replicated connection state)

TM_STATES = ("enabled", "draining", "disabled")

_ROLE_CACHE_SIZE = 1 << 16
_ROLE_BITS = {"virtual": VIRTUAL, "node": NODE, "nat_able": NAT_ABLE, "nat_xlate": XLATE}


@dataclass(slots=True)
class Verdict:  # built per packet: not frozen (cheaper); treat as read-only
    """What to do with one packet. For `tm`: `sendto(packet, dest)` (packet is the GRE-in-UDP payload).
    For `forward`: write `packet` (inner IP) into the TUN, or with `dest` set sendto an edge agent.
    For `local`: a keepalive echo (`packet` is its payload) for the health checker. `drop`: count only."""

    action: str
    tm: str | None
    reason: str
    cell: str | None = None
    packet: bytes | None = None
    dest: tuple[str, int] | None = None
    flow_hash: int = 0
    fanout: list[tuple[bytes, tuple[str, int]]] | None = None   # ACTION_FANOUT: datagrams, each to its TM
    train: list[bytes] | None = None    # ACTION_TM for a super-packet's segments: each payload to `dest`


@dataclass(slots=True)
class Decision:
    """The full trace of one decision (what `overlay explain` prints)."""

    action: str
    tm: str | None
    reason: str
    step: str  # "management" | "table"
    src_roles: int = 0
    dst_roles: int = 0
    row: str | None = None
    column: str | None = None
    cell: str | None = None
    hashed: str | None = None  # "src" | "dst"
    key: bytes | None = None
    hash_value: int | None = None
    table_row: int | None = None
    first: str | None = None
    second: str | None = None
    # Set where the owner refinement (unknown → xlate: the owner, else the hash) looked at a hash-src
    # cell: "owner" when the destination's owner took the packet, "no-owner" when the hash stood.
    refinement: str | None = None

    @property
    def cell_name(self) -> str | None:
        return f"{self.row}>{self.column}" if self.row else None


class Distributor:
    def __init__(self, config: DistributorConfig, authenticator: Authenticator | None = None):
        """`authenticator`: seal and open every overlay datagram (overlay/auth.py); None: plain GRE-in-UDP,
        peers known by address (the lab on one host)."""
        self.auth = authenticator
        self._compiled: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None   # compiled_state's cache
        self._delivery: tuple[Any, ...] | None = None                            # delivery_state's
        # Where a peer's authenticated datagrams last came from: a TM or edge behind NAT is reached there.
        self.learned: dict[str, tuple[str, int]] = {}
        self._behind_nat: set[str] = set()
        self.edge_prefixes: dict[str, tuple[str, ...]] = {}   # what each edge last announced it serves
        self._admin: dict[str, str] = {}
        self._up: dict[str, bool] = {}
        self._returning: set[str] = set()   # back up, within health.return_grace: rows shared with the heirs
        self._return_tokens: dict[str, int] = {}
        self.counters_tm: Counter[str] = Counter()
        self.counters_cell: Counter[str] = Counter()
        self.counters_reason: Counter[str] = Counter()
        self.counters_drop: Counter[str] = Counter()  # the subset of reasons that dropped the packet
        self.generation = 0
        # Replication telemetry (when each TM's last batch came, each standby's ack lag) needs the time:
        # the agent sets its loop's clock; the core itself never reads one for a decision.
        self.clock: Callable[[], float] = time.monotonic
        self.replication_lag = replication.StandbyLag()
        # One packet loop of several (`[node] workers`): what a datagram taught this loop that the others
        # need too — where a peer behind NAT is, what an edge announced — goes out through `share`
        # (("learned", peer, endpoint), ("announced", edge, prefixes)); `apply_shared` takes it in.
        self.share: Callable[[tuple[Any, ...]], None] | None = None
        # Table builds off the event loop (the agent's overlay/runtime/tables.py): a rebuild that needs a
        # full build hands `prepare_tables(wanted, seed, rows_log2, done)` the fleets it needs tables for
        # and keeps the table it has until `done` (`tables_prepared`) brings them. None: build here and now.
        self.prepare_tables: Callable[[list[dict[str, int]], bytes, int,
                                       Callable[[dict[TableKey, SelectionTable] | None], None]], None] | None = None
        self._prepared: dict[TableKey, SelectionTable] = {}
        self.rebuilds_deferred = 0
        self.building = False   # a deferred build is in flight: the table is the fleet's as it was
        self.reconfigure(config)

    # -- configuration and fleet state ----------------------------------------------------------------
    def reconfigure(self, config: DistributorConfig) -> None:
        """Swap to a new config. Admin states and health of TMs that survive are kept."""
        self.config = config
        roles: PrefixIndex[int] = PrefixIndex()
        for set_name, entries in config.sets.items():
            for entry in entries:
                roles.add(entry, _ROLE_BITS[set_name])
        owners: PrefixIndex[str] = PrefixIndex()
        management: dict[bytes, str] = {}
        by_underlay: dict[tuple[str, int], str] = {}
        dests: dict[str, tuple[str, int]] = {}
        for tm in config.tms:
            for entry in tm.xlate:
                owners.add(entry, tm.name)
            for address in tm.management:
                management[address.packed] = tm.name
            dest = (str(tm.underlay[0]), tm.underlay[1])
            by_underlay[dest] = tm.name
            dests[tm.name] = dest
        edges: PrefixIndex[str] = PrefixIndex()
        edge_by_underlay: dict[tuple[str, int], str] = {}
        edge_dests: dict[str, tuple[str, int]] = {}
        from overlay.addrsets import AddressEntry

        for edge in config.edges:
            dest = (str(edge.underlay[0]), edge.underlay[1])
            edge_by_underlay[dest] = edge.name
            edge_dests[edge.name] = dest
            for prefix in edge.prefixes:
                edges.add(AddressEntry(prefix), edge.name)
        self._roles = roles
        # Roles depend on the address alone unless some entry is narrowed to a protocol or ports; then
        # they can be cached per address (v4 and v6 keys differ in length, so they never collide).
        narrowed = any(entry.protocol is not None or entry.ports for entries in config.sets.values() for entry in entries)
        self._roles_cache: dict[bytes, int] | None = None if narrowed else {}
        self._cells = {
            (src, dst): (row_of(src), column_of(dst), config.decision.action(row_of(src), column_of(dst)))
            for src in range(16)
            for dst in range(16)
        }
        # The fast path's cells (`from_tun`): the hashing ones, except where the owner refinement looks first.
        self._fast_cells = {
            roles: (f"{row}>{column}", cell, cell == HASH_SRC)
            for roles, (row, column, cell) in self._cells.items()
            if cell in (HASH_SRC, HASH_DST) and not (cell == HASH_SRC and row == "unknown" and roles[1] & XLATE)
        }
        self._largest_inner = config.underlay_mtu - gre.overhead(config.underlay_ipv6, 0)
        # The GRE header of an unmarked packet, IPv4 and IPv6 inner: what `gre.encapsulate` would put first.
        key = gre.make_key(config.gre_key, 0)
        self._gre_headers = (gre.encapsulate(b"\x45", key=key)[:-1], gre.encapsulate(b"\x60", key=key)[:-1])
        self._owners = owners
        self._management = management
        self._tm_by_underlay = by_underlay
        # A TM may answer from any source port (flow entropy): recognise it by address when that is unique.
        addresses = Counter(address for address, _ in by_underlay)
        self._tm_by_address = {address: name for (address, _), name in by_underlay.items() if addresses[address] == 1}
        self._tm_dest = dests
        self._edges = edges
        self._edge_by_underlay = edge_by_underlay
        self._edge_config = {edge.name: edge.prefixes for edge in config.edges}
        # Edges send from entropy ports like every node: recognised by address when that is unique.
        edge_addresses = Counter(address for address, _ in edge_by_underlay)
        self._edge_by_address = {address: name for (address, _), name in edge_by_underlay.items()
                                 if edge_addresses[address] == 1 and address not in self._tm_by_address}
        self._edge_dest = edge_dests
        self._seed64 = int.from_bytes(config.seed[:8], "big")
        self._hash_ports = config.hash_key == "addr+port"
        # Second-chance marks name TMs by their stable id: a reload that adds or removes TMs never
        # re-targets marks already in flight.
        self._tm_by_id = {tm.id: tm.name for tm in config.tms}
        self._tm_ids = {tm.name: tm.id for tm in config.tms}
        # Each TM's designated backup (`[[tm]] backup`): the owner of its xlate addresses while it is down,
        # and a standby of its source-NATed connections (they are replicated there). Without one, replies to
        # a down TM's xlate are dropped (`owner-down`): nobody else holds their state.
        self._backup = {tm.name: tm.backup for tm in config.tms if tm.backup is not None}
        self._fleet_id = config.gre_key or 0
        self._admin = {tm.name: self._admin.get(tm.name, "enabled") for tm in config.tms}
        self._up = {tm.name: self._up.get(tm.name, True) for tm in config.tms}
        self._returning &= set(self._up)
        self.generation += 1
        if hasattr(self, "_table"):
            del self._table  # a kept-last table names the old config's TMs: never carry it across
        self._rebuild()

    def set_tm_up(self, name: str, up: bool) -> None:
        self.set_tms_up({name: up})

    def set_tms_up(self, changes: dict[str, bool]) -> None:
        """Health of several TMs at once (one health pass): one rebuild for them all."""
        unknown = [name for name in changes if name not in self._up]
        if unknown:
            raise KeyError(unknown[0])
        changed = False
        for name, up in changes.items():
            if self._up[name] == up:
                continue
            changed = True
            self._up[name] = up
            if up and self.config.health.return_grace > 0:
                self._returning.add(name)   # until end_return(name, token): the agent's timer
                self._return_tokens[name] = self._return_tokens.get(name, 0) + 1
            else:
                self._returning.discard(name)
        if changed:
            self._rebuild()

    def return_token(self, name: str) -> int:
        """Which return of `name` this is: a timer for an earlier one (the TM flapped) ends nothing."""
        return self._return_tokens.get(name, 0)

    def end_return(self, name: str, token: int | None = None) -> None:
        """`health.return_grace` after `name` came back: its rows are its own again, unmarked."""
        if name in self._returning and (token is None or token == self._return_tokens.get(name)):
            self._returning.discard(name)
            self._rebuild()

    def set_tm_state(self, name: str, state: str) -> None:
        """Admin state: `enabled`; `draining` (its rows go to their next TM, which takes the new
        connections and hands packets it has no state for back to the draining TM — second chance —
        so established connections finish); `disabled` (leaves the table now, nothing goes to it)."""
        if name not in self._admin:
            raise KeyError(name)
        if state not in TM_STATES:
            raise ValueError(f"state must be one of {', '.join(TM_STATES)}")
        previous, self._admin[name] = self._admin[name], state
        if state == "enabled" and previous != "enabled" and self._up[name] and self.config.health.return_grace > 0:
            # Back from a drain (or a disable): its rows come back to it, but connections opened on the
            # TMs that held them meanwhile live there. Like a TM back from down, it shares them for
            # `return_grace` (second chance), until the agent's timer calls end_return.
            self._returning.add(name)
            self._return_tokens[name] = self._return_tokens.get(name, 0) + 1
        elif state != "enabled":
            self._returning.discard(name)
        self._rebuild()

    def fleet_state(self) -> tuple[dict[str, str], dict[str, bool], frozenset[str]]:
        """(admin states, up, returning): everything besides the config that the table depends on — what
        the agent hands its workers so that every process decides alike."""
        return dict(self._admin), dict(self._up), frozenset(self._returning)

    def apply_fleet_state(self, admin: dict[str, str], up: dict[str, bool], returning: frozenset[str]) -> None:
        """Take another process's `fleet_state()` (TMs this config does not have are ignored): one rebuild."""
        self._admin.update({name: state for name, state in admin.items() if name in self._admin})
        self._up.update({name: value for name, value in up.items() if name in self._up})
        self._returning = set(returning) & set(self._up)
        self._rebuild()

    def tm_states(self) -> dict[str, dict[str, object]]:
        return {
            name: {"admin": self._admin[name], "up": self._up[name], "serving": name in self._serving,
                   "reachable": name in self._active, "returning": name in self._returning}
            for name in self._admin
        }

    def _fleet_maps(self) -> tuple[dict[str, int], dict[str, int], set[str]] | None:
        """(serving, draining, returning) weights the table is built from; None: keep the last table."""
        up = {tm.name: tm.weight for tm in self.config.tms if self._up[tm.name]}
        serving = {name: weight for name, weight in up.items() if self._admin[name] == "enabled"}
        draining = {name: weight for name, weight in up.items() if self._admin[name] == "draining"}
        if not any(serving.values()) and draining:
            # Draining the last serving TMs leaves nobody to take their rows: they keep them.
            serving, draining = {**serving, **draining}, {}
        if not any(serving.values()) and self.config.health.all_down == "keep-last" and hasattr(self, "_table"):
            return None  # keep the last known fleet — table, owners and all — rather than nowhere
        return serving, draining, self._returning & set(serving)

    @staticmethod
    def _wanted(serving: dict[str, int], draining: dict[str, int], returning: set[str]) -> list[dict[str, int]]:
        """The tables a rebuild reads: the serving TMs', with the draining ones (their second chance), and
        without the returning ones (the heirs of their rows)."""
        wanted = [serving]
        if draining:
            wanted.append({**serving, **draining})
        if returning:
            wanted.append({name: weight for name, weight in serving.items() if name not in returning})
        return wanted

    def _lookup(self, weights: dict[str, int]) -> SelectionTable | None:
        prepared = self._prepared.get(table_key(weights, self.config.seed, self.config.rows_log2))
        return prepared if prepared is not None else cheap_table(weights, self.config.seed, self.config.rows_log2)

    def _rebuild(self, here: bool = False) -> None:
        maps = self._fleet_maps()
        if maps is None:
            self._prepared.clear()
            return
        serving, draining, returning = maps
        if self.prepare_tables is not None and not here and hasattr(self, "_table"):
            # Who is reachable does not depend on the table: replies to a TM that went down go to its
            # backup at once, whatever the table still says.
            self._active = frozenset({**serving, **draining})
            if self.building:
                return   # the build in flight comes back to `tables_prepared`, which rebuilds for the state of then
            slow = [weights for weights in self._wanted(serving, draining, returning) if self._lookup(weights) is None]
            if slow:
                # A full build (a second or two for a thousand TMs): off the event loop, one at a time. The
                # packets keep the table they have until `tables_prepared` swaps in the new one.
                self.rebuilds_deferred += 1
                self.building = True
                self.prepare_tables(slow, self.config.seed, self.config.rows_log2, self.tables_prepared)
                return

        def table(weights: dict[str, int]) -> SelectionTable:
            return self._lookup(weights) or table_for(weights, self.config.seed, self.config.rows_log2)

        # Reachable: up and not disabled, whatever the weight — a weight-0 TM takes no new rows but still
        # owns its xlate addresses, so replies to its source-NATed connections must reach it.
        self._active = frozenset({**serving, **draining})
        self._serving = frozenset(name for name, weight in serving.items() if weight > 0)
        self._table: SelectionTable = table(serving)
        self._mask = self._table.rows - 1
        # Rows a draining TM would still win get it as their second chance: the new first choice takes
        # new connections and hands back packets it has no state for (see gre.SECOND_CHANCE_PROTOCOL).
        self._fallback: list[int] | None = None
        ids = {tm.name: tm.id for tm in self.config.tms}
        if draining:
            with_draining = table({**serving, **draining})
            fallback = [0] * self._table.rows
            for row, winner in enumerate(with_draining.first):
                if winner >= 0:
                    name = with_draining.names[winner]
                    if name in draining:
                        fallback[row] = ids[name]
            self._fallback = fallback
        if returning:
            # Rows a returning TM wins back are marked with the TM that held them while it was down: the
            # returned TM takes new connections and hands back what it has no state for (second chance).
            without = table({name: w for name, w in serving.items() if name not in returning})
            fallback = self._fallback or [0] * self._table.rows
            names, first, heirs = self._table.names, self._table.first, without.first
            for row, winner in enumerate(first):
                if winner >= 0 and names[winner] in returning and heirs[row] >= 0 and not fallback[row]:
                    fallback[row] = ids[without.names[heirs[row]]]
            self._fallback = fallback
        self._prepared.clear()

    def tables_prepared(self, tables: dict[TableKey, SelectionTable] | None) -> None:
        """The tables a deferred rebuild asked for, built off the loop, by `table_key` (None: the build
        failed; build here): the rebuild now, for the fleet state of now — which asks for others again if
        the state moved on meanwhile."""
        self.building = False
        if tables is None:
            self._rebuild(here=True)
            return
        self._prepared.update(tables)
        self._rebuild()

    @property
    def table(self) -> SelectionTable:
        return self._table

    # -- classification ---------------------------------------------------------------------------------
    def roles(self, version: int, address: bytes, protocol: int, port: int | None) -> int:
        if self._roles_cache is not None:
            bits = self._roles_cache.get(address)
            if bits is not None:
                return bits
        bits = 0
        for value in self._roles.lookup(version, address, protocol, port):
            bits |= value
        if self._roles_cache is not None:
            if len(self._roles_cache) >= _ROLE_CACHE_SIZE:
                self._roles_cache.clear()  # bounded: a scan of random sources cannot grow it without limit
            self._roles_cache[address] = bits
        return bits

    def owner(self, version: int, address: bytes, protocol: int, port: int | None) -> str | None:
        found = self._owners.lookup(version, address, protocol, port)
        return found[0] if found else None

    def hash_endpoint(self, address: bytes, port: int | None, fragment: bool) -> tuple[bytes, int]:
        """The keyed hash of one endpoint. With `addr+port`, fragments still hash the address alone
        (non-first fragments carry no port), which is why `addr` is the default."""
        key = address
        if self._hash_ports and port is not None and not fragment:
            key = address + port.to_bytes(2, "big")
        return key, xxhash.xxh64_intdigest(key, self._seed64)

    # -- the decision -------------------------------------------------------------------------------------
    def decide(self, flow: Flow) -> Decision:
        tm = self._management.get(flow.dst)
        if tm is not None:
            return Decision(ACTION_TM, tm, "management", "management", first=tm)
        src_roles = self.roles(flow.version, flow.src, flow.proto, flow.sport)
        dst_roles = self.roles(flow.version, flow.dst, flow.proto, flow.dport)
        row, column, cell = self._cells[(src_roles, dst_roles)]
        decision = Decision(ACTION_DROP, None, "", "table", src_roles, dst_roles, row, column, cell)
        refine = cell == HASH_SRC and row == "unknown" and bool(dst_roles & XLATE)
        if cell == TO_DEST or refine:
            owner = self.owner(flow.version, flow.dst, flow.proto, flow.dport)
            if refine:
                decision.refinement = "no-owner" if owner is None else "owner"
            if owner is not None:
                decision.first = owner
                if owner in self._active:
                    decision.action, decision.tm, decision.reason = ACTION_TM, owner, "owner"
                elif self._backup.get(owner) in self._active:
                    # Its xlate's replies go to its designated backup, which holds its replicated bindings.
                    backup = self._backup[owner]
                    decision.second = backup
                    decision.action, decision.tm, decision.reason = ACTION_TM, backup, "owner-backup"
                else:
                    decision.reason = "owner-down"
                return decision
            if cell == TO_DEST:
                decision.action, decision.reason = ACTION_FORWARD, "no-owner"
                return decision
        if cell == HASH_SRC or cell == HASH_DST:
            if cell == HASH_SRC:
                decision.hashed, address, port = "src", flow.src, flow.sport
            else:
                decision.hashed, address, port = "dst", flow.dst, flow.dport
            key, value = self.hash_endpoint(address, port, flow.fragment)
            table_row = value & self._mask
            decision.key, decision.hash_value, decision.table_row = key, value, table_row
            first, second = self._table.choice(table_row)
            if first is None:
                if self.config.health.all_down == "route":
                    decision.action, decision.reason = ACTION_FORWARD, "no-tm:route"
                else:
                    decision.reason = "no-tm"
                return decision
            decision.action, decision.tm, decision.reason = ACTION_TM, first, cell
            decision.first, decision.second = first, second
            return decision
        if cell == ROUTE:
            decision.action, decision.reason = ACTION_FORWARD, "route"
        elif cell == DROP:
            decision.reason = "cell-drop"
        else:
            raise AssertionError(f"unhandled cell action {cell}")
        return decision

    # -- packet entry points ------------------------------------------------------------------------------
    def from_tun(self, packet: bytes) -> Verdict:
        """A packet the host routed into the TUN.

        The fast path: a packet whose endpoints' roles are cached, whose cell hashes, and whose row has a
        TM goes straight to that TM, without the `Decision` trace `decide` builds for `overlay explain`
        (~2 µs a packet of the ~3.6). It gives the verdict and counts exactly what `_apply(decide(...))`
        gives and counts (tests/distributor/test_fast_path.py checks it packet by packet); everything else
        takes the full path."""
        flow = parse_flow(packet)
        if isinstance(flow, str):
            return self._drop(flow)
        fast = self._fast_tm(flow, packet)
        if fast is None:
            return self._apply(flow, packet, self.decide(flow))
        tm, cell, cell_name, value, header = fast
        if self.auth is None:
            return Verdict(ACTION_TM, tm, cell, cell_name, header + packet, self._tm_dest[tm], value)
        return Verdict(ACTION_TM, tm, cell, cell_name, self.auth.seal(header + packet, tm), self.endpoint(tm),
                       PINNED if tm in self._behind_nat else value)

    def from_tun_train(self, segments: list[bytes]) -> Verdict | None:
        """The segments of one TCP super-packet (a TSO read, runtime/tun.py): one decision for them all.

        They share everything the fast path looks at — endpoints, ports, family, not a fragment — and none
        is longer than the first, so where the first takes the fast path each of them would take it to the
        same TM under the same mark (tests/distributor/test_train_path.py checks it against `from_tun` one
        by one). Returns the first's verdict with `train`, every segment's payload, and counts each segment
        as a packet; or None, and the caller hands the segments to `from_tun` one by one."""
        head = segments[0]
        flow = parse_flow(head)
        if isinstance(flow, str):
            return None
        fast = self._fast_tm(flow, head)
        if fast is None:
            return None
        tm, cell, cell_name, value, header = fast
        more = len(segments) - 1
        self.counters_cell[cell_name] += more
        self.counters_reason[cell] += more
        self.counters_tm[tm] += more
        if self.auth is None:
            return Verdict(ACTION_TM, tm, cell, cell_name, None, self._tm_dest[tm], value,
                           train=[header + segment for segment in segments])
        seal = self.auth.seal
        return Verdict(ACTION_TM, tm, cell, cell_name, None, self.endpoint(tm),
                       PINNED if tm in self._behind_nat else value,
                       train=[seal(header + segment, tm) for segment in segments])

    def compiled_state(self, sockets: int) -> tuple[Any, ...] | None:
        """What `_fastio.distribute` (the fast path in C, runtime/packet_path.py) needs, for an endpoint
        with `sockets` flow-entropy send sockets; None where it does not apply: no extension, `[auth]` (every
        datagram is sealed in Python), or roles that cannot be cached per address. Rebuilt when the table,
        its marks, the roles cache or the TMs' destinations are replaced; the cache's contents are read live."""
        if compiled.distribute is None or self.auth is not None or self._roles_cache is None:
            return None
        basis = (self._table, self._fallback, self._roles_cache, self._management, self._tm_dest)
        cached = self._compiled
        if cached is not None and cached[1][-1] == sockets and all(a is b for a, b in zip(cached[0], basis)):
            return cached[1]
        table = self._table
        grid = [self._fast_cells.get((src, dst)) for src in range(16) for dst in range(16)]
        state = (self._roles_cache, grid, self._management, self._largest_inner, self._hash_ports, self._seed64,
                 self._mask, table.first, self._fallback, self._gre_headers, self.config.gre_key or 0,
                 [self._tm_dest[name] for name in table.names], sockets)
        self._compiled = (basis, state)
        return state

    def delivery_state(self) -> tuple[Any, ...] | None:
        """What `_fastio.deliver` (`from_overlay` for a TM's plain data datagrams, in C) needs; None where
        it does not apply: no extension, `[auth]`, or edges (a TM's output may be for an edge)."""
        if compiled.deliver is None or self.auth is not None or self._edge_dest:
            return None
        state = self._delivery
        if state is None or state[0] is not self._tm_by_underlay or state[1] is not self._tm_by_address:
            state = self._delivery = (self._tm_by_underlay, self._tm_by_address, self._fleet_id)
        return state

    def count_compiled(self, combos: list[tuple[int, int, int]]) -> None:
        """Count what `_fastio.distribute` sent, [(src_roles * 16 + dst_roles, TM index, packets)], as
        `_fast_tm` counts each packet."""
        names = self._table.names
        for roles, tm, count in combos:
            cell_name, cell, _ = self._fast_cells[(roles >> 4, roles & 15)]
            self.counters_cell[cell_name] += count
            self.counters_reason[cell] += count
            self.counters_tm[names[tm]] += count

    def _fast_tm(self, flow: Flow, packet: bytes) -> tuple[str, str, str, int, bytes] | None:
        """The fast path's decision, counted: (tm, reason, cell, flow hash, GRE header), or None when the
        packet needs the full path."""
        cache = self._roles_cache
        if cache is None or flow.dst in self._management or len(packet) > self._largest_inner:
            return None
        src_roles = cache.get(flow.src)
        dst_roles = cache.get(flow.dst)
        if src_roles is None or dst_roles is None:
            return None
        fast = self._fast_cells.get((src_roles, dst_roles))
        if fast is None:
            return None
        cell_name, cell, by_source = fast
        address, port = (flow.src, flow.sport) if by_source else (flow.dst, flow.dport)
        if self._hash_ports and port is not None and not flow.fragment:
            address = address + port.to_bytes(2, "big")
        value = xxhash.xxh64_intdigest(address, self._seed64)
        table_row = value & self._mask
        table = self._table
        first = table.first[table_row]
        if first < 0:
            return None
        tm = table.names[first]
        self.counters_cell[cell_name] += 1
        self.counters_reason[cell] += 1
        self.counters_tm[tm] += 1
        mark = self._fallback[table_row] if self._fallback is not None else 0
        if mark:
            # The header of the marked encapsulation (its protocol follows the packet's version nibble).
            header = gre.encapsulate(packet[:1], key=gre.make_key(self.config.gre_key, mark))[:-1]
        else:
            header = self._gre_headers[flow.version == 6]
        return tm, cell, cell_name, value, header

    def from_overlay(self, payload: bytes, peer: tuple[str, int]) -> Verdict:
        """A GRE-in-UDP payload from an underlay peer: a TM's output, a keepalive echo, or an edge's packet."""
        if self.auth is not None:
            opened = self.auth.open(payload)
            if isinstance(opened, str):
                return self._drop(opened)   # never decapsulated: forged, replayed, unknown or plain
            sender, payload = opened
            if self.learned.get(sender) != peer:
                self._learn(sender, peer)
                if self.share is not None:
                    self.share(("learned", sender, peer))
            tm = sender if sender in self._tm_dest else None
            edge = sender if sender in self._edge_dest else None
        else:
            tm = self._tm_by_underlay.get(peer) or self._tm_by_address.get(peer[0])
            # Looked up only for what is not a TM's: a TM's datagram (the bulk) pays for one lookup.
            edge = None if tm is not None else self._edge_by_underlay.get(peer) or self._edge_by_address.get(peer[0])
        frame = gre.decapsulate(payload)
        if frame is None:
            return self._drop("malformed:gre")
        if gre.key_fleet(frame.key) != self._fleet_id:
            return self._drop("wrong-fleet-id")  # another fleet's overlay on the same underlay
        if frame.protocol == gre.ANNOUNCE_PROTOCOL:
            if tm is None and edge is None or self.auth is None:
                return self._drop("announce-unauthenticated")   # endpoints are learned from sealed datagrams only
            self.counters_reason["announce"] += 1
            if edge is not None:
                self._edge_announced(edge, frame.inner)
            return _ANNOUNCED
        if frame.protocol == gre.KEEPALIVE_PROTOCOL:
            if tm is None:
                return self._drop("keepalive-from-unknown-peer")
            return Verdict(ACTION_LOCAL, tm, "keepalive", packet=frame.inner)
        if frame.protocol == gre.SECOND_CHANCE_PROTOCOL:
            if tm is None:
                return self._drop("second-chance-from-unknown-peer")
            return self._second_chance(frame.inner, gre.key_fallback(frame.key))
        if frame.protocol == gre.DECLINED_PROTOCOL:
            if tm is None:
                return self._drop("declined-from-unknown-peer")
            return self._declined(frame.inner)
        if frame.protocol == gre.REPLICATION_PROTOCOL:
            if tm is None:
                return self._drop("replication-from-unknown-peer")
            return self._replicate(frame.inner, tm)
        if frame.protocol == gre.REPLICATION_ACK_PROTOCOL:
            if tm is None:
                return self._drop("replication-from-unknown-peer")
            return self._replication_ack(frame.inner, tm)
        if frame.protocol not in (gre.PROTO_IPV4, gre.PROTO_IPV6):
            return self._drop("unsupported-gre-protocol")
        if tm is not None:
            self.counters_reason["from-tm"] += 1
            return self._forward(frame.inner, "from-tm", tm)
        if edge is not None:
            flow = parse_flow(frame.inner)
            if isinstance(flow, str):
                return self._drop(flow)
            return self._apply(flow, frame.inner, self.decide(flow))
        return self._drop("unknown-peer")

    def _apply(self, flow: Flow, packet: bytes, decision: Decision, mark: bool = True) -> Verdict:
        cell = decision.cell_name
        if cell is not None:
            self.counters_cell[cell] += 1
        self.counters_reason[decision.reason] += 1
        if decision.action == ACTION_TM:
            tm = decision.tm
            assert tm is not None
            if len(packet) + gre.overhead(self.config.underlay_ipv6, 0) > self.config.underlay_mtu:
                too_big = self._too_big(flow, packet)
                if too_big is not None:
                    return too_big
            self.counters_tm[tm] += 1
            fallback = 0
            if mark and self._fallback is not None and decision.table_row is not None:
                fallback = self._fallback[decision.table_row]
            elif mark and self._returning and decision.reason == "owner" and tm in self._returning:
                # Replies to a returning TM's xlate: its backup held them while it was down (second chance).
                backup = self._backup.get(tm)
                if backup in self._active:
                    fallback = self._tm_ids[backup]
            flow_hash = decision.hash_value
            if flow_hash is None:
                # Owner and management traffic is not hashed for selection; hash the flow anyway so its
                # outer source port still spreads flows (RFC 8086 entropy, SO_REUSEPORT at the TM).
                ports = ((flow.sport or 0) << 16 | (flow.dport or 0)).to_bytes(4, "big")
                flow_hash = xxhash.xxh64_intdigest(flow.src + flow.dst + ports, self._seed64)
            datagram, dest = self._wire(tm, gre.encapsulate(packet, key=gre.make_key(self.config.gre_key, fallback)))
            if tm in self._behind_nat:
                flow_hash = PINNED
            return Verdict(ACTION_TM, tm, decision.reason, cell, datagram, dest, flow_hash)
        if decision.action == ACTION_FORWARD:
            return self._forward(packet, decision.reason, None, cell)
        self.counters_drop[decision.reason] += 1
        return Verdict(ACTION_DROP, None, decision.reason, cell)

    def forwarded_from_tm(self, count: int) -> None:
        """`count` more packets of a TM's train went into the TUN as `from_overlay` forwarded the run's
        first (runtime/packet_path.py): counted as `from_overlay` counts each."""
        self.counters_reason["from-tm"] += count

    def _forward(self, packet: bytes, reason: str, tm: str | None, cell: str | None = None) -> Verdict:
        version = packet[0] >> 4 if packet else 0
        if self._edge_dest and version in (4, 6) and len(packet) >= (20 if version == 4 else 40):
            dst = packet[16:20] if version == 4 else packet[24:40]
            edges = self._edges.lookup(version, dst, 0, None)
            if edges:
                datagram, dest = self._wire(edges[0], gre.encapsulate(packet, key=gre.make_key(self.config.gre_key, 0)))
                return Verdict(ACTION_FORWARD, tm, f"{reason}:edge", cell, datagram, dest,
                               PINNED if edges[0] in self._behind_nat else 0)
        return Verdict(ACTION_FORWARD, tm, reason, cell, packet)

    def _second_chance(self, packet: bytes, fallback: int) -> Verdict:
        """A TM returned a packet it has no state for; hand it to the fallback TM the key names, marked
        LAST_CHANCE: that TM uses its state or declines (never bounces), so a packet bounces at most once."""
        target = self._tm_by_id.get(fallback)
        if target is None:
            return self._drop("second-chance-bad-key")
        if target not in self._active:
            return self._drop("second-chance-target-gone")
        self.counters_reason["second-chance"] += 1
        self.counters_tm[target] += 1
        datagram, dest = self._wire(target, gre.encapsulate(packet, key=gre.make_key(self.config.gre_key, gre.LAST_CHANCE)))
        return Verdict(ACTION_TM, target, "second-chance", None, datagram, dest, PINNED if target in self._behind_nat else 0)

    def _replicate(self, batch: bytes, sender: str) -> Verdict:
        """A TM's replicated connections: each entry to the TM that would take its row if the sender failed
        (the row's second choice; the first, should the sender be second). Fanned out in batches, each
        copy telling its standby the origin and how many standbys to expect acks from; to none, we
        acknowledge the batch ourselves (strict mode need not wait for a standby there is none of)."""
        parts = replication.split(batch)
        entries = parts if isinstance(parts, str) else replication.decode_entries(parts[1])
        if isinstance(entries, str):
            return self._drop(entries)
        assert not isinstance(parts, str)
        sequence = parts[0].sequence
        by_target: dict[str, list[replication.Entry]] = {}
        for entry in entries:
            length = ADDRESS_LENGTH[entry.version]
            ports = entry.key[2 * length:]
            if len(ports) == 4:
                sport, dport = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
            else:
                sport = dport = int.from_bytes(ports[1:3], "big")   # echo: the identifier
            flow = Flow(entry.version, entry.key[:length], entry.key[length:2 * length], entry.protocol,
                        sport, dport, False, False)
            decision = self.decide(flow)
            targets = {decision.second if decision.first == sender else decision.first}
            if entry.kind in (replication.KIND_SNAT, replication.KIND_HAIRPIN):
                # Its replies come to the xlate's owner — the sender's backup once the sender is down.
                targets.add(self._backup.get(sender))
            for target in targets:
                if target is not None and target != sender and target in self._active:
                    by_target.setdefault(target, []).append(entry)
        self.counters_reason["replication"] += 1
        self.replication_lag.fanned(sender, sequence, self.clock())
        key = gre.make_key(self.config.gre_key, 0)
        if not by_target:
            ack = replication.BatchHeader(0, 0, sequence).pack()
            return Verdict(ACTION_FANOUT, sender, "replication",
                           fanout=[self._wire(sender, gre.encapsulate(ack, key=key, protocol=gre.REPLICATION_ACK_PROTOCOL))])
        # A subset of one batch's entries fits one batch again (a longer batch is split: every copy is
        # acknowledged, and `targets` counts the copies).
        copies = [(target, packed) for target, chosen in by_target.items() for packed, _ in replication.pack(chosen)]
        header = replication.BatchHeader(min(len(copies), 255), self._tm_ids[sender], sequence).pack()
        datagrams = [self._wire(target, gre.encapsulate(header + packed, key=key, protocol=gre.REPLICATION_PROTOCOL))
                     for target, packed in copies]
        return Verdict(ACTION_FANOUT, sender, "replication", fanout=datagrams)

    def _replication_ack(self, ack: bytes, standby: str) -> Verdict:
        """A standby acknowledges a batch it took: on to the batch's origin, naming the standby."""
        parts = replication.split(ack)
        if isinstance(parts, str):
            return self._drop(parts)
        header = parts[0]
        origin = self._tm_by_id.get(header.peer)
        if origin is None:
            return self._drop("replication-ack-unknown-origin")
        self.counters_reason["replication-ack"] += 1
        self.replication_lag.acked(origin, standby, header.sequence, self.clock())
        forwarded = replication.BatchHeader(header.targets, self._tm_ids[standby], header.sequence).pack()
        gre_payload = gre.encapsulate(forwarded, key=gre.make_key(self.config.gre_key, 0),
                                      protocol=gre.REPLICATION_ACK_PROTOCOL)
        return Verdict(ACTION_FANOUT, origin, "replication-ack", fanout=[self._wire(origin, gre_payload)])

    def _wire(self, peer: str, gre_payload: bytes) -> tuple[bytes, tuple[str, int]]:
        """A GRE payload for a TM or an edge, as it goes on the underlay: sealed to that peer when
        authentication is on, to the endpoint its sealed datagrams come from (NAT) or else its config's."""
        if self.auth is None:
            return gre_payload, self._tm_dest.get(peer) or self._edge_dest[peer]
        return self.auth.seal(gre_payload, peer), self.endpoint(peer)

    def endpoint(self, peer: str) -> tuple[str, int]:
        """Where a TM or edge is reached now: learned from its authenticated datagrams, else configured."""
        learned = self.learned.get(peer)
        if learned is not None:
            return learned
        return self._tm_dest.get(peer) or self._edge_dest[peer]

    def _learn(self, peer: str, endpoint: tuple[str, int]) -> None:
        """A peer's sealed datagram came from `endpoint` (first contact, or a NAT rebinding: roaming).
        A peer heard from elsewhere than its config says is behind NAT: we answer it from the port its
        datagrams reach (PINNED), because a port-restricted NAT lets in only what comes from there."""
        self.learned[peer] = endpoint
        configured = self._tm_dest.get(peer) or self._edge_dest.get(peer)
        if endpoint != configured:
            self._behind_nat.add(peer)
        else:
            self._behind_nat.discard(peer)

    def _edge_announced(self, edge: str, payload: bytes) -> None:
        """An edge says which prefixes it serves (text, one per line). The config decides what goes to it —
        an edge cannot claim addresses — but a difference is a misconfiguration the operator must see."""
        announced = tuple(sorted(payload.decode("ascii", "replace").split()))
        self.edge_prefixes[edge] = announced
        configured = tuple(sorted(str(prefix) for prefix in self._edge_config[edge]))
        if announced != configured:
            self.counters_reason["announce-prefixes-differ"] += 1
        if self.share is not None:
            self.share(("announced", edge, announced))

    def shared_state(self) -> list[tuple[Any, ...]]:
        """Everything `share` has told, as its messages: for a packet loop that starts late."""
        return ([("learned", peer, endpoint) for peer, endpoint in self.learned.items()]
                + [("announced", edge, prefixes) for edge, prefixes in self.edge_prefixes.items()])

    def apply_shared(self, message: tuple[Any, ...]) -> None:
        """What another packet loop's `share` sent (peers this config does not have are ignored)."""
        kind, peer, value = message
        if kind == "learned" and (peer in self._tm_dest or peer in self._edge_dest):
            self._learn(peer, (str(value[0]), int(value[1])))
        elif kind == "announced" and peer in self._edge_dest:
            self.edge_prefixes[peer] = tuple(value)

    def behind_nat(self, peer: str) -> bool:
        return peer in self._behind_nat

    def keepalive_datagram(self, tm: str, payload: bytes) -> tuple[bytes, tuple[str, int]]:
        """A health probe for `tm` as it goes on the underlay (the health checker's payload inside)."""
        return self._wire(tm, gre.encapsulate(payload, key=gre.make_key(self.config.gre_key, 0),
                                              protocol=gre.KEEPALIVE_PROTOCOL))

    def _declined(self, packet: bytes) -> Verdict:
        """The draining TM has no state for a bounced packet that opens a flow (UDP, ICMP echo): the flow
        is new. Decide it again and send it unmarked, so the row's TM opens it and keeps it."""
        flow = parse_flow(packet)
        if isinstance(flow, str):
            return self._drop(flow)
        self.counters_reason["declined"] += 1
        return self._apply(flow, packet, self.decide(flow), mark=False)

    def _drop(self, reason: str) -> Verdict:
        self.counters_reason[reason] += 1
        self.counters_drop[reason] += 1
        return Verdict(ACTION_DROP, None, reason)

    def _too_big(self, flow: Flow, packet: bytes) -> Verdict | None:
        """A packet that no longer fits once encapsulated. IPv4 without DF: send anyway (the kernel
        fragments the outer UDP datagram). With DF, or IPv6: drop it and answer the source with ICMP
        "fragmentation needed" / "packet too big" carrying the inner MTU, so PMTU discovery adapts."""
        inner_mtu = self.config.underlay_mtu - gre.overhead(self.config.underlay_ipv6, 0)
        if flow.version == 4 and not packet[6] & 0x40:
            return None
        if flow.icmp_error:
            return self._drop("too-big:icmp-error")  # never answer an error with an error
        self.counters_reason["too-big"] += 1
        return Verdict(ACTION_FORWARD, None, "too-big:icmp-sent", None, icmp_too_big(packet, inner_mtu))

    # -- status -------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        flat: dict[str, int] = {}
        flat.update({f"tm.{name}": count for name, count in self.counters_tm.items()})
        flat.update({f"cell.{name}": count for name, count in self.counters_cell.items()})
        flat.update({f"reason.{name}": count for name, count in self.counters_reason.items()})
        return flat

    def snapshot(self) -> dict[str, object]:
        share = self._table.share()
        states = self.tm_states()   # once: per TM it would make the status O(TMs²) (1,000 TMs: a second)
        return {
            "generation": self.generation,
            "hash_key": self.config.hash_key,
            "table_rows": self._table.rows,
            "table_pending": self.building,
            "tms": {
                tm.name: {
                    "underlay": f"{self._tm_dest[tm.name][0]}:{self._tm_dest[tm.name][1]}",
                    "weight": tm.weight,
                    "table_share": round(share.get(tm.name, 0.0), 6),
                    "packets": self.counters_tm.get(tm.name, 0),
                    **states[tm.name],
                }
                for tm in self.config.tms
            },
            # "off": plain GRE-in-UDP, peers known by address (anyone on the underlay can inject).
            "auth": self.auth.mode if self.auth is not None else "off",
            "endpoints": {name: f"{host}:{port}" for name, (host, port) in sorted(self.learned.items())},
            "edges": {
                edge.name: {
                    "prefixes": [str(prefix) for prefix in edge.prefixes],
                    "announced": list(self.edge_prefixes[edge.name]) if edge.name in self.edge_prefixes else None,
                    "endpoint": "{}:{}".format(*self.endpoint(edge.name)),
                }
                for edge in self.config.edges
            },
            "cells": dict(self.counters_cell),
            "reasons": dict(self.counters_reason),
            "drops": dict(self.counters_drop),
        }


_ANNOUNCED = Verdict(ACTION_DROP, None, "announce")   # nothing to do: the endpoint was learned
# A verdict's flow_hash for a peer behind NAT: send from the well-known port, not an entropy port.
PINNED = -1


def icmp_too_big(packet: bytes, mtu: int) -> bytes:
    """ICMP "fragmentation needed" (v4) or "packet too big" (v6) back to the packet's source, quoting as
    much of it as fits in a minimum-MTU datagram. Its source is the packet's destination: the host that
    receives it learns the path MTU towards that destination, which is what PMTU discovery needs."""
    if packet[0] >> 4 == 4:
        header_length = (packet[0] & 0x0F) * 4
        quoted = packet[: header_length + 8]
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted)
        struct.pack_into("!H", icmp, 2, checksum.internet_checksum(icmp))
        total = 20 + len(icmp)
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, PROTO_ICMP, 0, packet[16:20], packet[12:16]))
        struct.pack_into("!H", header, 10, checksum.internet_checksum(header))
        return bytes(header + icmp)
    src, dst = packet[24:40], packet[8:24]
    quoted6 = packet[: 1280 - 40 - 8]
    icmp6 = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quoted6)
    initial = checksum.pseudo_header_sum(src, dst, PROTO_ICMPV6, len(icmp6))
    struct.pack_into("!H", icmp6, 2, checksum.internet_checksum(icmp6, initial))
    return struct.pack("!IHBB16s16s", 6 << 28, len(icmp6), PROTO_ICMPV6, 64, src, dst) + bytes(icmp6)


def format_address(version: int, address: bytes) -> str:
    return str(ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address))
