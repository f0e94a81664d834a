"""The product's promise as a property: for every fleet, address plan and conversation, every packet of
both directions — and every ICMP error about them — reaches the same TM, although the TM rewrote
addresses in between.

The TMs here are *model TMs*: a few lines of dpkt address rewriting written for this test (DNAT a VIP to
a node, SNAT a node to the TM's own xlate address or port block, both for a hairpin), independent of the
project's TM core. Fleets, plans and seeds are random; the config goes through the real TOML loader.

Negative controls: the same property must FAIL for a symmetric 5-tuple hash (the design's warning) and
for overrides that hash the server on the way back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import dpkt
import pytest
import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from overlay import gre
from overlay.config import parse_node_config
from overlay.distributor.core import ACTION_TM, Decision, Distributor
from overlay.packet import Flow
from tests.distributor import packets as P

TCP, UDP, ICMP = "tcp", "udp", "icmp"


# -- the model TM ------------------------------------------------------------------------------------------
def rewrite(packet: bytes, *, src: str | None = None, sport: int | None = None, dst: str | None = None,
            dport: int | None = None) -> bytes:
    """What a NAT does to a packet: new addresses/ports, checksums recomputed by dpkt."""
    ip = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    if src is not None:
        ip.src = P.packed(src)
    if dst is not None:
        ip.dst = P.packed(dst)
    segment = ip.data
    if isinstance(segment, (dpkt.tcp.TCP, dpkt.udp.UDP)):
        segment.sport = segment.sport if sport is None else sport
        segment.dport = segment.dport if dport is None else dport
        segment.sum = 0
    if isinstance(ip, dpkt.ip.IP):
        ip.sum = 0
    return bytes(ip)


@dataclass
class ModelTM:
    """A NAT load balancer: `xlate[version]` = (address, first port, last port) it translates sources to."""

    name: str
    xlate: dict[int, tuple[str, int, int]]
    next_port: dict[int, int] = field(default_factory=dict)

    def source_port(self, version: int) -> int:
        _, low, high = self.xlate[version]
        port = self.next_port.get(version, low)
        self.next_port[version] = low + (port - low + 1) % (high - low + 1)
        return port


# -- the fleet, the plan, the config ----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    weights: tuple[int, ...]
    seed: str
    port_blocks: bool  # xlate by port blocks of one shared address, or one address per TM
    vips: dict[int, tuple[str, ...]]
    nodes: dict[int, tuple[str, ...]]
    nodes_nat_able: bool
    hash_key: str

    def xlate(self, index: int, version: int) -> tuple[str, int, int]:
        if self.port_blocks:
            size = 60000 // len(self.weights)
            low = 1024 + index * size
            return ("203.0.113.100" if version == 4 else "2001:db8:ee::100", low, low + size - 1)
        return (f"203.0.113.{104 + index}" if version == 4 else f"2001:db8:ee::{0x104 + index:x}", 1024, 65535)

    def toml(self) -> str:
        def strings(items: list[str]) -> str:
            return "[" + ", ".join(f'"{item}"' if not item.startswith("{") else item for item in items) + "]"

        host = {4: "/32", 6: "/128"}
        nat_able = ["203.0.113.0/26", "2001:db8:2::/64"] if self.nodes_nat_able else []
        if self.port_blocks:
            nat_xlate = ['{ prefix = "203.0.113.100/32", protocol = "tcp", ports = "1024-65535" }',
                         '{ prefix = "203.0.113.100/32", protocol = "udp", ports = "1024-65535" }',
                         '{ prefix = "2001:db8:ee::100/128", protocol = "tcp", ports = "1024-65535" }',
                         '{ prefix = "2001:db8:ee::100/128", protocol = "udp", ports = "1024-65535" }']
        else:
            nat_xlate = ["203.0.113.96/27", "2001:db8:ee::/64"]
        lines = [
            '[node]\nrole = "distributor"\nname = "prop"\n[underlay]\naddress = "192.0.2.2"\nmtu = 9000\n',
            f'[hash]\nseed = "{self.seed}"\nkey = "{self.hash_key}"\n',
            "[sets]",
            "virtual = " + strings([v + host[ver] for ver in (4, 6) for v in self.vips[ver]]),
            "node = " + strings([n + host[ver] for ver in (4, 6) for n in self.nodes[ver]]),
            "nat_able = " + strings(nat_able),
            "nat_xlate = " + strings(nat_xlate),
        ]
        for index, weight in enumerate(self.weights):
            xlate = []
            for version in (4, 6):
                address, low, high = self.xlate(index, version)
                if self.port_blocks:
                    xlate += [f'{{ prefix = "{address}{host[version]}", protocol = "{proto}", ports = "{low}-{high}" }}' for proto in ("tcp", "udp")]
                else:
                    xlate.append(address + host[version])
            lines.append(f'\n[[tm]]\nname = "tm-{index:02d}"\nunderlay = "192.0.2.{64 + index}"\nweight = {weight}\nxlate = {strings(xlate)}')
        return "\n".join(lines) + "\n"

    def model_tms(self) -> dict[str, ModelTM]:
        return {f"tm-{i:02d}": ModelTM(f"tm-{i:02d}", {v: self.xlate(i, v) for v in (4, 6)}) for i in range(len(self.weights))}


def _distinct(draw: st.DrawFn, strategy: st.SearchStrategy[int], count: int) -> list[int]:
    return draw(st.lists(strategy, min_size=count, max_size=count, unique=True))


@st.composite
def plans(draw: st.DrawFn, hash_key: str = "addr") -> Plan:
    size = draw(st.integers(1, 12))
    weights = tuple(draw(st.lists(st.integers(0, 3), min_size=size, max_size=size)))
    if not any(weights):
        weights = (1,) + weights[1:]
    vip_count, node_count = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    return Plan(
        weights=weights,
        seed=draw(st.text("0123456789abcdef", min_size=16, max_size=32)),
        port_blocks=draw(st.booleans()),
        vips={4: tuple(f"203.0.113.{64 + n}" for n in _distinct(draw, st.integers(0, 31), vip_count)),
              6: tuple(f"2001:db8:80::{n:x}" for n in _distinct(draw, st.integers(1, 0xFFFF), vip_count))},
        nodes={4: tuple(f"203.0.113.{n}" for n in _distinct(draw, st.integers(2, 63), node_count)),
               6: tuple(f"2001:db8:2::{n:x}" for n in _distinct(draw, st.integers(1, 0xFFFF), node_count))},
        nodes_nat_able=draw(st.booleans()),
        hash_key=hash_key,
    )


def outside(draw: st.DrawFn, version: int) -> str:
    """A client or remote server: an address in no set."""
    if version == 4:
        return str(ipaddress.IPv4Address(draw(st.sampled_from([0xC6336400, 0xC0000280])) + draw(st.integers(1, 126))))
    return f"2001:db8:1::{draw(st.integers(1, 0xFFFF)):x}"


@dataclass(frozen=True)
class Conversation:
    kind: str  # inbound | outbound | hairpin
    version: int
    proto: str
    client: str  # the initiator (client, or node for outbound/hairpin)
    client_port: int
    server: str  # VIP (inbound, hairpin) or remote (outbound)
    server_port: int
    node: str  # the node a VIP is balanced to (inbound, hairpin)
    node_port: int
    router: str  # where ICMP errors come from
    error_kind: str  # too-big | unreachable | time-exceeded


@st.composite
def conversations(draw: st.DrawFn, plan: Plan) -> Conversation:
    kind = draw(st.sampled_from(["inbound", "outbound", "hairpin"]))
    version = draw(st.sampled_from([4, 6]))
    protos = [TCP, UDP] if plan.port_blocks else [TCP, UDP, ICMP]  # port blocks need ports
    proto = draw(st.sampled_from(protos))
    node = draw(st.sampled_from(plan.nodes[version]))
    if kind == "inbound":
        client, server = outside(draw, version), draw(st.sampled_from(plan.vips[version]))
    elif kind == "outbound":
        client, server = node, outside(draw, version)
    else:
        client, server = draw(st.sampled_from(plan.nodes[version])), draw(st.sampled_from(plan.vips[version]))
    return Conversation(kind, version, proto, client, draw(st.integers(1, 65535)), server,
                        draw(st.integers(1, 65535)), node, draw(st.integers(1, 65535)), outside(draw, version),
                        draw(st.sampled_from(["too-big", "unreachable", "time-exceeded"])))


def packet(version: int, proto: str, src: str, sport: int, dst: str, dport: int, request: bool) -> bytes:
    """One packet of a conversation; ICMP echo uses `sport` as its identifier both ways."""
    if proto == TCP:
        return P.tcp(src, sport, dst, dport, flags=P.TCP_SYN if request else P.TCP_SYN | P.TCP_ACK, payload=b"data")
    if proto == UDP:
        return P.udp(src, sport, dst, dport, payload=b"data")
    return P.echo(src, dst, sport, request=request)


# -- running a conversation through the distributor and the model TMs ----------------------------------------
@dataclass(frozen=True)
class Played:
    """A conversation's packets once its TM is known: what the TM emits, and what comes back."""

    request: bytes
    translated: bytes  # the TM's rewrite of the request, on its way to the server
    reply: bytes  # the server's answer, arriving at the distributor
    untranslated: bytes  # the TM's rewrite of the reply, on its way to the client


