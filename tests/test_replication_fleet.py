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
from overlay.tm.node import FLUSH, SEND, SEND_ALL, TMNode
from tests.tm.addresses import REMOTE, SERVER1
from tests.tm.packets import fragments, udp
from overlay.packet import parse_flow
from tests.test_fleet_in_memory import CLIENTS, CONFIG, VIP, Fleet, addresses, exchange, open_connection, tcp

REPLICATION = "\n[tm.replication]\nenabled = true\n"


def replicate(fleet: Fleet, only: str | None = None) -> int:
    """Run every TM's replication once (or `only` that TM's), as the agents do on their timers, with the
    standbys' acks carried back to the origin; entries delivered. Asserts every batch is acknowledged."""
    delivered = 0
    for name, node in fleet.nodes.items():
        if only is None or name == only:
            delivered += replicate_batches(fleet, name, node.replication(fleet.now))[0]
    return delivered


def replicate_batches(fleet: Fleet, name: str, batches: list[tuple[bytes, tuple[str, int]]]) -> tuple[int, list[bytes]]:
    """Batches from TM `name` through the distributor to their standbys, and the acks back: (entries
    delivered, what the origin sends on once acknowledged — strict mode's held packets)."""
    delivered = 0
    released: list[bytes] = []
    by_underlay = {underlay: tm for tm, underlay in fleet.underlay.items()}
    for datagram, _ in batches:
        verdict = fleet.distributor.from_overlay(datagram, fleet.underlay[name])
        assert verdict.action == "fanout", verdict.reason
        for forwarded, destination in verdict.fanout or []:
            standby = by_underlay[destination]
            if standby == name:                  # no standby: the distributor acknowledged it itself
                acks = [forwarded]
            else:
                action, ack, _ = fleet.nodes[standby].from_overlay(forwarded, fleet.dist_underlay, fleet.now)
                assert action == SEND and isinstance(ack, bytes), "a standby acknowledges every batch it took"
                delivered += 1
                back = fleet.distributor.from_overlay(ack, fleet.underlay[standby])
                assert back.action == "fanout" and back.tm == name, back.reason
                acks = [each for each, _ in back.fanout or []]
            for each in acks:
                action, data, _ = fleet.nodes[name].from_overlay(each, fleet.dist_underlay, fleet.now)
                if action == SEND_ALL:
                    released += data  # type: ignore[arg-type]
    return delivered, released


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


@pytest.mark.parametrize("garbage", [b"\x01", b"\x09\x06\x02\x00" + bytes(4), bytes.fromhex("01000000 00000001") + b"\x04\x06\x02\x07" + bytes(40),
                                     bytes.fromhex("01000000 00000001") + b"\x04"])
def test_a_malformed_batch_is_refused_whole(garbage: bytes) -> None:
    fleet = Fleet(lambda text: text + REPLICATION)
    core = fleet.nodes["tm2"].core
    assert isinstance(core.import_replication(garbage, 1.0), str)
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


# -- strict mode: a new connection's packets wait until its standbys have its state ------------------------
STRICT = "\n[tm.replication]\nenabled = true\nstrict = true\n"


def send_strict(fleet: Fleet, packet: bytes) -> tuple[list[str], list[bytes]]:
    """Like `fleet.send`, but a TM that holds the packet (strict mode) flushes its replication at once, as
    the agent does at the end of the loop iteration: (TMs that saw it, what leaves into the TUN)."""
    fleet.now += 0.01
    pending = [fleet.distributor.from_tun(packet)]
    visited: list[str] = []
    out: list[bytes] = []
    while pending:
        verdict = pending.pop(0)
        if verdict.action == "forward" and verdict.packet is not None:
            out.append(verdict.packet)
        if verdict.action != "tm":
            continue
        assert verdict.tm is not None and verdict.packet is not None
        tm = verdict.tm
        visited.append(tm)
        action, data, _ = fleet.nodes[tm].from_overlay(verdict.packet, fleet.dist_underlay, fleet.now)
        if action == FLUSH:
            _, datagrams = replicate_batches(fleet, tm, fleet.nodes[tm].replication(fleet.now))
        else:
            datagrams = [data] if action == SEND else list(data or []) if action == SEND_ALL else []  # type: ignore[arg-type]
        pending += [fleet.distributor.from_overlay(each, fleet.underlay[tm]) for each in datagrams]  # type: ignore[arg-type]
    return visited, out


