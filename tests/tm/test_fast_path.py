"""The TM's established-flow fast path (`TMNode.from_overlay` → `TrafficManager.forward_established`)
against the full path it shortcuts (the same node with `fast_path=False`: `Uplink.receive`,
`gre.decapsulate`, `TrafficManager.receive`, `rewrite`, `Uplink.send`), datagram by datagram: the same
output (action, bytes, destination) for every datagram, and the same state — counters and drops, peers,
the connection table (every entry, both directions' rewrites, state, `last_seen`, the order of each
state's expiry list, the index), replication marks and what the replication export sends, held packets,
fragments, deadlines.

The mixes: a pool of flows (DNAT and SNAT, IPv4 and IPv6, TCP, UDP and ICMP echo, a client on a
management address) whose packets come in both directions — replies addressed to what the TM translated
to — with every TCP flag that changes a state, fragments, ICMP errors, trailing bytes, IP options and IPv6
extension headers, truncations, zero and edge checksums; GRE with and without a key, second- and
last-chance marks, other fleets, checksum and sequence fields, keepalives, unknown peers; time that
advances past the (shortened) timeouts, expiry timers, replication exports, acknowledgements (strict mode)
and another TM's replicated entries. A mutation check proves the comparison would catch a fast path that
forgets what the full path does.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import os
import random
import textwrap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import gre
from overlay.configlib import parse_toml
from overlay.tm.config import ConntrackConfig, ReplicationConfig, TMConfig, parse_tm_section
from overlay.tm.conntrack import Half
from overlay.tm.core import TrafficManager
from overlay.tm.node import TMNode
from overlay.tm.replication import BatchHeader, split
from overlay.tm.states import STATE_NAMES, TCP_CLOSE_WAIT, TCP_SYN_RECV, TCP_SYN_SENT

from .addresses import CLIENT, CLIENT6, CLIENT_B, MANAGEMENT, REMOTE, REMOTE6, ROUTER, SERVER1, SERVER1_6, VIP, VIP6
from .conftest import lab_config_with_dns
from .packets import ACK, FIN, PSH, RST, SYN, echo, fragments, icmp_error, tcp, udp
from .test_firewall import FIREWALL

DISTRIBUTOR = ("192.0.2.2", 4754)
ENTROPY_PORT = ("192.0.2.2", 40123)      # the same distributor, from an RFC 8086 entropy port
STRANGER = ("192.0.2.99", 4754)
FLEET_ID = 7
TM_ID = 5                                # a second-chance mark: "the draining TM is tm 5"

# Short timeouts, so that a mix of a few hundred datagrams sees connections expire in every state.
TIMEOUTS = {"tcp_syn_sent": 3.0, "tcp_syn_recv": 3.0, "tcp_established": 6.0, "tcp_fin_wait": 3.0,
            "tcp_close_wait": 3.0, "tcp_last_ack": 2.0, "tcp_time_wait": 2.0, "tcp_close": 1.0,
            "udp_unreplied": 2.0, "udp_replied": 5.0, "icmp": 2.0}

# (protocol, source, source port, destination, destination port): original directions. DNAT to the web
# and DNS services, SNAT out of the natable servers, a client on the management address, direct traffic
# to a server (firewall mode allows it; NAT mode has no rule for it), echo.
FLOWS = [
    ("tcp", CLIENT, 40000, VIP, 80), ("tcp", CLIENT_B, 40001, VIP, 80), ("tcp", CLIENT6, 40000, VIP6, 80),
    ("tcp", MANAGEMENT, 40002, VIP, 80), ("tcp", SERVER1, 41000, REMOTE, 443), ("tcp", SERVER1_6, 41000, REMOTE6, 443),
    ("tcp", CLIENT, 40003, SERVER1, 80),
    ("udp", CLIENT, 5000, VIP, 53), ("udp", CLIENT6, 5000, VIP6, 53), ("udp", SERVER1, 6000, REMOTE, 123),
    ("udp", SERVER1_6, 6000, REMOTE6, 123), ("udp", CLIENT_B, 5001, VIP, 53),
    ("echo", SERVER1, 77, REMOTE, 0), ("echo", SERVER1_6, 78, REMOTE6, 0),
]
TCP_FLAGS = [SYN, SYN | ACK, ACK, ACK, ACK | PSH, ACK | PSH, ACK | PSH, FIN | ACK, RST, RST | ACK, SYN | FIN, 0]


def config(variant: str) -> TMConfig:
    if variant == "firewall":
        base = parse_tm_section(parse_toml(FIREWALL).section("tm"))
    else:
        base = lab_config_with_dns()
    replication = ReplicationConfig(enabled=variant in ("replication", "strict", "firewall"),
                                    strict=variant == "strict")
    conntrack = ConntrackConfig(max_entries=6 if variant == "small table" else 64, timeouts=dict(TIMEOUTS))
    return dataclasses.replace(base, conntrack=conntrack, replication=replication)


class Twins:
    """Two nodes on the same config, one on the fast path and one forced onto the full path, fed the same
    datagrams and timer calls; every output compared as it comes, the whole state now and then."""

    def __init__(self, variant: str, fast: type[TrafficManager] = TrafficManager,
                 fast_node: type[TMNode] = TMNode) -> None:
        # A reload swaps between these: more management addresses (the reply directions of live DNAT and
        # SNAT connections among them) and other timeouts; and one distributor less.
        self.configs = [config(variant), reloaded(config(variant))]
        self.fleet_id = FLEET_ID if variant == "fleet id" else None
        self.distributors = [{"dist1": DISTRIBUTOR, "dist2": ("192.0.2.3", 4754)}, {"dist1": DISTRIBUTOR}]
        self.fast = fast_node(fast(self.configs[0]), self.distributors[0], self.fleet_id)
        self.full = TMNode(TrafficManager(self.configs[0]), self.distributors[0], self.fleet_id, fast_path=False)
        # Another TM whose connections are replicated to ours (our commits, as its standby), and the acks
        # our own batches get back (strict mode releases held packets on them). It has no management
        # address, so its connections may have replies to ours.
        self.donor = TrafficManager(dataclasses.replace(config("replication"), xlate=(), management=()))
        self.acks: list[bytes] = []
        self.now = 1.0
        self.fast_taken = 0   # datagrams the fast path answered
        forward = self.fast.core.forward_established

        def counted(data: bytes, at: int, prefixes: tuple[bytes, bytes], now: float) -> bytes | None:
            result = forward(data, at, prefixes, now)
            self.fast_taken += result is not None
            return result

        self.fast.core.forward_established = counted   # type: ignore[method-assign]

    def datagram(self, payload: bytes, peer: tuple[str, int]) -> None:
        fast, full = self.fast.from_overlay(payload, peer, self.now), self.full.from_overlay(payload, peer, self.now)
        if fast != full:
            raise Differs(f"{payload.hex()}: fast {fast} != full {full}")
        # Cheap to compare every time (the rest of the state is compared now and then): where the node's
        # next answers go, and how it counts its distributors.
        same((self.fast.last, self.fast.peers), (self.full.last, self.full.peers), "the node's distributors")

    def state_of(self, flow: tuple[str, str, int, str, int]) -> int | None:
        """The reference core's state of `flow` (None: not tracked)."""
        half = self.full.core._table.tables[protocol_number(flow)].get(flow_key(flow))
        return None if half is None or half.direction else half.conn.state

    def reply_key(self, flow: tuple[str, str, int, str, int]) -> bytes | None:
        """The key a reply of `flow` has — where the reference core translated it to — if it is tracked."""
        half = self.full.core._table.tables[protocol_number(flow)].get(flow_key(flow))
        return None if half is None or half.direction else half.conn.reply.key

    def call(self, name: str) -> None:
        """A timer or a batch the agent would act on, on both nodes."""
        now = self.now
        if name == "expire":
            same(self.fast.core.expire(now), self.full.core.expire(now), name)
        elif name == "replicate":
            batches = self.fast.replication(now)
            same(batches, self.full.replication(now), name)
            for datagram, _ in batches:
                frame = gre.decapsulate(datagram)
                assert frame is not None
                parts = split(frame.inner)
                assert not isinstance(parts, str)
                self.acks.append(BatchHeader(1, 0, parts[0].sequence).pack())
        elif name == "ack" and self.acks:
            self.datagram(gre.encapsulate(self.acks.pop(0), key=self.key(0),
                                          protocol=gre.REPLICATION_ACK_PROTOCOL), DISTRIBUTOR)
        elif name == "overdue":
            same(self.fast.overdue(now), self.full.overdue(now), name)
        elif name == "reload":
            self.configs.reverse()
            self.distributors.reverse()
            for node in (self.fast, self.full):
                node.core.reconfigure(self.configs[0])
                node.configure(self.distributors[0], self.fleet_id)
        elif name == "donor":
            for batch in self.donor.export_replication(now):
                self.datagram(gre.encapsulate(batch, key=self.key(0), protocol=gre.REPLICATION_PROTOCOL), DISTRIBUTOR)

    def key(self, mark: int) -> int | None:
        return gre.make_key(self.fleet_id, mark)

    def compare(self) -> None:
        fast, full = state(self.fast), state(self.full)
        for part in full:
            same(fast[part], full[part], part)


