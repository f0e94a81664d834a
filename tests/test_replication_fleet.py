"""Connections survive a TM crash, in memory: the real distributor core and three TM node cores with
`[tm.replication]` on; each TM's connection state goes, through the distributor, to the row's second
choice, which commits it when the crashed TM's packets reach it (overlay/tm/replication.py).

Negative control: the same crash without replication breaks the connections and the heirs count them
as invalid."""

from __future__ import annotations

import dataclasses

import pytest

from overlay.tm.core import TrafficManager
from overlay.tm.node import SEND, TMNode
from tests.test_fleet_in_memory import CLIENTS, Fleet, exchange, open_connection

REPLICATION = "\n[tm.replication]\nenabled = true\n"


def replicate(fleet: Fleet) -> int:
    """Run every TM's replication once, as the agents do on their timers; entries delivered."""
    delivered = 0
    by_underlay = {underlay: name for name, underlay in fleet.underlay.items()}
    for name, node in fleet.nodes.items():
        for datagram, _ in node.replication(fleet.now):
            verdict = fleet.distributor.from_overlay(datagram, fleet.underlay[name])
            assert verdict.action == "fanout", verdict.reason
            for forwarded, destination in verdict.fanout or []:
                target = fleet.nodes[by_underlay[destination]]
                assert target.from_overlay(forwarded, fleet.dist_underlay, fleet.now)[0] != SEND
                delivered += 1
    return delivered


def crash(replicated: bool) -> dict[str, int]:
    fleet = Fleet((lambda text: text + REPLICATION) if replicated else (lambda text: text))
    connections = [(client, *open_connection(fleet, client)) for client in CLIENTS]
    if replicated:
        assert replicate(fleet) > 0
    victims = [(client, server_end) for client, tm, server_end in connections if tm == "tm1"]
    fleet.distributor.set_tm_up("tm1", False)         # SIGKILL: the health checker takes it out
    survived = 0
    for client, server_end in victims:
        forward_tms, back_tms, delivered = exchange(fleet, client, server_end)
        survived += delivered and forward_tms == back_tms and "tm1" not in forward_tms
    committed = sum(node.core.snapshot()["replication"]["committed"] for node in fleet.nodes.values())
    return {"victims": len(victims), "survived": survived, "invalid": fleet.invalid(), "committed": committed}


def test_a_crashed_tms_connections_go_on_at_their_rows_second_choice() -> None:
    result = crash(replicated=True)
    assert result["victims"] > 10
    assert result == {"victims": result["victims"], "survived": result["victims"], "invalid": 0,
                      "committed": result["victims"]}


def test_negative_control_without_replication_they_break() -> None:
    result = crash(replicated=False)
    assert result["victims"] > 10 and result["survived"] == 0 and result["invalid"] >= result["victims"]


def test_a_surviving_connection_is_replicated_again_from_its_new_tm() -> None:
    fleet = Fleet(lambda text: text + REPLICATION)
    connections = [(client, *open_connection(fleet, client)) for client in CLIENTS]
    replicate(fleet)
    fleet.distributor.set_tm_up("tm1", False)
    for client, tm, server_end in connections:
        if tm == "tm1":
            exchange(fleet, client, server_end)
    assert replicate(fleet) > 0, "the heirs replicate what they committed, to their own second choice"


@pytest.mark.parametrize("garbage", [b"\x04", b"\x09\x06\x02\x00" + bytes(4), b"\x04\x06\x02\x07" + bytes(40)])
def test_a_malformed_batch_is_refused_whole(garbage: bytes) -> None:
    fleet = Fleet(lambda text: text + REPLICATION)
    core = fleet.nodes["tm2"].core
    assert core.import_replication(garbage, 1.0) is not None
    assert core.snapshot()["replication"]["standby_entries"] == 0
    assert core.counters()["malformed.replication"] == 1


def restart(fleet: Fleet, name: str) -> None:
    node = fleet.nodes[name]
    fresh = TrafficManager(node.core.config)
    fleet.tms[name] = fresh
    fleet.nodes[name] = TMNode(fresh, dict(node.by_name), node._fleet_id or None, node.auth)


def crash_and_return(grace: bool) -> dict[str, int]:
    """tm1 crashes (its connections go on at their heirs, replicated), then comes back; with a return
    grace its rows are shared with the heirs (second chance), so those connections live on."""
    fleet = Fleet(lambda text: text + REPLICATION)
    if grace:
        config = fleet.distributor.config
        fleet.distributor.reconfigure(dataclasses.replace(config, health=dataclasses.replace(config.health, return_grace=30.0)))
    connections = [(client, *open_connection(fleet, client)) for client in CLIENTS]
    replicate(fleet)
    fleet.distributor.set_tm_up("tm1", False)
    victims = [(client, server_end) for client, tm, server_end in connections if tm == "tm1"]
    for client, server_end in victims:
        assert exchange(fleet, client, server_end)[2], "moved to its heir by replication"
    restart(fleet, "tm1")                          # a crashed TM comes back empty
    fleet.distributor.set_tm_up("tm1", True)      # back: its rows are its own again
    survived = sum(exchange(fleet, client, server_end)[2] for client, server_end in victims)
    # New connections from those clients open on tm1 again.
    new = [open_connection(fleet, client.rsplit(":", 1)[0] + ":50001")[0] for client, _ in victims]
    return {"victims": len(victims), "survived": survived, "invalid": fleet.invalid(), "new_on_tm1": new.count("tm1")}


def test_when_the_tm_returns_within_its_grace_the_moved_connections_live_on() -> None:
    result = crash_and_return(grace=True)
    assert result["victims"] > 10
    assert result == {"victims": result["victims"], "survived": result["victims"], "invalid": 0,
                      "new_on_tm1": result["victims"]}


def test_negative_control_without_a_return_grace_the_moved_connections_break_on_return() -> None:
    result = crash_and_return(grace=False)
    assert result["survived"] == 0 and result["invalid"] >= result["victims"] and result["new_on_tm1"] == result["victims"]
