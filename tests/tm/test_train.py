"""A UDP GRO train through the TM node (`TMNode.from_overlay_train`: runs of one TCP connection found by
`flow_run`, the first through the fast path, the rest translated together by `TrafficManager.forward_run`,
in C where `_fastio` is built) against its datagrams one by one through the full path: the same datagrams
out, in order, to the same distributor, and the same state (tests/tm/test_fast_path.py's comparison:
counters, peers, the connection table with `last_seen` and expiry order, replication marks, ...).

The trains: established DNAT and SNAT connections in both directions, IPv4 and IPv6, runs of data
segments whose checksums sit at every corner of the connection's deltas (a run is translated as each of
its packets would be — a wrong checksum stays wrong the same way), broken by other connections, FIN, RST,
SYN, UDP, GRE marks and other fleets, unknown connections and garbage. Without the C extension (or with
OVERLAY_PURE_PYTHON=1) `forward_run` takes each packet through `forward_established`: the same comparison
covers that. A negative control: a `nat_run` that forgets the IPv4 header checksum is caught.
"""

from __future__ import annotations

import random

import pytest

from overlay import compiled, gre
from overlay.tm.node import SEND, SEND_ALL, SEND_EACH
from overlay.uplink import NodeOutput

from .packets import ACK, FIN, PSH, RST, SYN, tcp, udp
from .test_fast_path import DISTRIBUTOR, FLOWS, Twins, address_text, flow_key, protocol_number

# DNAT to the VIP (v4, v6) and SNAT out (v4, v6): not the management client, not the direct flow (no rule in
# NAT mode).
TCP_FLOWS = [0, 1, 2, 4, 5]


def flattened(outputs: list[NodeOutput]) -> list[tuple[object, ...]]:
    """Each datagram sent as its own ("send", datagram, to); other outputs as they are."""
    result: list[tuple[object, ...]] = []
    for action, data, peer in outputs:
        if action == SEND_ALL:
            result += [(SEND, datagram, peer) for datagram in data]  # type: ignore[union-attr]
        elif action == SEND_EACH:
            result += [(SEND, datagram, to) for datagram, to in data]  # type: ignore[misc,union-attr]
        else:
            result.append((action, data, peer))
    return result


def establish(twins: Twins, flow: int) -> tuple[tuple[str, int, str, int], tuple[str, int, str, int]]:
    """Open FLOWS[flow] to established on both nodes; its (original, reply) endpoints."""
    _, src, sport, dst, dport = FLOWS[flow]
    twins.datagram(gre.encapsulate(tcp(src, sport, dst, dport, SYN), key=twins.key(0)), DISTRIBUTOR)
    key = twins.reply_key(FLOWS[flow])
    assert key is not None
    length = len(key) // 2 - 2
    reply = (address_text(key[:length]), int.from_bytes(key[-4:-2], "big"), address_text(key[length:2 * length]),
             int.from_bytes(key[-2:], "big"))
    twins.datagram(gre.encapsulate(tcp(reply[0], reply[1], reply[2], reply[3], SYN | ACK), key=twins.key(0)), DISTRIBUTOR)
    twins.datagram(gre.encapsulate(tcp(src, sport, dst, dport, ACK), key=twins.key(0)), DISTRIBUTOR)
    assert twins.state_of(FLOWS[flow]) is not None
    return (src, sport, dst, dport), reply


def corner_checksums(twins: Twins, flow: int) -> list[int]:
    conn = twins.full.core._table.tables[protocol_number(FLOWS[flow])][flow_key(FLOWS[flow])].conn
    corners = {0, 1, 0xFFFE, 0xFFFF}
    for half in (conn.original, conn.reply):
        for delta in (half.l4_delta, half.ip_delta):
            corners |= {delta, (delta + 1) & 0xFFFF, (delta - 1) & 0xFFFF, 0xFFFF - delta}
    return sorted(corners)