class Differs(AssertionError):
    """The fast path's node and the full path's differ."""


def same(fast: object, full: object, what: str) -> None:
    if fast != full:
        raise Differs(f"{what}: fast {fast!r} != full {full!r}")


def address_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def protocol_number(flow: tuple[str, str, int, str, int]) -> int:
    return {"tcp": 6, "udp": 17, "echo": 58 if ":" in flow[1] else 1}[flow[0]]


def flow_key(flow: tuple[str, str, int, str, int]) -> bytes:
    """The key the core tracks `flow`'s original direction by (overlay/wire/views.py)."""
    kind, src, sport, dst, dport = flow
    addresses = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    if kind == "echo":
        return addresses + b"Q" + sport.to_bytes(2, "big")
    return addresses + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


def half_state(half: Half) -> tuple[Any, ...]:
    return (half.direction, half.key, half.reason, half.addresses, half.ports, half.ip_delta, half.l4_delta,
            half.conn.original.key)


def state(node: TMNode) -> dict[str, Any]:
    """Everything the fast path could change, and everything it must leave as the full path leaves it."""
    core = node.core
    table = core._table
    connections = [
        (index, conn.protocol, conn.version, conn.state, conn.closer, conn.last_seen, half_state(conn.original),
         half_state(conn.reply), None if conn.server is None else (conn.server.packed, conn.server.port_bytes,
                                                                   conn.server.connections),
         None if conn.snat is None else conn.snat[1])
        for index, members in enumerate(table.by_state) for conn in members]   # in expiry order
    return {
        "connections": connections,
        "index": {protocol: [(key, half_state(half)) for key, half in halves.items()]
                  for protocol, halves in table.tables.items()},
        "dirty": [(conn.original.key, since) for conn, since in core._dirty.items()],
        "held": [(conn.original.key, packets) for conn, packets in core._held.items()],
        "counters": core.counters(),
        "snapshot": core.snapshot(),
        "deadlines": (core.next_deadline(), core.next_release()),
        "node": (dict(node.drops), dict(node.peers), node.keepalives_echoed, node.last),
    }


