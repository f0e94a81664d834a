"""Property tests: random interleavings of many connections through one TM, checked against a model.

The model is written independently of the core: it knows each connection's original tuple, learns the
translation from the first packet the TM emits for it, and from then on predicts every output exactly:
original-direction packets keep that translation, replies (addressed to the translated tuple, as a real
peer would) come out as the exact reverse of the original tuple. It also knows the per-state timeouts,
so under a simulated clock it predicts which packets find their connection dead (dropped as invalid, or
opening a new connection). Invariants checked on the way: checksums of every emitted packet, no SNAT
port handed out while a live connection holds it, exhaustion only when the block is really full, and
after `expire(now)` the table holds exactly the model's live connections with the same next deadline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.tm.config import DEFAULT_TIMEOUTS, ConntrackConfig
from overlay.tm.core import TrafficManager

from .addresses import (
    CLIENT, CLIENT6, REMOTE, REMOTE6, SERVER1, SERVER1_6, SERVER2, SERVER2_6, VIP, VIP6, XLATE, XLATE6,
)
from .conftest import lab_config_with_dns
from .packets import ACK, SYN, checksum_problems, echo, flow, tcp, udp

PORTS = (1024, 1027)          # a small block, so exhaustion and reuse happen
TIMEOUTS = dict(DEFAULT_TIMEOUTS, tcp_syn_sent=40.0, tcp_syn_recv=30.0, tcp_established=100.0,
                udp_unreplied=30.0, udp_replied=60.0, icmp=20.0)
SERVERS = {
    ("tcp", 4): {(SERVER1, 80), (SERVER2, 80)}, ("tcp", 6): {(SERVER1_6, 80), (SERVER2_6, 80)},
    ("udp", 4): {(SERVER1, 53), (SERVER2, 5353)}, ("udp", 6): {(SERVER1_6, 53), (SERVER2_6, 53)},
}
KINDS = [
    ("tcp", 4, "dnat"), ("tcp", 6, "dnat"), ("udp", 4, "dnat"), ("udp", 6, "dnat"),
    ("tcp", 4, "snat"), ("udp", 6, "snat"), ("udp", 4, "snat"), ("icmp", 4, "snat"), ("icmp", 6, "snat"),
    ("tcp", 4, "hairpin"), ("udp", 4, "hairpin"),
]

NATABLE = {SERVER1, SERVER2, SERVER1_6, SERVER2_6}   # the lab's nat_able prefixes hold every server

Tuple = tuple[str, str, int, str, int]    # protocol, source, source port, destination, destination port


def reverse(t: Tuple) -> Tuple:
    return t[0], t[3], t[4], t[1], t[2]


def original_tuple(index: int, protocol: str, version: int, kind: str) -> Tuple:
    v6 = version == 6
    service_port = 80 if protocol == "tcp" else 53
    if kind == "dnat":
        return protocol, CLIENT6 if v6 else CLIENT, 20000 + index, VIP6 if v6 else VIP, service_port
    if kind == "hairpin":
        return protocol, SERVER2, 20000 + index, VIP, service_port
    return protocol, SERVER1_6 if v6 else SERVER1, 20000 + index, REMOTE6 if v6 else REMOTE, (
        0 if protocol == "icmp" else 30000 + index)


def build(t: Tuple, direction: int, step: int) -> bytes:
    protocol, src, sport, dst, dport = t
    if protocol == "tcp":
        flags = SYN if step == 0 else SYN | ACK if step == 1 else ACK
        return tcp(src, sport, dst, dport, flags, b"data" if step > 1 else b"")
    if protocol == "udp":
        return udp(src, sport, dst, dport)
    return echo(src, dst, sport if direction == 0 else dport, reply=direction == 1)


def as_tuple(packet: bytes) -> Tuple:
    f = flow(packet)
    if f.protocol != "icmp":
        return f.protocol, f.src, f.sport, f.dst, f.dport
    request = f.dport in (8, 128)
    return "icmp", f.src, f.sport if request else 0, f.dst, 0 if request else f.sport


@dataclass
class ModelConn:
    original: Tuple
    translated: Tuple
    state: str
    last_seen: float
    version: int

    @property
    def deadline(self) -> float:
        return self.last_seen + TIMEOUTS[self.state]

    def snat_port(self) -> tuple[str, str, int] | None:
        protocol, src, sport = self.translated[:3]
        return (protocol, src, sport) if src in (XLATE, XLATE6) else None


@dataclass
class Model:
    conns: list[ModelConn] = field(default_factory=list)

    def prune(self, now: float) -> None:
        self.conns = [conn for conn in self.conns if conn.deadline > now]

    def find(self, t: Tuple) -> tuple[ModelConn, int] | None:
        for conn in self.conns:
            if conn.original == t:
                return conn, 0
            if reverse(conn.translated) == t:
                return conn, 1
        return None

    def ports_in_use(self, protocol: str, address: str) -> set[int]:
        return {p[2] for c in self.conns if (p := c.snat_port()) and p[:2] == (protocol, address)}


def next_state(protocol: str, state: str, direction: int, step: int) -> str:
    if protocol == "udp":
        return "udp_replied" if direction == 1 else state
    if protocol == "icmp":
        return "icmp"
    if state == "tcp_syn_sent" and direction == 1 and step == 1:
        return "tcp_syn_recv"
    if state == "tcp_syn_recv" and direction == 0 and step >= 2:
        return "tcp_established"
    return state


@dataclass
class Script:
    original: Tuple
    version: int
    kind: str
    packets: int
    sent: int = 0
    translated: Tuple | None = None     # as last learned; replies are addressed to it


scripts_strategy = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(1, 8)), min_size=1, max_size=20,
)
# Multiples of 5 s, like the timeouts, so packets often arrive exactly at a deadline.
schedule_strategy = st.lists(
    st.tuples(st.integers(0, 19), st.sampled_from([0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 100.0]), st.booleans()),
    min_size=1, max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(scripts_strategy, schedule_strategy)
def test_random_interleavings_translate_consistently_and_expire_on_time(scripts_spec, schedule) -> None:
    config = dataclasses.replace(lab_config_with_dns(), port_range=PORTS,
                                 conntrack=ConntrackConfig(10_000, TIMEOUTS))
    tm = TrafficManager(config)
    scripts = [Script(original_tuple(i, p, v, k), v, k, n) for i, ((p, v, k), n) in enumerate(scripts_spec)]
    model = Model()
    now = 0.0
    for pick, delta, run_expire in schedule:
        script = scripts[pick % len(scripts)]
        if script.sent >= script.packets:
            continue
        now += delta
        model.prune(now)
        if run_expire:
            tm.expire(now)
            assert tm.snapshot()["connections"]["total"] == len(model.conns)
            assert tm.next_deadline() == min((c.deadline for c in model.conns), default=None)
        step = script.sent
        script.sent += 1
        direction = 0 if step == 0 else (1 if step % 2 == 1 else 0)
        protocol = script.original[0]
        if direction == 0:
            sent = script.original
        elif script.translated is None:
            continue                       # never opened: there is nothing to reply to
        else:
            sent = reverse(script.translated)
        result = tm.receive(build(sent, direction, step), now)
        found = model.find(sent)

        if found is not None:
            conn, found_direction = found
            expected = conn.translated if found_direction == 0 else reverse(conn.original)
            assert result.action == "overlay", (result.reason, sent)
            assert as_tuple(result.packet) == expected
            assert checksum_problems(result.packet) == []
            conn.state = next_state(protocol, conn.state, found_direction, step)
            conn.last_seen = now
            continue

        opener = direction == 0 and (protocol != "tcp" or step == 0)
        if not opener and protocol == "udp" and sent[1] in NATABLE and sent[3] not in (XLATE, XLATE6):
            # A server's reply after its connection expired: decided by state, not by port, it opens a
            # source-NAT flow of its own. The script ends here (its client would clash with that flow).
            xlate = XLATE6 if script.version == 6 else XLATE
            in_use = model.ports_in_use(protocol, xlate)
            script.sent = script.packets
            if len(in_use) == PORTS[1] - PORTS[0] + 1:
                assert (result.action, result.reason) == ("drop", "ports-exhausted")
                continue
            assert (result.action, result.reason) == ("overlay", "snat"), sent
            out = as_tuple(result.packet)
            assert out[1] == xlate and out[2] not in in_use and out[3:] == sent[3:]
            model.conns.append(ModelConn(sent, out, "udp_unreplied", now, script.version))
            continue
        if not opener:
            assert (result.action, result.reason) == ("drop", "invalid:no-state"), sent
            continue
        xlate = XLATE6 if script.version == 6 else XLATE
        snat = script.kind != "dnat"
        in_use = model.ports_in_use(protocol, xlate)
        if snat and len(in_use) == PORTS[1] - PORTS[0] + 1:
            assert (result.action, result.reason) == ("drop", "ports-exhausted")
            continue
        assert result.action == "overlay", result.reason
        assert checksum_problems(result.packet) == []
        out = as_tuple(result.packet)
        if snat:
            assert out[1] == xlate and PORTS[0] <= out[2] <= PORTS[1]
            assert out[2] not in in_use, "a live connection's port was handed out again"
        else:
            assert out[1:3] == sent[1:3]
        if script.kind == "snat":
            assert out[3:] == sent[3:]
        else:
            assert (out[3], out[4]) in SERVERS[(protocol, script.version)]
        state = {"tcp": "tcp_syn_sent", "udp": "udp_unreplied", "icmp": "icmp"}[protocol]
        model.conns.append(ModelConn(sent, out, state, now, script.version))
        script.translated = out
    model.prune(now)
    tm.expire(now)
    assert tm.snapshot()["connections"]["total"] == len(model.conns)