def first_packet(talk: Conversation) -> bytes:
    return packet(talk.version, talk.proto, talk.client, talk.client_port, talk.server, _server_port(talk), True)


def _server_port(talk: Conversation) -> int:
    # An echo's identifier is its only "port", the same both ways.
    return talk.client_port if talk.proto == ICMP else talk.server_port


def translate(tm: ModelTM, talk: Conversation) -> Played:
    """The model TM at work: DNAT (inbound), SNAT to its own xlate address (outbound), both (hairpin)."""
    v, proto, icmp = talk.version, talk.proto, talk.proto == ICMP
    c, cp, s, sp = talk.client, talk.client_port, talk.server, _server_port(talk)
    request = first_packet(talk)
    x, xport = tm.xlate[v][0], (cp if icmp else tm.source_port(v))
    n, np_ = talk.node, (cp if icmp else talk.node_port)
    if talk.kind == "inbound":
        translated = rewrite(request, dst=n, dport=None if icmp else np_)
        reply = packet(v, proto, n, np_, c, cp, False)
        untranslated = rewrite(reply, src=s, sport=None if icmp else sp)
    elif talk.kind == "outbound":
        translated = rewrite(request, src=x, sport=None if icmp else xport)
        reply = packet(v, proto, s, sp, x, xport, False)
        untranslated = rewrite(reply, dst=c, dport=None if icmp else cp)
    else:  # hairpin: the SNAT makes the reply come back to the TM
        translated = rewrite(request, src=x, sport=None if icmp else xport, dst=n, dport=None if icmp else np_)
        reply = packet(v, proto, n, np_, x, xport, False)
        untranslated = rewrite(reply, src=s, sport=None if icmp else sp, dst=c, dport=None if icmp else cp)
    return Played(request, translated, reply, untranslated)