def crash_after_the_first_packet(text: str) -> dict[str, int]:
    """Each client's SYN goes through its TM, which then dies before any timer-driven replication: does
    the server's SYN-ACK find the connection at the heir? (The loss window, at its worst.)"""
    fleet = Fleet(lambda config: config + text)
    survived = opened = 0
    for client in CLIENTS:
        tms, out = send_strict(fleet, tcp(client, f"{VIP}:80", "S"))
        if tms[0] != "tm1":
            continue
        assert len(out) == 1, "the SYN reaches its server (held until acknowledged, in strict mode)"
        opened += 1
        server, port = addresses(out[0])[2:]
        fleet.distributor.set_tm_up("tm1", False)       # SIGKILL right after the SYN left
        back_tms, back = send_strict(fleet, tcp(f"{server}:{port}", client, "SA"))
        _, ack = send_strict(fleet, tcp(client, f"{VIP}:80", "A"))
        survived += len(back) == 1 and len(ack) == 1 and "tm1" not in back_tms
        fleet.distributor.set_tm_up("tm1", True)
        fleet.nodes["tm1"].core.expire(fleet.now + 10_000)   # its old connections gone, as after a restart
    replication = fleet.nodes["tm1"].core.snapshot()["replication"]
    return {"opened": opened, "survived": survived, "invalid": fleet.invalid(), "held": replication["held"],
            "released_acked": replication["released_acked"]}


def test_strict_mode_closes_the_loss_window() -> None:
    result = crash_after_the_first_packet(STRICT)
    assert result["opened"] > 10
    assert result == {"opened": result["opened"], "survived": result["opened"], "invalid": 0,
                      "held": result["opened"], "released_acked": result["opened"]}


def test_negative_control_without_strict_mode_a_connection_younger_than_the_interval_is_lost() -> None:
    result = crash_after_the_first_packet(REPLICATION)
    assert result["opened"] > 10 and result["survived"] == 0 and result["invalid"] >= result["opened"]
    assert result["held"] == 0


def strict_tm(extra: str = "") -> TrafficManager:
    fleet = Fleet(lambda config: config + STRICT + extra)
    return fleet.nodes["tm1"].core


def test_strict_mode_holds_a_connections_packets_in_order_until_its_batch_is_acknowledged() -> None:
    core = strict_tm()
    client = "198.51.100.7:40000"
    first = core.receive(tcp(client, f"{VIP}:80", "S"), 1.0)
    again = core.receive(tcp(client, f"{VIP}:80", "S"), 1.001)    # a retransmission, before the flush
    assert (first.action, again.action) == ("defer", "defer")
    batches = core.export_replication(1.002)
    later = core.receive(tcp(client, f"{VIP}:80", "S"), 1.003)    # sent, not yet acknowledged: still held
    assert later.action == "defer" and len(batches) == 1
    ack = batches[0][:1] + b"\x02" + bytes(2) + batches[0][4:8]    # two standbys took it
    assert core.replication_acked(ack, 1.004) == []               # one ack of two: still held
    released = core.replication_acked(ack, 1.005)
    assert len(released) == 3 and all(addresses(packet)[2] != VIP for packet in released)
    status = core.snapshot()["replication"]
    assert status["released_acked"] == 3 and status["held_connections"] == 0 and status["acked_batches"] == 1
    assert status["lag_ms"] == pytest.approx(5.0) and status["ack_rtt_ms"] == pytest.approx(3.0)
    assert core.receive(tcp(client, f"{VIP}:80", "A"), 1.006).action == "overlay"   # acknowledged: no more holding


