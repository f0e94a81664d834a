"""The distributor's fast path in C (`_fastio.distribute`, driven by runtime/packet_path.py's
`from_tun_batch`) against the Python path packet by packet (`Distributor.from_tun` per packet through the
same packet path): on random batches of the fast-path tests' mixes — every role, TCP, UDP, echo, packets
near and over the MTU, malformed ones — in every fleet state of tests/distributor/test_fast_path.py
(addr+port hashing, a fleet id, a small MTU, a TM down, a TM draining so rows carry second-chance marks),
each socket gets the same datagrams in the same order, the TUN the same packets, and every counter ends
the same. Negative controls: a state with another seed, and one without the marks, are caught."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import compiled
from overlay.distributor.core import Distributor
from overlay.runtime import packet_path
from tests.distributor import packets as P
from tests.distributor.test_fast_path import ADDRESSES_V4, ADDRESSES_V6, fleet, packet_mix

pytestmark = pytest.mark.skipif(compiled.distribute is None, reason="overlay._fastio was not built")

SOCKETS = 8


class Recorder:
    """The TUN and the underlay endpoint: what each send socket would send, in order, and the TUN writes."""

    send_sockets = [object() for _ in range(SOCKETS)]

    def __init__(self) -> None:
        self.sockets: dict[int, list[tuple[bytes, tuple[str, int]]]] = {}
        self.tun: list[bytes] = []
        self.served = 0

    def write(self, packet: bytes) -> bool:
        self.tun.append(packet)
        return True

    def write_all(self, packets: list[bytes]) -> None:
        self.tun.extend(packets)

    def send(self, payload: bytes, peer: tuple[str, int], flow_hash: int = 0) -> bool:
        index = flow_hash % SOCKETS if flow_hash >= 0 else -1     # negative: the well-known port
        self.sockets.setdefault(index, []).append((payload, peer))
        return True

    def send_all(self, payloads: list[bytes], peer: tuple[str, int], flow_hash: int = 0) -> None:
        for payload in payloads:
            self.send(payload, peer, flow_hash)

    def queue_all(self, queues: list[list[tuple[bytes, tuple[str, int]]]]) -> None:
        for index, items in enumerate(queues):
            if items:
                self.sockets.setdefault(index, []).extend(items)
                self.served += len(items)


def handlers(core: Distributor) -> tuple[Recorder, object, object]:
    recorder = Recorder()
    from_tun, _, _, _, from_tun_batch, _ = packet_path.packet_handlers(core, recorder, recorder, lambda _: None)  # type: ignore[arg-type]
    return recorder, from_tun, from_tun_batch


def counters(core: Distributor) -> tuple:
    return (dict(core.counters_cell), dict(core.counters_reason), dict(core.counters_tm), dict(core.counters_drop),
            core.counters())


def compare(variant: str, batches: list[list[bytes]]) -> int:
    """Both paths over the batches (twice: the second time every role is cached); the packets served in C."""
    compiled_core, python_core = fleet(variant)[0], fleet(variant)[0]
    batch_side, batch_from_tun, from_tun_batch = handlers(compiled_core)
    plain_side, from_tun, _ = handlers(python_core)
    for _ in range(2):
        for batch in batches:
            from_tun_batch(batch)   # type: ignore[operator]
            for packet in batch:
                from_tun(packet)    # type: ignore[operator]
    assert batch_side.sockets == plain_side.sockets
    assert batch_side.tun == plain_side.tun
    assert counters(compiled_core) == counters(python_core)
    return batch_side.served


VARIANTS = ["reference", "addr+port", "fleet id", "small mtu", "tm down", "draining"]


@st.composite
def packet_or_mangled(draw: st.DrawFn) -> bytes:
    """A packet of the mixes, or one cut short or with a header byte changed: the C parse must decline
    (or take) exactly what the Python one declines (or takes)."""
    packet = draw(packet_mix())
    kind = draw(st.sampled_from(["whole", "whole", "whole", "cut", "byte"]))
    if kind == "cut":
        return packet[:draw(st.integers(0, len(packet)))]
    if kind == "byte" and packet:
        at = draw(st.integers(0, min(len(packet), 60) - 1))
        return packet[:at] + bytes([draw(st.integers(0, 255))]) + packet[at + 1:]
    return packet


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=40 if os.environ.get("CI") == "true" else 8, deadline=None, derandomize=True)
@given(batches=st.lists(st.lists(packet_or_mangled(), min_size=1, max_size=70), min_size=1, max_size=4))
def test_the_compiled_fast_path_gives_what_the_python_path_gives(variant: str, batches: list[list[bytes]]) -> None:
    compare(variant, batches)


def busy_batches(seed: int) -> list[list[bytes]]:
    """Client → VIP and server → client TCP and UDP, many flows (the fast path's bread), a few of the rest."""
    rng = random.Random(seed)
    batches = []
    for _ in range(6):
        batch = []
        for _ in range(64):
            v6 = rng.random() < 0.3
            addresses = ADDRESSES_V6 if v6 else ADDRESSES_V4
            src, dst = rng.choice(addresses), rng.choice(addresses)
            if rng.random() < 0.8:
                src, dst = ("2001:db8:1::10", "2001:db8:80::80") if v6 else ("198.51.100.10", "203.0.113.80")
                if rng.random() < 0.5:
                    src, dst = ("2001:db8:2::10", "2001:db8:1::10") if v6 else ("203.0.113.10", "198.51.100.10")
            port = rng.randrange(1, 65536)
            if rng.random() < 0.5:
                batch.append(P.tcp(src, port, dst, 80, P.TCP_ACK, bytes(rng.randrange(0, 1400))))
            else:
                batch.append(P.udp(src, port, dst, 53, bytes(rng.randrange(0, 1500))))
        batches.append(batch)
    return batches


@pytest.mark.parametrize("variant", VARIANTS)
def test_most_of_a_busy_batch_is_served_in_c(variant: str) -> None:
    assert compare(variant, busy_batches(len(variant))) > 300


@pytest.mark.parametrize("broken", ["another seed", "no marks"])
def test_negative_control_a_wrong_state_is_caught(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    original = Distributor.compiled_state

    def wrong(self: Distributor, sockets: int):  # type: ignore[no-untyped-def]
        state = original(self, sockets)
        if state is None:
            return None
        state = list(state)
        if broken == "another seed":
            state[5] ^= 1
        else:
            state[8] = None
        return tuple(state)

    monkeypatch.setattr(Distributor, "compiled_state", wrong)
    with pytest.raises(AssertionError):
        compare("draining", busy_batches(7))