def underlay(tm: str) -> tuple[str, int]:
    return (f"192.0.2.{64 + int(tm[3:])}", 4754)


def deliver(core: Distributor, wire: bytes, owner: str) -> tuple[str | None, str]:
    """Where a packet of `owner`'s connection ends up. A model TM that gets a packet of a connection it
    has no state for, marked for a second chance, hands it back (as a real TM does); it has state for
    its own connections only. Returns (final TM or None, how)."""
    verdict = core.from_tun(wire)
    if verdict.action != ACTION_TM:
        return None, f"{verdict.action} ({verdict.reason})"
    frame = gre.decapsulate(verdict.packet)
    if verdict.tm != owner and frame is not None and gre.key_fallback(frame.key):
        handed = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.SECOND_CHANCE_PROTOCOL)
        verdict = core.from_overlay(handed, underlay(verdict.tm))
        if verdict.action != ACTION_TM:
            return None, f"second chance: {verdict.action} ({verdict.reason})"
    return verdict.tm, f"{verdict.reason}, {verdict.cell}"


def follow(core: Distributor, owner: str, talk: Conversation, played: Played) -> list[str]:
    """Everything after the first request: the TM's outputs are forwarded, and every packet and ICMP
    error that needs the connection's state must reach `owner`."""
    violations = []
    for wire in (played.translated, played.untranslated):
        verdict = core.from_overlay(gre.encapsulate(wire), underlay(owner))
        if (verdict.action, verdict.reason, verdict.packet) != ("forward", "from-tm", wire):
            violations.append(f"TM output not forwarded: {verdict.reason}")
    # Routers beyond the TM quote what they saw — the packets the TM emitted — back towards their
    # sources, through the distributor. (An error about a packet before its TM never reaches us: it
    # goes straight back to the sender.)
    for description, wire in (
        ("reply", played.reply),
        ("second request", played.request),
        ("ICMP error about the translated request", P.icmp_error(talk.router, played.translated, kind=talk.error_kind)),
        ("ICMP error about the translated reply", P.icmp_error(talk.router, played.untranslated, kind=talk.error_kind)),
    ):
        tm, how = deliver(core, wire, owner)
        if tm != owner:
            violations.append(f"{description}: {tm} ({how}), first was {owner}")
    return violations


