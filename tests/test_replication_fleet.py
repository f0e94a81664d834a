"""Connections survive a TM crash, in memory: the real distributor core and three TM node cores with
`[tm.replication]` on; each TM's connection state goes, through the distributor, to the row's second
choice, which commits it when the crashed TM's packets reach it (overlay/tm/replication.py).

Negative control: the same crash without replication breaks the connections and the heirs count them
as invalid."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from overlay.tm.core import TrafficManager
from overlay.tm.node import SEND, TMNode
from tests.test_fleet_in_memory import CLIENTS, CONFIG, Fleet, addresses, exchange, open_connection, tcp

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
        with_return_grace(fleet)
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


# -- source-NATed connections: the xlate's designated backup -----------------------------------------------
BACKUPS = {"tm1": "tm2", "tm2": "tm3", "tm3": "tm1"}


def fleet_with_backups(tmp_path: Path, backups: bool) -> Fleet:
    shutil.copytree(CONFIG, tmp_path, dirs_exist_ok=True)
    if backups:
        path = tmp_path / "distributor.toml"
        text = path.read_text()
        for tm, backup in BACKUPS.items():
            text = text.replace(f'name = "{tm}"\n', f'name = "{tm}"\nbackup = "{backup}"\n', 1)
        path.write_text(text)
    for tm in BACKUPS:
        path = tmp_path / f"{tm}.toml"
        path.write_text(path.read_text() + REPLICATION)
    return Fleet(config=tmp_path)


def with_return_grace(fleet: Fleet, seconds: float = 30.0) -> None:
    config = fleet.distributor.config
    fleet.distributor.reconfigure(dataclasses.replace(config, health=dataclasses.replace(config.health, return_grace=seconds)))


def open_snat_flows(fleet: Fleet) -> list[tuple[str, str, str, str]]:
    """60 server → remote TCP connections through SNAT: (TM, server, remote, public source) each."""
    flows = []
    for index in range(60):
        server, remote = f"203.0.113.1{index % 2}:{5000 + index}", f"198.51.100.{20 + index}:443"
        tms, out = fleet.send(tcp(server, remote, "S"))
        assert out is not None
        public = "{}:{}".format(*addresses(out)[:2])
        assert fleet.send(tcp(remote, public, "SA"))[1] is not None
        flows.append((tms[0], server, remote, public))
    return flows


def snat_flows_survive(tmp_path: Path, backups: bool) -> dict[str, int]:
    fleet = fleet_with_backups(tmp_path, backups)
    flows = open_snat_flows(fleet)
    replicate(fleet)
    victim = max(BACKUPS, key=lambda tm: sum(flow[0] == tm for flow in flows))
    fleet.distributor.set_tm_up(victim, False)
    survived = 0
    on_victim = [flow for flow in flows if flow[0] == victim]
    for _, server, remote, public in on_victim:
        tms, out = fleet.send(tcp(server, remote, "PA"))
        kept = out is not None and "{}:{}".format(*addresses(out)[:2]) == public
        _, back = fleet.send(tcp(remote, public, "PA"))
        survived += kept and back is not None and addresses(back)[2:] == tuple(split(server))
    return {"on_victim": len(on_victim), "survived": survived, "invalid": fleet.invalid()}


def split(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def test_source_nated_connections_survive_through_the_xlates_backup(tmp_path: Path) -> None:
    result = snat_flows_survive(tmp_path, backups=True)
    assert result["on_victim"] > 10 and result == {"on_victim": result["on_victim"], "survived": result["on_victim"], "invalid": 0}


def test_negative_control_without_a_designated_backup_their_replies_are_dropped(tmp_path: Path) -> None:
    result = snat_flows_survive(tmp_path, backups=False)
    assert result["on_victim"] > 10 and result["survived"] == 0


def test_source_nated_connections_live_on_when_their_tm_returns_within_its_grace(tmp_path: Path) -> None:
    """Back from the crash (empty), the TM owns its xlate again: replies to it are marked with its backup,
    which held them meanwhile, and its rows with their heirs."""
    fleet = fleet_with_backups(tmp_path, backups=True)
    with_return_grace(fleet)
    flows = open_snat_flows(fleet)
    replicate(fleet)
    victim = max(BACKUPS, key=lambda tm: sum(flow[0] == tm for flow in flows))
    fleet.distributor.set_tm_up(victim, False)
    on_victim = [flow for flow in flows if flow[0] == victim]
    for _, server, remote, public in on_victim:         # moved to the heirs and the backup
        fleet.send(tcp(server, remote, "PA"))
        fleet.send(tcp(remote, public, "PA"))
    restart(fleet, victim)
    fleet.distributor.set_tm_up(victim, True)
    survived = 0
    for _, server, remote, public in on_victim:
        _, out = fleet.send(tcp(server, remote, "PA"))
        _, back = fleet.send(tcp(remote, public, "PA"))
        survived += out is not None and back is not None and "{}:{}".format(*addresses(out)[:2]) == public
    assert len(on_victim) > 10 and survived == len(on_victim) and fleet.invalid() == 0