# -- the mixes ----------------------------------------------------------------------------------------------

def inner_packet(twins: Twins, rng: random.Random) -> list[bytes]:
    """One flow's next packet (or its fragments), in either direction, in one of the shapes the fast path
    must refuse or get exactly right. TCP mostly follows its conversation (handshake, data both ways, now
    and then a FIN or RST), by the reference core's state; now and then any flags, any direction."""
    tracked = [flow for flow in FLOWS if twins.state_of(flow) is not None]
    # Half the time a tracked flow's: what the fast path is for (and what it must still refuse).
    flow = kind, src, sport, dst, dport = rng.choice(tracked if tracked and rng.random() < 0.5 else FLOWS)
    key, state = twins.reply_key(flow), twins.state_of(flow)
    flags = rng.choice(TCP_FLAGS)
    reply = rng.random() < 0.45
    if kind == "tcp" and rng.random() < 0.8:
        if state is None or state >= TCP_CLOSE_WAIT and rng.random() < 0.3:
            reply, flags = False, SYN
        elif state == TCP_SYN_SENT:
            reply, flags = True, SYN | ACK
        elif state == TCP_SYN_RECV:
            reply, flags = False, ACK
        else:
            flags = rng.choices([ACK, ACK | PSH, FIN | ACK, RST], weights=[40, 40, 3, 1])[0]
    if reply:
        if key is not None and rng.random() < 0.95:   # to where the TM translated the flow
            length = 4 if len(key) in (11, 12) else 16
            src, dst = address_text(key[:length]), address_text(key[length:2 * length])
            sport, dport = (int.from_bytes(key[-2:], "big"), 0) if kind == "echo" else \
                (int.from_bytes(key[-4:-2], "big"), int.from_bytes(key[-2:], "big"))
        else:
            src, sport, dst, dport = dst, dport, src, sport
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 64])))
    if kind == "tcp":
        packet = tcp(src, sport, dst, dport, flags, body)
    elif kind == "udp":
        packet = udp(src, sport, dst, dport, body)
    else:
        packet = echo(src, dst, sport, reply=reply)
    shape = rng.choices(["plain", "fragments", "icmp error", "trailing", "options", "truncated", "zero checksum",
                         "edge checksum", "bad offset", "ttl"], weights=[30, 2, 2, 1, 1, 1, 1, 2, 1, 1])[0]
    v4 = packet[0] >> 4 == 4
    if shape == "fragments":
        pieces = fragments(udp(src, sport, dst, dport, bytes(120)) if kind != "tcp" else
                           tcp(src, sport, dst, dport, ACK, bytes(120)), 68 if v4 else 96, ident=rng.randrange(1, 3))
        if rng.random() < 0.3:
            rng.shuffle(pieces)
        return pieces[:rng.randint(1, len(pieces))]
    if shape == "icmp error":
        return [icmp_error(ROUTER if v4 else "2001:db8:ff::1", src, packet[::-1] if rng.random() < 0.1 else
                           tcp(dst, dport, src, sport) if kind == "tcp" else udp(dst, dport, src, sport),
                           rng.choice(["unreachable", "frag-needed", "time-exceeded"]))]
    buf = bytearray(packet)
    l4 = 20 if v4 else 40
    if shape == "trailing":
        buf += bytes(rng.randint(1, 8))
    elif shape == "options":
        if v4:   # four NOPs: IHL 6 (the header checksum is left stale: the TM does not check it)
            buf = bytearray(bytes([0x46]) + buf[1:20] + b"\x01\x01\x01\x01" + buf[20:])
            buf[2:4] = (len(buf)).to_bytes(2, "big")
        else:    # a hop-by-hop header (PadN) before the transport header
            buf = bytearray(buf[:6] + b"\x00" + buf[7:40] + bytes([buf[6], 0, 1, 4, 0, 0, 0, 0]) + buf[40:])
            buf[4:6] = (len(buf) - 40).to_bytes(2, "big")
    elif shape == "truncated":
        del buf[rng.randint(0, len(buf) - 1):]
    elif shape == "zero checksum" and kind == "udp":
        buf[l4 + 6:l4 + 8] = b"\x00\x00"
    elif shape == "edge checksum":
        at = rng.choice([10, l4 + (16 if kind == "tcp" else 6 if kind == "udp" else 2)]) if v4 else \
            l4 + (16 if kind == "tcp" else 6 if kind == "udp" else 2)
        buf[at:at + 2] = rng.choice([0, 1, 0xFFFE, 0xFFFF, rng.randrange(0x10000)]).to_bytes(2, "big")
    elif shape == "bad offset" and kind == "tcp":
        buf[l4 + 12] = rng.choice([0x00, 0x40, 0xF0])
    elif shape == "ttl":
        buf[8 if v4 else 7] = rng.randrange(256)
    return [bytes(buf)]