def test_strict_mode_releases_held_packets_after_the_defer_timeout_without_acks() -> None:
    core = strict_tm()
    assert core.receive(tcp("198.51.100.7:40000", f"{VIP}:80", "S"), 1.0).action == "defer"
    assert core.next_release() is None                             # not in a batch yet: the flush comes first
    core.export_replication(1.0)
    assert core.next_release() == pytest.approx(1.05)
    assert core.release_overdue(1.04) == []
    released = core.release_overdue(1.05)
    assert len(released) == 1 and core.snapshot()["replication"]["released_timeout"] == 1
    assert core.next_release() is None
    core.release_overdue(1.0 + 5.0)                                # never acknowledged: given up on, counted
    assert core.snapshot()["replication"]["unacked_batches"] == 1


def test_strict_mode_without_a_standby_is_acknowledged_by_the_distributor() -> None:
    fleet = Fleet(lambda config: config + STRICT)
    for tm in ("tm2", "tm3"):
        fleet.distributor.set_tm_up(tm, False)
    tms, out = send_strict(fleet, tcp("198.51.100.7:40000", f"{VIP}:80", "S"))
    assert tms == ["tm1"] and len(out) == 1, "nothing to wait for: released by the distributor's own ack"


def test_fragments_are_not_held_in_strict_mode() -> None:
    core = strict_tm()
    pieces = fragments(udp(SERVER1, 6000, REMOTE, 5060, bytes(3000)), 1280)   # out through SNAT
    results = [core.receive(piece, 1.0) for piece in pieces]
    assert len(pieces) == 3 and [result.action for result in results] == ["overlay"] * 3


def test_status_shows_the_ack_lag_per_standby_at_the_distributor() -> None:
    fleet = Fleet(lambda config: config + REPLICATION)
    for client in CLIENTS:
        open_connection(fleet, client)
    clock = iter(range(1000))
    fleet.distributor.clock = lambda: next(clock) * 0.001
    assert replicate(fleet) > 0
    lag = fleet.distributor.replication_lag.status(10.0)
    assert set(lag) == {"tm1", "tm2", "tm3"}
    for origin, view in lag.items():
        assert view["standbys"] and origin not in view["standbys"]
        assert all(peer["acks"] >= 1 and peer["lag_ms"] in (1.0, 2.0) for peer in view["standbys"].values())
    assert all(node.core.snapshot()["replication"]["acked_batches"] >= 1 for node in fleet.nodes.values())


# -- enabling a drained TM again: the connections opened elsewhere during the drain live on ----------------
def drain_then_enable(grace: bool) -> dict[str, int]:
    fleet = Fleet()
    if grace:
        with_return_grace(fleet)
    drained = "tm1"
    fleet.distributor.set_tm_state(drained, "draining")
    during = [(client, *open_connection(fleet, client)) for client in CLIENTS]   # opened elsewhere meanwhile
    moved = [(client, server_end) for client, tm, server_end in during
             if tm != drained and fleet.distributor.decide(parse_flow(tcp(client, f"{VIP}:80", "A"))).second is not None
             and exchange(fleet, client, server_end)[2]]
    fleet.distributor.set_tm_state(drained, "enabled")
    back_on_drained = [(client, server_end) for client, server_end in moved
                       if fleet.distributor.from_tun(tcp(client, f"{VIP}:80", "A")).tm == drained]
    survived = sum(exchange(fleet, client, server_end)[2] for client, server_end in back_on_drained)
    new = [open_connection(fleet, client.rsplit(":", 1)[0] + ":50001")[0] for client, _ in back_on_drained]
    return {"rows_back": len(back_on_drained), "survived": survived, "invalid": fleet.invalid(),
            "new_on_drained": new.count(drained)}


def test_enabling_a_drained_tm_within_the_return_grace_keeps_the_connections_opened_meanwhile() -> None:
    result = drain_then_enable(grace=True)
    assert result["rows_back"] > 10
    assert result == {"rows_back": result["rows_back"], "survived": result["rows_back"], "invalid": 0,
                      "new_on_drained": result["rows_back"]}


def test_negative_control_without_a_return_grace_enabling_breaks_them() -> None:
    result = drain_then_enable(grace=False)
    assert result["rows_back"] > 10 and result["survived"] == 0 and result["invalid"] >= result["rows_back"]
