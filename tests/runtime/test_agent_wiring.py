"""The agents' wiring, in memory: real cores and real packets, fake transports and a hand-driven clock.

No root, no sockets: what an agent sends where is recorded, so each verdict's execution, the keepalive
echo, health transitions and the expiry timer are checked deterministically (as aioquic tests its
protocol adapters, and wireguard-go its devices with an in-memory TUN).
"""

from __future__ import annotations

import socket
from pathlib import Path

import dpkt
import pytest

from overlay import gre
from overlay.config import parse_node_config
from overlay.runtime.distributor_agent import DistributorAgent
from overlay.runtime.tm_agent import TMAgent
from tests.runtime.agents import DISTRIBUTOR_TOML, TM_TOML

DIST_PEER = ("192.0.2.2", 4754)
TM_PEER = ("192.0.2.3", 4754)


class FakeLoop:
    """time(), call_at(), call_soon() and create_task() of an event loop, with time moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, object]] = []
        self.soon: list[object] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback):
        handle = FakeHandle(self, when, callback)
        self.timers.append((when, handle))
        return handle

    def call_soon(self, callback, *args):
        self.soon.append(lambda: callback(*args))

    def create_task(self, coroutine):
        coroutine.close()
        raise AssertionError("no tasks expected (http health checks are off)")

    def run_soon(self) -> None:
        while self.soon:
            self.soon.pop(0)()

    def advance(self, seconds: float) -> None:
        """Move time forward in small steps, firing due timers in order (as the real loop would)."""
        end = self.now + seconds
        while True:
            due = sorted((when, handle) for when, handle in self.timers if not handle.cancelled and when <= end)
            if not due:
                break
            when, handle = due[0]
            self.timers.remove((when, handle))
            self.now = max(self.now, when)
            handle.callback()
            self.run_soon()
        self.now = end

    def armed(self) -> list[float]:
        return sorted(when for when, handle in self.timers if not handle.cancelled)


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback) -> None:
        self.loop, self.when, self.callback, self.cancelled = loop, when, callback, False

    def __lt__(self, other: FakeHandle) -> bool:
        return id(self) < id(other)

    def cancel(self) -> None:
        self.cancelled = True


class FakeTun:
    offload = False

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.counters: dict[str, int] = {}

    def start(self, loop, on_packet, on_lost=None, on_train=None, on_batch=None) -> None:
        self.deliver = on_packet
        self.deliver_train = on_train
        self.deliver_batch = on_batch

    def write(self, packet: bytes) -> bool:
        self.written.append(packet)
        return True

    def write_all(self, packets: list[bytes]) -> None:
        self.written.extend(packets)


class FakeUdp:
    port = 4754
    source_ports: list[int] = []
    send_sockets: list[object] = []

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int], int | None]] = []
        self.counters: dict[str, int] = {}

    def start(self, loop, on_datagram, on_train=None, on_batch=None) -> None:
        self.deliver = on_datagram
        self.deliver_train = on_train
        self.deliver_batch = on_batch

    def send(self, payload: bytes, peer: tuple[str, int], flow_hash: int = 0) -> bool:
        self.sent.append((payload, peer, flow_hash))
        return True

    def send_all(self, payloads: list[bytes], peer: tuple[str, int], flow_hash: int = 0) -> None:
        for payload in payloads:
            self.send(payload, peer, flow_hash)

    def queue_all(self, queues: list[list[tuple[bytes, tuple[str, int]]]]) -> None:
        for items in queues:
            for payload, peer in items:
                self.sent.append((payload, peer, "queued"))

    def reply(self, payload: bytes, peer: tuple[str, int]) -> bool:
        self.sent.append((payload, peer, None))
        return True


def tcp4(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=1000, win=65535)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_TCP, data=tcp, ttl=64)
    ip.len = len(ip)
    return bytes(ip)


def wire(agent, loop: FakeLoop) -> tuple[FakeTun, FakeUdp]:
    tun, udp = FakeTun(), FakeUdp()
    agent.loop, agent.tun, agent.udp = loop, tun, udp
    agent._open_role(loop)
    return tun, udp


@pytest.fixture
def distributor() -> tuple[DistributorAgent, FakeLoop, FakeTun, FakeUdp]:
    config = parse_node_config(DISTRIBUTOR_TOML.format(admin="", interval=0.2, http="false"), "d.toml", base=Path("."))
    agent, loop = DistributorAgent(config), FakeLoop()
    tun, udp = wire(agent, loop)
    return agent, loop, tun, udp


@pytest.fixture
def tm() -> tuple[TMAgent, FakeLoop, FakeTun, FakeUdp]:
    config = parse_node_config(TM_TOML, "t.toml", base=Path("."))
    agent, loop = TMAgent(config), FakeLoop()
    tun, udp = wire(agent, loop)
    return agent, loop, tun, udp


SYN_TO_VIP = tcp4("198.51.100.10", "203.0.113.80", 40000, 80, dpkt.tcp.TH_SYN)


def test_distributor_sends_a_vip_packet_to_the_tm_encapsulated(distributor) -> None:
    agent, loop, tun, udp = distributor
    tun.deliver(SYN_TO_VIP)
    [(payload, peer, flow_hash)] = [sent for sent in udp.sent if sent[0][2:4] != b"\x88\xb5"]
    assert peer == TM_PEER
    frame = gre.decapsulate(payload)
    assert frame is not None and frame.protocol == gre.PROTO_IPV4 and frame.inner == SYN_TO_VIP
    assert isinstance(flow_hash, int)
    assert tun.written == []


def test_distributor_forwards_what_the_tm_sends_into_the_tun(distributor) -> None:
    agent, loop, tun, udp = distributor
    translated = tcp4("198.51.100.10", "203.0.113.10", 40000, 80, dpkt.tcp.TH_SYN)
    udp.deliver(gre.encapsulate(translated), TM_PEER)
    assert tun.written == [translated]


# {description, UDP payload, peer}: never forwarded anywhere, and the agent keeps going
DISTRIBUTOR_GARBAGE = [
    {"description": "truncated GRE", "payload": b"\x00\x00", "peer": TM_PEER},
    {"description": "GRE from a stranger", "payload": gre.encapsulate(SYN_TO_VIP), "peer": ("192.0.2.9", 4754)},
    {"description": "keepalive from a stranger", "payload": gre.encapsulate(b"x" * 32, protocol=gre.KEEPALIVE_PROTOCOL),
     "peer": ("192.0.2.9", 4754)},
    {"description": "empty datagram", "payload": b"", "peer": TM_PEER},
]


@pytest.mark.parametrize("case", DISTRIBUTOR_GARBAGE, ids=[case["description"] for case in DISTRIBUTOR_GARBAGE])
def test_distributor_drops_garbage_from_the_underlay(distributor, case: dict) -> None:
    agent, loop, tun, udp = distributor
    sent_before = len(udp.sent)
    udp.deliver(case["payload"], case["peer"])
    assert tun.written == [] and len(udp.sent) == sent_before
    assert agent.status()["health"]["tms"]["tm1"]["replies"] == 0


def test_distributor_health_takes_a_silent_tm_out_and_an_answering_one_back(distributor) -> None:
    agent, loop, tun, udp = distributor
    loop.advance(0.1)
    probes = [sent for sent in udp.sent if sent[0][2:4] == b"\x88\xb5"]
    assert probes and all(peer == TM_PEER for _, peer, _ in probes)
    # Nobody answers: after `fall` lost probes the TM leaves the table, and traffic to the VIP is dropped.
    loop.advance(2.0)
    assert agent.status()["tms"]["tm1"]["up"] is False
    assert agent.healthy()[0] is False
    udp.sent.clear()
    tun.deliver(SYN_TO_VIP)
    assert [sent for sent in udp.sent if sent[0][2:4] != b"\x88\xb5"] == []
    # The TM echoes again (as a TM agent does: the datagram unchanged, from its well-known port).
    for _ in range(5):
        loop.advance(0.2)
        for payload, peer, _ in [sent for sent in udp.sent if sent[0][2:4] == b"\x88\xb5"]:
            udp.deliver(payload, peer)
        udp.sent.clear()
    assert agent.status()["tms"]["tm1"]["up"] is True
    tun.deliver(SYN_TO_VIP)
    assert [peer for _, peer, _ in udp.sent] == [TM_PEER]


def test_probes_rotate_over_the_source_ports(distributor) -> None:
    agent, loop, tun, udp = distributor
    loop.advance(1.0)
    hashes = [flow_hash for payload, _, flow_hash in udp.sent if payload[2:4] == b"\x88\xb5"]
    assert len(set(hashes)) == len(hashes) > 1


def test_tm_echoes_keepalives_unchanged_to_the_sender(tm) -> None:
    agent, loop, tun, udp = tm
    probe = gre.encapsulate(b"OVKA" + b"\x01" + b"\x00" * 27, protocol=gre.KEEPALIVE_PROTOCOL)
    udp.deliver(probe, ("192.0.2.2", 51000))
    assert udp.sent == [(probe, ("192.0.2.2", 51000), None)]


def test_tm_translates_and_answers_the_distributor_at_its_configured_port(tm) -> None:
    agent, loop, tun, udp = tm
    udp.deliver(gre.encapsulate(SYN_TO_VIP), ("192.0.2.2", 51000))  # from one of its source ports
    [(payload, peer, _)] = udp.sent
    assert peer == DIST_PEER
    inner = dpkt.ip.IP(gre.decapsulate(payload).inner)
    assert socket.inet_ntoa(inner.dst) == "203.0.113.10" and inner.data.dport == 80
    assert agent.status()["peers"] == {"192.0.2.2:4754": {"packets": 1}}


def test_tm_arms_one_expiry_timer_for_a_new_connection(tm) -> None:
    agent, loop, tun, udp = tm
    assert loop.armed() == []  # no connections, no timer
    udp.deliver(gre.encapsulate(SYN_TO_VIP), DIST_PEER)
    loop.run_soon()
    [deadline] = loop.armed()
    assert deadline == agent.core.next_deadline()
    loop.advance(deadline - loop.now + 0.001)
    assert agent.core.counters()["conntrack.expired"] == 1
    assert loop.armed() == []


def test_tm_delivers_management_traffic_into_its_tun_and_returns_the_answers(tm) -> None:
    agent, loop, tun, udp = tm
    to_management = tcp4("198.51.100.10", "203.0.113.201", 40001, 8080, dpkt.tcp.TH_SYN)
    udp.deliver(gre.encapsulate(to_management), DIST_PEER)
    assert tun.written == [to_management]
    answer = tcp4("203.0.113.201", "198.51.100.10", 8080, 40001, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)
    tun.deliver(answer)
    [(payload, peer, _)] = udp.sent
    assert peer == DIST_PEER and gre.decapsulate(payload).inner == answer


# {description, UDP payload, peer, drop reason}
TM_GARBAGE = [
    {"description": "stranger", "payload": gre.encapsulate(SYN_TO_VIP), "peer": ("192.0.2.9", 4754),
     "reason": "agent:unknown-peer"},
    {"description": "truncated GRE", "payload": b"\x00", "peer": DIST_PEER, "reason": "agent:malformed:gre"},
    {"description": "empty datagram", "payload": b"", "peer": DIST_PEER, "reason": "agent:malformed:gre"},
    {"description": "GRE with routing bit", "payload": b"\x40\x00\x08\x00" + SYN_TO_VIP, "peer": DIST_PEER,
     "reason": "agent:malformed:gre"},
    {"description": "not IP inside", "payload": b"\x00\x00\x65\x58" + b"\x00" * 14, "peer": DIST_PEER,
     "reason": "agent:unsupported-gre-protocol"},
]


@pytest.mark.parametrize("case", TM_GARBAGE, ids=[case["description"] for case in TM_GARBAGE])
def test_tm_counts_and_drops_garbage(tm, case: dict) -> None:
    agent, loop, tun, udp = tm
    udp.deliver(case["payload"], case["peer"])
    assert udp.sent == [] and tun.written == []
    assert agent.status()["drops"][case["reason"]] == 1
