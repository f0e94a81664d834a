"""The TM's established-flow fast path in C (`_fastio.translate`, through `TMNode.from_overlay_batch`)
against the full path, datagram by datagram: tests/tm/test_fast_path.py's twins and mixes (DNAT/SNAT,
v4/v6, TCP/UDP/echo, handshakes, FIN/RST, fragments, ICMP errors, options, truncations, checksum corners,
marks, other fleets, reloads, replication and strict mode, firewall mode, a small table, timeouts), fed as
receive batches to the fast node and one by one to the full one: the same datagrams out, in order, and the
same state. Negative control: a state that pretends no packet is held (strict mode) is caught."""

from __future__ import annotations

import os
import random

import pytest

from overlay import compiled
from overlay.tm.node import SEND, SEND_EACH, TMNode
from overlay.uplink import NodeOutput

from .test_fast_path import VARIANTS, Twins, donate, inner_packet, wrap, FLOWS

pytestmark = pytest.mark.skipif(compiled.translate is None, reason="overlay._fastio was not built")


def flattened(outputs: list[NodeOutput]) -> list[tuple[object, ...]]:
    result: list[tuple[object, ...]] = []
    for action, data, peer in outputs:
        if action == SEND_EACH:
            result += [(SEND, datagram, destination) for datagram, destination in data]  # type: ignore[misc,union-attr]
        else:
            result.append((action, data, peer))
    return result


def run_batches(twins: Twins, seed: int, batches: int) -> int:
    """Random receive batches through both nodes; how many datagrams C served."""
    rng = random.Random(seed)
    served = 0
    for step in range(batches):
        roll = rng.random()
        twins.now += rng.choice([1.5, 2.5, 4.0, 7.0]) if roll < 0.02 else rng.choice([0.0, 0.001, 0.01, 0.05])
        if roll < 0.1:
            twins.call(rng.choice(["expire", "replicate", "ack", "overdue", "reload"]))
        elif roll < 0.12:
            donate(twins, rng.choice(FLOWS))
        items = []
        for _ in range(rng.randrange(1, 40)):
            items += [wrap(twins, packet, rng) for packet in inner_packet(twins, rng)]
        fast = twins.fast.from_overlay_batch(items, twins.now)
        full = [twins.full.from_overlay(payload, peer, twins.now) for payload, peer in items]
        assert flattened(fast) == flattened(full)
        served += sum(len(data) for action, data, _ in fast if action == SEND_EACH)  # type: ignore[arg-type]
        if step % 10 == 0:
            twins.compare()
    twins.compare()
    return served


# CI runs more seeds and batches than the fast suite.
SEEDS, BATCHES = ([1, 2, 3, 4], 80) if os.environ.get("CI") == "true" else ([1], 40)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_compiled_fast_path_gives_what_the_full_path_gives(variant: str, seed: int) -> None:
    served = run_batches(Twins(variant), seed, BATCHES)
    assert served > 20     # the compiled path really served (strict mode holds many)


def test_negative_control_a_state_blind_to_held_packets_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = TMNode.compiled_state

    def blind(self: TMNode):  # type: ignore[no-untyped-def]
        state = original(self)
        return None if state is None else (*state[:8], {}, *state[9:])

    monkeypatch.setattr(TMNode, "compiled_state", blind)
    with pytest.raises(AssertionError):
        for seed in range(6):
            run_batches(Twins("strict"), seed, 60)
