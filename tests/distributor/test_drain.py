"""Admin states and the second chance: a draining TM's rows go to their next TM, marked in the GRE key;
that TM hands back what it has no state for, and the distributor delivers it to the draining TM."""

from __future__ import annotations

import struct

import pytest

from overlay import gre
from overlay.distributor.core import Distributor
from tests.distributor import packets as P
from tests.distributor.configs import CELLS, distributor

VIP = "203.0.113.80"
CLIENTS = [P.tcp(f"198.51.100.{h}", 40000, VIP, 80, flags=P.TCP_ACK) for h in range(100, 200)]
UNDERLAY = {"tm1": ("192.0.2.71", 4754), "tm2": ("192.0.2.72", 4754), "tm3": ("192.0.2.73", 4754)}
TM1_INDEX = 1  # tm1 is first of the sorted names: second-chance key 1


def key_of(verdict) -> int | None:  # type: ignore[no-untyped-def]
    frame = gre.decapsulate(verdict.packet)
    assert frame is not None
    return frame.key


def second_chance(inner: bytes, key: int | None) -> bytes:
    """What a TM without state sends back: the packet under the second-chance protocol, key echoed."""
    return gre.encapsulate(inner, key=key, protocol=gre.SECOND_CHANCE_PROTOCOL)


@pytest.fixture()
def core() -> Distributor:
    return distributor(CELLS)


def test_draining_moves_rows_to_the_second_choice_marked_for_a_second_chance(core: Distributor) -> None:
    before = {packet: core.from_tun(packet) for packet in CLIENTS}
    seconds = {packet: core.table.choice(v.flow_hash & (core.table.rows - 1))[1] for packet, v in before.items()}
    assert any(v.tm == "tm1" for v in before.values())
    core.set_tm_state("tm1", "draining")
    for packet, old in before.items():
        new = core.from_tun(packet)
        if old.tm == "tm1":
            assert (new.tm, key_of(new)) == (seconds[packet], TM1_INDEX)
        else:
            assert (new.tm, key_of(new)) == (old.tm, None)  # untouched rows carry no key at all


def test_second_chance_goes_to_the_draining_tm_unmarked(core: Distributor) -> None:
    core.set_tm_state("tm1", "draining")
    packet = next(p for p in CLIENTS if key_of(core.from_tun(p)) == TM1_INDEX)
    verdict = core.from_tun(packet)
    back = core.from_overlay(second_chance(packet, key_of(verdict)), UNDERLAY[verdict.tm])
    assert (back.action, back.tm, back.reason, back.dest) == ("tm", "tm1", "second-chance", UNDERLAY["tm1"])
    frame = gre.decapsulate(back.packet)
    assert frame is not None and (frame.protocol, frame.key, frame.inner) == (gre.PROTO_IPV4, None, packet)
    assert core.counters()["reason.second-chance"] == 1


def test_draining_tm_keeps_its_owned_and_management_traffic(core: Distributor) -> None:
    core.set_tm_state("tm1", "draining")
    reply = core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.101", 40000, flags=P.TCP_ACK))
    assert (reply.tm, reply.reason) == ("tm1", "owner")
    assert core.from_tun(P.tcp("198.51.100.9", 1, "203.0.113.201", 8080)).tm == "tm1"
    assert "tm1" not in {core.from_tun(p).tm for p in CLIENTS}


@pytest.mark.parametrize(
    ("payload", "peer", "reason"),
    [
        pytest.param(second_chance(CLIENTS[0], 1), ("192.0.2.99", 4754), "second-chance-from-unknown-peer", id="from an unknown peer"),
        pytest.param(second_chance(CLIENTS[0], None), UNDERLAY["tm2"], "second-chance-bad-key", id="no key"),
        pytest.param(second_chance(CLIENTS[0], 0), UNDERLAY["tm2"], "second-chance-bad-key", id="key names no TM (0)"),
        pytest.param(second_chance(CLIENTS[0], 4), UNDERLAY["tm2"], "second-chance-bad-key", id="key beyond the fleet"),
    ],
)
def test_second_chance_refusals(core: Distributor, payload: bytes, peer: tuple[str, int], reason: str) -> None:
    core.set_tm_state("tm1", "draining")
    verdict = core.from_overlay(payload, peer)
    assert (verdict.action, verdict.reason) == ("drop", reason)


def test_disabled_tm_gets_nothing(core: Distributor) -> None:
    core.set_tm_state("tm1", "disabled")
    verdicts = [core.from_tun(p) for p in CLIENTS]
    assert "tm1" not in {v.tm for v in verdicts} and {key_of(v) for v in verdicts} == {None}
    back = core.from_overlay(second_chance(CLIENTS[0], TM1_INDEX), UNDERLAY["tm2"])
    assert (back.action, back.reason) == ("drop", "second-chance-target-gone")
    assert core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.101", 40000)).reason == "owner-down"


def test_enabled_again_restores_every_row(core: Distributor) -> None:
    before = [core.from_tun(p).tm for p in CLIENTS]
    core.set_tm_state("tm1", "draining")
    core.set_tm_state("tm1", "enabled")
    assert [core.from_tun(p).tm for p in CLIENTS] == before


def test_fleet_id_rides_in_the_high_bits_of_the_key() -> None:
    core = distributor(CELLS.replace('mtu = 1500', 'mtu = 1500\ngre_key = 7'))
    assert {key_of(core.from_tun(p)) for p in CLIENTS} == {7 << 16}
    core.set_tm_state("tm1", "draining")
    assert {key_of(core.from_tun(p)) for p in CLIENTS} == {7 << 16, (7 << 16) | TM1_INDEX}


def test_unknown_state_is_refused(core: Distributor) -> None:
    with pytest.raises(ValueError):
        core.set_tm_state("tm1", "paused")
    with pytest.raises(KeyError):
        core.set_tm_state("tm9", "draining")


def test_keepalive_payload_is_passed_unchanged(core: Distributor) -> None:
    echo = struct.pack("!4sB3xQQQ", b"OVKA", 1, 5, 6, 7)
    verdict = core.from_overlay(gre.encapsulate(echo, protocol=gre.KEEPALIVE_PROTOCOL), UNDERLAY["tm3"])
    assert (verdict.action, verdict.tm, verdict.packet) == ("local", "tm3", echo)


def test_draining_the_last_serving_tm_keeps_its_connections(core: Distributor) -> None:
    """With every other TM down (or a fleet of one), a draining TM's rows have no next TM to go to, so it
    keeps them: draining promises that established connections finish (not `no-tm` drops)."""
    before = [core.from_tun(p).tm for p in CLIENTS]
    core.set_tm_up("tm2", False)
    core.set_tm_up("tm3", False)
    core.set_tm_state("tm1", "draining")
    for packet, old in zip(CLIENTS, before):
        if old == "tm1":
            assert core.from_tun(packet).tm == "tm1"