def run(core: Distributor, tms: dict[str, ModelTM], talk: Conversation) -> list[str]:
    """Play the conversation; return the violations (packets that reached another TM, or none)."""
    verdict = core.from_tun(first_packet(talk))
    if verdict.action != ACTION_TM:
        return [f"request: {verdict.action} ({verdict.reason})"]
    return follow(core, verdict.tm, talk, translate(tms[verdict.tm], talk))


Factory = Callable[[Plan], Distributor]


def real_core(plan: Plan) -> Distributor:
    config = parse_node_config(plan.toml(), "property.toml")
    assert config.distributor is not None
    return Distributor(config.distributor)


def violations_for(factory: Factory, plan: Plan, talks: list[Conversation]) -> list[str]:
    core, tms = factory(plan), plan.model_tms()
    found: list[str] = []
    for talk in talks:
        found += [f"{talk}: {v}" for v in run(core, tms, talk)]
    return found


@st.composite
def scenarios(draw: st.DrawFn, hash_key: str) -> tuple[Plan, list[Conversation]]:
    plan = draw(plans(hash_key))
    return plan, draw(st.lists(conversations(plan), min_size=1, max_size=12))


PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("hash_key", ["addr", "addr+port"])
def test_both_directions_meet_at_the_same_tm(hash_key: str) -> None:
    @PROPERTY
    @given(scenarios(hash_key))
    def check(scenario: tuple[Plan, list[Conversation]]) -> None:
        assert violations_for(real_core, *scenario) == []

    check()


