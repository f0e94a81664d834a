"""Admin states and the second chance: a draining TM's rows go to their next TM, marked in the GRE key;
that TM hands back what it has no state for, and the distributor delivers it to the draining TM."""

from __future__ import annotations

import struct

import pytest

from overlay import gre
from overlay.configlib import ConfigError
from overlay.distributor.core import Distributor
from tests.distributor import packets as P
from tests.distributor.configs import CELLS, distributor

VIP = "203.0.113.80"
CLIENTS = [P.tcp(f"198.51.100.{h}", 40000, VIP, 80, flags=P.TCP_ACK) for h in range(100, 200)]
UNDERLAY = {"tm1": ("192.0.2.71", 4754), "tm2": ("192.0.2.72", 4754), "tm3": ("192.0.2.73", 4754)}
TM1_ID = gre.default_tm_id("tm1")  # no explicit id in the config: derived from the name


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
            assert (new.tm, key_of(new)) == (seconds[packet], TM1_ID)
        else:
            assert (new.tm, key_of(new)) == (old.tm, None)  # untouched rows carry no key at all


def test_second_chance_goes_to_the_draining_tm_marked_last_chance(core: Distributor) -> None:
    core.set_tm_state("tm1", "draining")
    packet = next(p for p in CLIENTS if key_of(core.from_tun(p)) == TM1_ID)
    verdict = core.from_tun(packet)
    back = core.from_overlay(second_chance(packet, key_of(verdict)), UNDERLAY[verdict.tm])
    assert (back.action, back.tm, back.reason, back.dest) == ("tm", "tm1", "second-chance", UNDERLAY["tm1"])
    frame = gre.decapsulate(back.packet)
    assert frame is not None and (frame.protocol, frame.key, frame.inner) == (gre.PROTO_IPV4, gre.LAST_CHANCE, packet)
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
        pytest.param(second_chance(CLIENTS[0], TM1_ID ^ 1), UNDERLAY["tm2"], "second-chance-bad-key", id="id of no TM"),
        pytest.param(second_chance(CLIENTS[0], gre.LAST_CHANCE), UNDERLAY["tm2"], "second-chance-bad-key", id="last-chance mark"),
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
    back = core.from_overlay(second_chance(CLIENTS[0], TM1_ID), UNDERLAY["tm2"])
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
    assert {key_of(core.from_tun(p)) for p in CLIENTS} == {7 << 16, (7 << 16) | TM1_ID}


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


NEWCOMER = '''
[[tm]]
name = "tm0"
underlay = "192.0.2.70:4754"
management = ["203.0.113.200"]
'''


def test_a_reload_that_adds_a_tm_keeps_marks_in_flight_on_their_tm() -> None:
    """Marks name TMs by stable id: "tm0" sorts first, which re-targeted every in-flight mark when marks
    were indexes into the sorted names."""
    core = distributor(CELLS)
    core.set_tm_state("tm1", "draining")
    packet = next(p for p in CLIENTS if key_of(core.from_tun(p)) == TM1_ID)
    verdict = core.from_tun(packet)
    core.reconfigure(distributor(CELLS + NEWCOMER).config)
    core.set_tm_state("tm1", "draining")
    back = core.from_overlay(second_chance(packet, key_of(verdict)), UNDERLAY["tm2"] if verdict.tm == "tm2" else UNDERLAY["tm3"])
    assert (back.action, back.tm, back.reason) == ("tm", "tm1", "second-chance")


def test_an_explicit_id_is_what_marks_carry() -> None:
    core = distributor(CELLS.replace('name = "tm1"\n', 'name = "tm1"\nid = 4242\n'))
    core.set_tm_state("tm1", "draining")
    assert {key_of(core.from_tun(p)) for p in CLIENTS} == {None, 4242}


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param('name = "tm2"\n', 'name = "tm2"\nid = 7\n', id="explicit ids collide"),
])
def test_colliding_ids_are_refused(edit: str, message: str) -> None:
    text = CELLS.replace('name = "tm1"\n', 'name = "tm1"\nid = 7\n').replace(edit, message)
    with pytest.raises(ConfigError, match=r"tm\[1\]\.id.*TM id 7 is already TM 'tm1'"):
        distributor(text)


def test_a_mark_with_another_fleets_id_is_refused() -> None:
    core = distributor(CELLS.replace('mtu = 1500', 'mtu = 1500\ngre_key = 7'))
    core.set_tm_state("tm1", "draining")
    foreign = second_chance(CLIENTS[0], (8 << 16) | TM1_ID)
    assert core.from_overlay(foreign, UNDERLAY["tm2"]).reason == "wrong-fleet-id"
    ours = second_chance(CLIENTS[0], (7 << 16) | TM1_ID)
    back = core.from_overlay(ours, UNDERLAY["tm2"])
    assert (back.tm, key_of(back)) == ("tm1", (7 << 16) | gre.LAST_CHANCE)