def wrap(twins: Twins, packet: bytes, rng: random.Random) -> tuple[bytes, tuple[str, int]]:
    """The GRE-in-UDP datagram a distributor (or someone else) sends with `packet`."""
    peer = rng.choices([DISTRIBUTOR, ENTROPY_PORT, ("192.0.2.3", 4754), STRANGER], weights=[60, 20, 5, 2])[0]
    form = rng.choices(["plain", "marked", "last chance", "other fleet", "checksum", "sequence", "wrong protocol",
                        "keepalive", "ethernet", "short"], weights=[70, 8, 5, 2, 2, 2, 3, 1, 1, 1])[0]
    protocol = gre.PROTO_IPV6 if packet and packet[0] >> 4 == 6 else gre.PROTO_IPV4
    key = twins.key(0)
    if form == "marked":
        key = twins.key(TM_ID)
    elif form == "last chance":
        key = twins.key(gre.LAST_CHANCE)
    elif form == "other fleet":
        key = gre.make_key(FLEET_ID + 1, 0)
    elif form == "wrong protocol":
        protocol = gre.PROTO_IPV4 if protocol == gre.PROTO_IPV6 else gre.PROTO_IPV6
    elif form == "keepalive":
        protocol = gre.KEEPALIVE_PROTOCOL
    elif form == "ethernet":
        protocol = 0x6558
    payload = gre.encapsulate(packet, key=key, protocol=protocol)
    if form in ("checksum", "sequence"):
        flags = int.from_bytes(payload[0:2], "big") | (gre.FLAG_CHECKSUM if form == "checksum" else gre.FLAG_SEQUENCE)
        extra = bytes(4)
        if form == "checksum":   # the checksum word comes before the key
            payload = flags.to_bytes(2, "big") + payload[2:4] + extra + payload[4:]
        else:
            header = 8 if key is not None else 4
            payload = flags.to_bytes(2, "big") + payload[2:header] + extra + payload[header:]
    if form == "short":
        payload = payload[:rng.randint(0, 8)]
    return payload, peer