def segment(endpoints: tuple[str, int, str, int], seq: int, size: int, rng: random.Random, corners: list[int],
            flags: int = ACK) -> bytes:
    packet = bytearray(tcp(*endpoints, flags, bytes([seq % 251]) * size, seq=seq))
    if rng.random() < 0.3:   # a checksum at a corner of the deltas (IPv4: the header's too)
        v4 = packet[0] >> 4 == 4
        where = rng.choice([20 + 16, 10] if v4 else [40 + 16])
        packet[where:where + 2] = rng.choice(corners).to_bytes(2, "big")
    return bytes(packet)


def random_train(twins: Twins, rng: random.Random, connections: list[tuple], corners: list[int]) -> list[bytes]:
    if rng.random() < 0.5:
        # One connection's run, as a distributor sends a super-packet's segments: the run path.
        endpoints = rng.choice(connections)[rng.randrange(2)]
        size, seq = rng.choice((100, 1000, 1400)), rng.randrange(1 << 31)
        return [gre.encapsulate(segment(endpoints, seq + index * size, size, rng, corners), key=twins.key(0))
                for index in range(rng.randrange(2, 64))]
    # A mixed train (a GSO send groups what is equal in size, whatever the flow): broken runs.
    train: list[bytes] = []
    while len(train) < 64:
        choice = rng.random()
        endpoints = rng.choice(connections)[rng.randrange(2)]
        if choice < 0.6:
            size = rng.choice((100, 1000, 1400))
            seq = rng.randrange(1 << 31)
            for index in range(rng.randrange(1, 40)):
                flags = ACK | (PSH if rng.random() < 0.1 else 0)
                train.append(gre.encapsulate(segment(endpoints, seq + index * size, size, rng, corners, flags),
                                             key=twins.key(0)))
        elif choice < 0.7:
            train.append(gre.encapsulate(segment(endpoints, 5, 10, rng, corners, rng.choice((FIN | ACK, RST, SYN))),
                                         key=twins.key(0)))
        elif choice < 0.8:
            train.append(gre.encapsulate(segment(endpoints, 5, 100, rng, corners), key=twins.key(rng.choice((1, 2)))))
        elif choice < 0.9:
            train.append(gre.encapsulate(udp(endpoints[0], endpoints[1], endpoints[2], endpoints[3]), key=twins.key(0)))
        else:
            train.append(rng.randbytes(rng.randrange(0, 80)))
    return train[:64]


def run_trains(twins: Twins, seed: int) -> int:
    rng = random.Random(seed)
    connections = [establish(twins, flow) for flow in TCP_FLOWS]
    corners = sorted({corner for flow in TCP_FLOWS for corner in corner_checksums(twins, flow)})
    batched = 0
    for _ in range(30):
        twins.now += 0.01
        train = random_train(twins, rng, connections, corners)
        fast = twins.fast.from_overlay_train(train, DISTRIBUTOR, twins.now)
        full = [twins.full.from_overlay(payload, DISTRIBUTOR, twins.now) for payload in train]
        assert flattened(fast) == flattened(full)
        batched += sum(len(data) - 1 for action, data, _ in fast if action == SEND_ALL)  # type: ignore[arg-type]
    twins.compare()
    return batched


@pytest.mark.parametrize("variant", ["nat", "fleet id", "replication"])
def test_a_train_gives_what_its_datagrams_give_through_the_full_path(variant: str) -> None:
    batched = run_trains(Twins(variant), seed=len(variant))
    assert batched > 50      # runs were translated together (FIN and RST in the mixed trains close some)


def test_without_the_extension_the_run_goes_packet_by_packet_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "nat_run", None)
    monkeypatch.setattr(compiled, "translate", None)
    assert run_trains(Twins("nat"), seed=99) > 50


@pytest.mark.skipif(compiled.nat_run is None, reason="overlay._fastio was not built")
def test_negative_control_a_run_translation_that_forgets_the_ip_checksum_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = compiled.nat_run
    assert original is not None

    def forgetful(payloads, start, count, at, prefix, addresses, ports, ip_delta, l4_delta):  # type: ignore[no-untyped-def]
        return original(payloads, start, count, at, prefix, addresses, ports, 0, l4_delta)

    monkeypatch.setattr(compiled, "nat_run", forgetful)
    with pytest.raises(AssertionError):
        run_trains(Twins("nat"), seed=5)