@pytest.mark.parametrize("hash_key", ["addr", "addr+port"])
def test_connections_survive_a_drain(hash_key: str) -> None:
    """Conversations start, then one TM is set to draining. Its rows move to their next TM, which has no
    state for the running connections and hands their packets back (second chance): every packet still
    reaches the TM that holds its state, and new connections avoid the draining TM."""

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenarios(hash_key), st.data())
    def check(scenario: tuple[Plan, list[Conversation]], data: st.DataObject) -> None:
        plan, talks = scenario
        core, tms = real_core(plan), plan.model_tms()
        drained = data.draw(st.sampled_from(sorted(tms)))
        started = []
        for talk in talks:
            verdict = core.from_tun(first_packet(talk))
            assert verdict.action == ACTION_TM, verdict.reason
            started.append((talk, verdict.tm, translate(tms[verdict.tm], talk)))
        core.set_tm_state(drained, "draining")
        violations = [v for talk, owner, played in started for v in follow(core, owner, talk, played)]
        assert violations == []
        # New connections avoid the draining TM — unless nobody else serves, and it keeps its rows.
        if any(w for i, w in enumerate(plan.weights) if f"tm-{i:02d}" != drained):
            for talk in talks:
                verdict = core.from_tun(first_packet(talk))
                if verdict.reason in ("hash-src", "hash-dst"):
                    assert verdict.tm != drained

    check()


# -- negative controls: the property has teeth ---------------------------------------------------------------
class FiveTupleCore(Distributor):
    """A distributor that hashes the symmetric 5-tuple (sorted endpoints), as nftables `symhash` does."""

    def decide(self, flow: Flow) -> Decision:
        ends = sorted([flow.src + (flow.sport or 0).to_bytes(2, "big"), flow.dst + (flow.dport or 0).to_bytes(2, "big")])
        value = xxhash.xxh64_intdigest(ends[0] + ends[1] + bytes([flow.proto]))
        first, second = self.table.choice(value & (self.table.rows - 1))
        return Decision(ACTION_TM, first, "5-tuple", "table", hash_value=value, first=first, second=second)


def five_tuple_core(plan: Plan) -> Distributor:
    config = parse_node_config(plan.toml(), "property.toml")
    assert config.distributor is not None
    return FiveTupleCore(config.distributor)


def server_hashing_core(plan: Plan) -> Distributor:
    """Overrides that make a node's packets to the outside hash the node (its own address) instead of
    the outside endpoint: replies to clients no longer meet the client's TM."""
    overrides = '\n[decision.overrides]\n"node>unknown" = "hash-src"\n"nat-able+node>unknown" = "hash-src"\n'
    config = parse_node_config(plan.toml() + overrides, "property.toml")
    assert config.distributor is not None
    return Distributor(config.distributor)


NEGATIVE = settings(max_examples=60, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
                    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("factory", [five_tuple_core, server_hashing_core], ids=["5-tuple hash", "replies hash the server"])
def test_property_fails_for_an_asymmetric_decision(factory: Factory) -> None:
    @NEGATIVE
    @given(scenarios("addr"))
    def check(scenario: tuple[Plan, list[Conversation]]) -> None:
        assert violations_for(factory, *scenario) == []

    with pytest.raises(AssertionError, match="first was"):
        check()


def test_five_tuple_breaks_most_nat_conversations_in_a_fixed_sample() -> None:
    """Counted over a fixed fleet: with 3 TMs a symmetric 5-tuple hash strands about 2/3 of the replies
    of DNATed conversations (the reply's tuple is another tuple), the real core none."""
    plan = Plan((1, 1, 1), "fixed-sample-seed-0001", False, {4: ("203.0.113.80",), 6: ("2001:db8:80::80",)},
                {4: ("203.0.113.10", "203.0.113.11"), 6: ("2001:db8:2::10", "2001:db8:2::11")}, True, "addr")
    talks = [Conversation("inbound", 4, TCP, f"198.51.100.{h}", 40000 + h, "203.0.113.80", 80, "203.0.113.10", 8080, "192.0.2.1", "too-big")
             for h in range(100, 160)]
    broken = {violation.split(": ")[0] for violation in violations_for(five_tuple_core, plan, talks)}
    assert violations_for(real_core, plan, talks) == []
    assert len(broken) > len(talks) // 3