def run_mix(twins: Twins, seed: int, events: int, every: int = 25) -> None:
    rng = random.Random(seed)
    for step in range(events):
        roll = rng.random()
        if roll < 0.01:
            twins.now += rng.choice([1.5, 2.5, 4.0, 7.0])          # past one timeout class or another
        else:
            twins.now += rng.choice([0.0, 0.001, 0.01, 0.05])
        if roll < 0.08:
            twins.call(rng.choice(["expire", "expire", "replicate", "replicate", "ack", "ack", "overdue", "reload"]))
        elif roll < 0.1:
            donate(twins, rng.choice(FLOWS))
        else:
            for packet in inner_packet(twins, rng):
                twins.datagram(*wrap(twins, packet, rng))
        if step % every == 0:
            twins.compare()
    twins.compare()


def donate(twins: Twins, flow: tuple[str, str, int, str, int]) -> None:
    """The donor TM sees `flow` open (TCP: the whole handshake; UDP: a request and its answer) and
    replicates it to ours."""
    kind, src, sport, dst, dport = flow
    donor, now = twins.donor, twins.now
    if kind == "echo":
        donor.receive(echo(src, dst, sport), now)
    else:
        opened = donor.receive(tcp(src, sport, dst, dport, SYN) if kind == "tcp" else udp(src, sport, dst, dport), now)
        half = donor._table.tables[protocol_number(flow)].get(flow_key(flow))
        if opened.action == "overlay" and half is not None:
            key = half.conn.reply.key
            length = len(key) // 2 - 2
            rsrc, rdst = address_text(key[:length]), address_text(key[length:2 * length])
            rsport, rdport = int.from_bytes(key[-4:-2], "big"), int.from_bytes(key[-2:], "big")
            if kind == "tcp":
                donor.receive(tcp(rsrc, rsport, rdst, rdport, SYN | ACK), now)
                donor.receive(tcp(src, sport, dst, dport, ACK), now)
            else:
                donor.receive(udp(rsrc, rsport, rdst, rdport), now)
    twins.call("donor")


