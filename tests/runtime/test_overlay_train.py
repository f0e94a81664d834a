"""A TM's UDP GRO train through the distributor's packet path (runtime/packet_path.py `from_overlay_train`)
gives exactly what each of its datagrams gives through `from_overlay` one by one: the same packets into
the TUN, in order, the same datagrams sent, the same keepalives and counters — on random trains that mix
runs of one TCP flow with other flows, a changed GRE key, keepalives, UDP, SYN/FIN and garbage.
Negative control: a packet path whose run check ignores the outer header (so a datagram with another GRE
key rides along) is caught."""

from __future__ import annotations

import random

import pytest

from overlay import compiled, gre
from overlay.config import parse_node_config
from overlay.distributor.core import Distributor
from overlay.runtime import batchio, packet_path
from overlay.runtime.offload import flow_run as reference_flow_run
from tests.distributor.configs import reference_text
from tests.runtime.test_offload import ACK, FIN, SYN, run_of, tcp_packet, udp_packet

TM1 = ("192.0.2.71", 4754)


class Recorder:
    """Stands in for the TUN and the underlay endpoint: records what the packet path does."""

    send_sockets: list[object] = []

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.handlers: tuple = ()     # the packet path's callbacks over this recorder

    def write(self, packet: bytes) -> bool:
        self.log.append(("tun", packet))
        return True

    def write_all(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.write(packet)

    def send(self, payload: bytes, peer: tuple[str, int], flow_hash: int = 0) -> bool:
        self.log.append(("udp", payload, peer, flow_hash))
        return True

    def send_all(self, payloads: list[bytes], peer: tuple[str, int], flow_hash: int = 0) -> None:
        for payload in payloads:
            self.send(payload, peer, flow_hash)

    def queue_all(self, queues: list[list[tuple[bytes, tuple[str, int]]]]) -> None:
        for items in queues:
            for payload, peer in items:
                self.log.append(("udp", payload, peer, "queued"))

    def keepalive(self, payload: bytes) -> None:
        self.log.append(("keepalive", payload))


def path(fleet_id: bool = False):  # type: ignore[no-untyped-def]
    text = reference_text()
    if fleet_id:
        text = text.replace("mtu = 1500", "mtu = 1500\ngre_key = 77")
    node = parse_node_config(text, "distributor.toml")
    assert node.distributor is not None
    core = Distributor(node.distributor)
    recorder = Recorder()
    recorder.handlers = packet_path.packet_handlers(core, recorder, recorder, recorder.keepalive)  # type: ignore[arg-type]
    _, from_overlay, _, from_overlay_train, _, _ = recorder.handlers
    return core, recorder, from_overlay, from_overlay_train


def random_train(rng: random.Random, key: int | None) -> list[bytes]:
    payloads: list[bytes] = []
    while len(payloads) < 64:
        choice = rng.random()
        version = rng.choice((4, 6))
        this_key = key if rng.random() < 0.9 else (key or 0) + 1
        if choice < 0.55:
            inner = run_of(version, rng.randrange(1, 30), 1400, last=rng.randrange(1, 1401), seq=rng.randrange(1 << 32),
                           ip_id=rng.randrange(1 << 16), push_last=rng.random() < 0.5, sport=rng.choice((1, 2)))
            payloads += [gre.encapsulate(packet, key=this_key) for packet in inner]
        elif choice < 0.65:
            payloads.append(gre.encapsulate(b"probe", key=key, protocol=gre.KEEPALIVE_PROTOCOL))
        elif choice < 0.75:
            payloads.append(gre.encapsulate(udp_packet(version, rng.randbytes(100)), key=this_key))
        elif choice < 0.85:
            payloads.append(gre.encapsulate(tcp_packet(version, b"x" * 10, flags=rng.choice((SYN, ACK | FIN))), key=this_key))
        else:
            payloads.append(rng.randbytes(rng.randrange(0, 60)))
    return payloads[:64]


@pytest.mark.parametrize("fleet_id", [False, True], ids=["no fleet id", "fleet id"])
def test_a_train_gives_what_its_datagrams_give_one_by_one(fleet_id: bool) -> None:
    rng = random.Random(fleet_id)
    key = gre.make_key(77, 0) if fleet_id else None
    train_core, train_log, _, from_overlay_train = path(fleet_id)
    plain_core, plain_log, from_overlay, _ = path(fleet_id)
    for _ in range(40):
        train = random_train(rng, key)
        from_overlay_train(train, TM1)
        for payload in train:
            from_overlay(payload, TM1)
    assert train_log.log == plain_log.log
    assert sum(entry[0] == "tun" for entry in train_log.log) > 1000
    assert train_core.counters() == plain_core.counters()
    assert dict(train_core.counters_reason) == dict(plain_core.counters_reason)
    assert dict(train_core.counters_drop) == dict(plain_core.counters_drop)


def test_flow_runs_are_found_alike_compiled_and_in_python() -> None:
    if not batchio.COMPILED:
        pytest.skip("overlay._fastio was not built")
    from overlay import _fastio  # type: ignore[attr-defined]

    rng = random.Random(3)
    for _ in range(60):
        train = random_train(rng, rng.choice((None, 5)))
        for start in range(len(train)):
            for offset in (0, 4, 8):
                assert _fastio.flow_run(train, start, offset) == reference_flow_run(train, start, offset)


def test_negative_control_a_run_check_blind_to_the_outer_header_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def blind(payloads: list[bytes], start: int, offset: int) -> int:
        # Each payload's own GRE header stripped: the keys are never compared.
        inner = [payload[gre.gre_header_length(1 if payload and payload[0] & 0x20 else None):] for payload in payloads]
        return reference_flow_run(inner, start, 0)

    monkeypatch.setattr(compiled, "flow_run", blind)
    _, train_log, _, from_overlay_train = path()
    _, plain_log, from_overlay, _ = path()
    inner = run_of(4, 10, 1000)
    # The run's later datagrams carry a key: another fleet's, which from_overlay drops.
    train = [gre.encapsulate(inner[0])] + [gre.encapsulate(each, key=99) for each in inner[1:]]
    from_overlay_train(train, TM1)
    for payload in train:
        from_overlay(payload, TM1)
    assert train_log.log != plain_log.log


# -- the compiled delivery of a receive batch (`from_overlay_batch`, `_fastio.deliver`) --------------------

PEERS = [TM1, ("192.0.2.72", 4754), ("192.0.2.71", 40001), ("192.0.2.99", 4754)]   # tm1, tm2, tm1 by address, nobody


def random_items(rng: random.Random, key: int | None) -> list[tuple[bytes, tuple[str, int]]]:
    items = []
    for _ in range(rng.randrange(1, 80)):
        version = rng.choice((4, 6))
        inner = rng.choice([tcp_packet(version, rng.randbytes(rng.randrange(0, 200))),
                            udp_packet(version, rng.randbytes(50)), rng.randbytes(rng.randrange(0, 30))])
        choice = rng.random()
        if choice < 0.7:
            payload = gre.encapsulate(inner, key=key)
        elif choice < 0.75:
            payload = gre.encapsulate(inner, key=(key or 0) + (1 << 16))          # another fleet
        elif choice < 0.8:
            payload = gre.encapsulate(inner, key=gre.make_key(77 if key else None, 5))   # a mark
        elif choice < 0.85:
            payload = gre.encapsulate(b"probe", key=key, protocol=gre.KEEPALIVE_PROTOCOL)
        elif choice < 0.9:
            payload = b"\x80\x00\x08\x00" + bytes(4) + inner                     # with a GRE checksum field
        else:
            payload = rng.randbytes(rng.randrange(0, 12))
        items.append((payload, rng.choice(PEERS)))
    return items


@pytest.mark.parametrize("fleet_id", [False, True], ids=["no fleet id", "fleet id"])
def test_a_receive_batch_gives_what_its_datagrams_give_one_by_one(fleet_id: bool) -> None:
    rng = random.Random(7 + fleet_id)
    key = gre.make_key(77, 0) if fleet_id else None
    batch_core, batch_log, batch_handlers = path_with_batch(fleet_id)
    plain_core, plain_log, from_overlay, _ = path(fleet_id)
    assert (batch_core.delivery_state() is not None) == batchio.COMPILED    # C serves where it is built
    for _ in range(60):
        items = random_items(rng, key)
        batch_handlers(items)
        for payload, peer in items:
            from_overlay(payload, peer)
    assert batch_log.log == plain_log.log
    assert sum(entry[0] == "tun" for entry in batch_log.log) > 1000
    assert batch_core.counters() == plain_core.counters()
    assert dict(batch_core.counters_reason) == dict(plain_core.counters_reason)
    assert dict(batch_core.counters_drop) == dict(plain_core.counters_drop)


def path_with_batch(fleet_id: bool = False):  # type: ignore[no-untyped-def]
    core, recorder, _, _ = path(fleet_id)
    return core, recorder, recorder.handlers[-1]


@pytest.mark.skipif(not batchio.COMPILED, reason="overlay._fastio was not built")
def test_negative_control_a_delivery_blind_to_the_fleet_id_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Distributor.delivery_state

    def blind(self: Distributor):  # type: ignore[no-untyped-def]
        state = original(self)
        return None if state is None else (state[0], state[1], 0)

    monkeypatch.setattr(Distributor, "delivery_state", blind)
    rng = random.Random(3)
    _, batch_log, batch_handlers = path_with_batch(True)
    _, plain_log, from_overlay, _ = path(True)
    items = [(gre.encapsulate(tcp_packet(4, rng.randbytes(20))), TM1) for _ in range(5)]   # no key: fleet 0
    batch_handlers(items)
    for payload, peer in items:
        from_overlay(payload, peer)
    assert batch_log.log != plain_log.log
