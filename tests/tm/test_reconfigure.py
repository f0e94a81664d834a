"""reconfigure(): a new config applies to new connections; live ones keep translation, server and port."""

from __future__ import annotations

import dataclasses

from overlay.tm.config import DEFAULT_TIMEOUTS, ConntrackConfig, ServerConfig
from overlay.tm.core import TrafficManager

from .addresses import CLIENT, CLIENT_B, REMOTE, SERVER1, SERVER2, VIP, XLATE
from .conftest import lab_config
from .packets import A, ACK, SYN, Flow, flow, tcp, udp


def with_web_servers(config, *servers: ServerConfig, policy: str = "round-robin"):
    web = dataclasses.replace(config.services[0], servers=servers, policy=policy)
    return dataclasses.replace(config, services=(web,) + config.services[1:])


def test_a_server_removed_from_the_pool_keeps_its_live_connections() -> None:
    config = lab_config()
    tm = TrafficManager(config)
    assert flow(tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 0.0).packet).dst == SERVER1
    tm.reconfigure(with_web_servers(config, ServerConfig(A(SERVER2), 80)))
    assert flow(tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), 1.0).packet).dst == SERVER1
    assert flow(tm.receive(tcp(SERVER1, 80, CLIENT, 40000, ACK), 1.0).packet) == Flow("tcp", VIP, 80, CLIENT, 40000)
    assert flow(tm.receive(tcp(CLIENT_B, 40000, VIP, 80, SYN), 1.0).packet).dst == SERVER2
    assert flow(tm.receive(tcp(CLIENT_B, 40001, VIP, 80, SYN), 1.0).packet).dst == SERVER2


def test_least_connections_counts_survive_a_reconfiguration() -> None:
    servers = (ServerConfig(A(SERVER1), 80), ServerConfig(A(SERVER2), 80))
    config = with_web_servers(lab_config(), *servers, policy="least-connections")
    tm = TrafficManager(config)
    for port in (40000, 40001):
        tm.receive(tcp(CLIENT, port, VIP, 80, SYN), 0.0)
    tm.reconfigure(with_web_servers(lab_config(), *servers, policy="least-connections"))
    counts = [server["connections"] for server in tm.snapshot()["services"][0]["servers"]]
    assert counts == [1, 1]
    tm.expire(1000.0)
    counts = [server["connections"] for server in tm.snapshot()["services"][0]["servers"]]
    assert counts == [0, 0]


def test_a_moved_port_block_keeps_live_ports_and_allocates_from_the_new_block() -> None:
    config = dataclasses.replace(lab_config(), port_range=(2000, 2001))
    tm = TrafficManager(config)
    assert flow(tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0).packet).sport == 2000
    tm.reconfigure(dataclasses.replace(config, port_range=(2001, 2002)))
    assert flow(tm.receive(udp(REMOTE, 53, XLATE, 2000), 1.0).packet) == Flow("udp", REMOTE, 53, SERVER1, 6000)
    ports = {flow(tm.receive(udp(SERVER1, 6001 + i, REMOTE, 53), 1.0).packet).sport for i in range(2)}
    assert ports == {2001, 2002}
    assert tm.receive(udp(SERVER1, 6003, REMOTE, 53), 1.0).reason == "ports-exhausted"
    assert tm.snapshot()["ports"]["by_address"][XLATE]["udp"]["in_use"] == 3


def test_new_timeouts_apply_to_live_connections() -> None:
    config = lab_config()
    tm = TrafficManager(config)
    tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0)
    assert tm.next_deadline() == DEFAULT_TIMEOUTS["udp_unreplied"]
    timeouts = dict(DEFAULT_TIMEOUTS, udp_unreplied=5.0)
    tm.reconfigure(dataclasses.replace(config, conntrack=ConntrackConfig(10, timeouts)))
    assert tm.next_deadline() == 5.0
    assert tm.snapshot()["table"]["limit"] == 10