def reloaded(tm_config: TMConfig) -> TMConfig:
    management = (*tm_config.management, ipaddress.ip_address(CLIENT), ipaddress.ip_address(REMOTE6))
    timeouts = {**TIMEOUTS, "tcp_established": 3.0, "udp_replied": 8.0}
    return dataclasses.replace(tm_config, management=management,
                               conntrack=dataclasses.replace(tm_config.conntrack, timeouts=timeouts))


VARIANTS = ["nat", "fleet id", "replication", "strict", "firewall", "small table"]


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=25 if os.environ.get("CI") == "true" else 2, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_the_fast_path_gives_exactly_what_the_full_path_gives(variant: str, seed: int) -> None:
    run_mix(Twins(variant), seed, 300)


@pytest.mark.parametrize("variant", ["nat", "strict", "firewall"])
def test_the_fast_path_is_taken_and_left(variant: str) -> None:
    """Not a test that cannot fail: over a mix, many datagrams take the fast path (in strict mode fewer:
    not while packets are held), and many others — every other case — still reach the full path."""
    twins = Twins(variant)
    run_mix(twins, 1, 300)
    received = twins.fast.core.counters()["packets.received"]
    taken = 10 if variant == "strict" else 30
    assert twins.fast_taken > taken and received - twins.fast_taken > 100, (twins.fast_taken, received)


# -- edge checksums through both paths --------------------------------------------------------------------

CORNER_FLOWS = [0, 2, 4, 7, 8, 9, 10]    # TCP and UDP, DNAT and SNAT, IPv4 and IPv6


@pytest.mark.parametrize("flow", CORNER_FLOWS, ids=lambda index: "-".join(map(str, FLOWS[index][:2])))
def test_every_checksum_corner_is_updated_as_the_full_path_updates_it(flow: int) -> None:
    checksum_corners(TrafficManager, flow)


def checksum_corners(fast: type[TrafficManager], flow: int, fast_node: type[TMNode] = TMNode) -> None:
    """Input checksums around each of the connection's deltas (where the update wraps, where it comes to 0
    and UDP turns 0 into 0xFFFF) and at both ends of the range, in both directions."""
    twins = Twins("nat", fast, fast_node)
    kind, src, sport, dst, dport = FLOWS[flow]
    opener = tcp(src, sport, dst, dport, SYN) if kind == "tcp" else udp(src, sport, dst, dport)
    twins.datagram(gre.encapsulate(opener), DISTRIBUTOR)
    key = twins.reply_key(FLOWS[flow])
    assert key is not None
    length = len(key) // 2 - 2
    rsrc, rdst = address_text(key[:length]), address_text(key[length:2 * length])
    rsport, rdport = int.from_bytes(key[-4:-2], "big"), int.from_bytes(key[-2:], "big")
    if kind == "tcp":   # to established: the server's SYN+ACK, the client's ACK
        twins.datagram(gre.encapsulate(tcp(rsrc, rsport, rdst, rdport, SYN | ACK)), DISTRIBUTOR)
        twins.datagram(gre.encapsulate(tcp(src, sport, dst, dport, ACK)), DISTRIBUTOR)
    else:               # replied: the fast path takes both directions
        twins.datagram(gre.encapsulate(udp(rsrc, rsport, rdst, rdport)), DISTRIBUTOR)
    conn = twins.full.core._table.tables[protocol_number(FLOWS[flow])][flow_key(FLOWS[flow])].conn
    v4 = ":" not in src
    l4 = 20 if v4 else 40
    at = l4 + (16 if kind == "tcp" else 6)
    for half, packet in ((conn.original, tcp(src, sport, dst, dport, ACK, b"data") if kind == "tcp"
                          else udp(src, sport, dst, dport)),
                         (conn.reply, tcp(rsrc, rsport, rdst, rdport, ACK, b"data") if kind == "tcp"
                          else udp(rsrc, rsport, rdst, rdport))):
        corners = {0, 1, 0xFFFE, 0xFFFF}
        for delta in (half.l4_delta, half.ip_delta):
            corners |= {delta, (delta + 1) & 0xFFFF, (delta - 1) & 0xFFFF, 0xFFFF - delta}
        for value in sorted(corners):
            for where in ([at, 10] if v4 else [at]):
                buf = bytearray(packet)
                buf[where:where + 2] = value.to_bytes(2, "big")
                twins.datagram(gre.encapsulate(bytes(buf)), DISTRIBUTOR)
    twins.compare()
    assert twins.fast_taken > 10


# -- the comparison catches what a wrong fast path would do -----------------------------------------------

def mutant(cls: type[Any], method: str, original: str, replacement: str) -> type[Any]:
    """`cls` with one line of `method` changed: its source with `original` replaced (it must be there),
    compiled in the namespace of the module that defines it."""
    source = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    assert source.count(original) == 1, f"the mutation's line is gone: {original!r}"
    namespace = dict(vars(inspect.getmodule(cls)))
    exec(compile(source.replace(original, replacement), "<mutant>", "exec"), namespace)
    return type("Mutant", (cls,), {method: namespace[method]})


CORE_MUTANTS = {
    "forgets to refresh the expiry": ("conn.last_seen = now", "pass"),
    "forgets the expiry order": ("self._by_state[state].move_to_end(conn)", "pass"),
    "skips the reason's counter": ("self._counts[half.reason] += 1", "pass"),
    "skips packets.received": ("self._received += 1", "pass"),
    "ignores the timeout": ("conn.last_seen + self._timeouts[state] <= now or ", ""),
    "forwards what closes": ("flags & (SYN | RST | FIN)", "flags & (SYN | RST)"),
    "forwards to the management address": ("data[at + 16:at + 20] in self._management", "False"),
    "takes any UDP reply": ("if half.direction and state != UDP_REPLIED:", "if False:"),
    "forwards past held packets": (" or (self._held and conn in self._held)", ""),
    "drops the UDP 0 → 0xFFFF rule": ("if not checksum and protocol == UDP:", "if False:"),
    "folds the transport checksum's borrow wrong": (" checksum += 0xFFFF", " checksum += 0x10000"),
    "folds the IPv4 header checksum's borrow wrong": ("ip_checksum += 0xFFFF", "ip_checksum += 0x10000"),
    # As if it had kept the timeouts it started with: a reload changes them.
    "uses the timeouts of before a reload": ("self._timeouts[state]", f"{[TIMEOUTS[name] for name in STATE_NAMES]}[state]"),
    "keeps trailing bytes": ("if total != size or", "if total > size or"),
}
NODE_MUTANTS = {
    "takes another fleet's key": ("(at == 8 and payload[4:6] == self._fast_fleet)", "at == 8"),
    "forgets who sent last": ("self.last = name", "pass"),
    "forgets the peer's count": ("self.peers[destination] += 1", "pass"),
}


@pytest.mark.parametrize("name", [*CORE_MUTANTS, *NODE_MUTANTS])
def test_the_comparison_catches_a_wrong_fast_path(name: str) -> None:
    core, node = TrafficManager, TMNode
    if name in CORE_MUTANTS:
        core = mutant(TrafficManager, "forward_established", *CORE_MUTANTS[name])
    else:
        node = mutant(TMNode, "from_overlay", *NODE_MUTANTS[name])
    variant = "strict" if name == "forwards past held packets" else "nat"
    with pytest.raises(Differs):
        for flow in CORNER_FLOWS:
            checksum_corners(core, flow, node)
        for seed in range(4):
            run_mix(Twins(variant, core, node), seed, 400, every=10)
