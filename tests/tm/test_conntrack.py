"""Connection tracking: the TCP state machine, per-state timeouts under a simulated clock, the bounded
table's policy when full, and what expiry gives back (ports, least-connections counts)."""

from __future__ import annotations

import dataclasses

import pytest

from overlay.tm.config import ConntrackConfig, DEFAULT_TIMEOUTS
from overlay.tm.core import TrafficManager
from overlay.tm.states import (
    TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_LAST_ACK, TCP_SYN_RECV, TCP_SYN_SENT,
    TCP_TIME_WAIT, tcp_next,
)

from .addresses import CLIENT, CLIENT_B, FIRST_PORT, REMOTE, SERVER1, VIP, XLATE
from .conftest import lab_config_with_dns
from .packets import ACK, FIN, RST, SYN, echo, flow, tcp, udp

O, R_ = 0, 1   # original and reply directions

TRANSITIONS = [
    # (description, state, direction, flags, closer) → (state, closer)
    ("SYN retransmitted", TCP_SYN_SENT, O, SYN, -1, TCP_SYN_SENT, -1),
    ("SYN+ACK from the reply side", TCP_SYN_SENT, R_, SYN | ACK, -1, TCP_SYN_RECV, -1),
    ("SYN+ACK from the original side does not advance", TCP_SYN_SENT, O, SYN | ACK, -1, TCP_SYN_SENT, -1),
    ("handshake's last ACK", TCP_SYN_RECV, O, ACK, -1, TCP_ESTABLISHED, -1),
    ("ACK from the reply side in SYN_RECV does not establish", TCP_SYN_RECV, R_, ACK, -1, TCP_SYN_RECV, -1),
    ("data keeps established", TCP_ESTABLISHED, R_, ACK, -1, TCP_ESTABLISHED, -1),
    ("client closes first", TCP_ESTABLISHED, O, FIN | ACK, -1, TCP_FIN_WAIT, O),
    ("server closes first", TCP_ESTABLISHED, R_, FIN | ACK, -1, TCP_FIN_WAIT, R_),
    ("closer's FIN acknowledged: half-closed", TCP_FIN_WAIT, R_, ACK, O, TCP_CLOSE_WAIT, O),
    ("closer retransmits FIN", TCP_FIN_WAIT, O, FIN | ACK, O, TCP_FIN_WAIT, O),
    ("half-closed: the other side still sends data", TCP_CLOSE_WAIT, R_, ACK, O, TCP_CLOSE_WAIT, O),
    ("both FINs", TCP_FIN_WAIT, R_, FIN | ACK, O, TCP_LAST_ACK, O),
    ("second FIN after half-close", TCP_CLOSE_WAIT, R_, FIN | ACK, O, TCP_LAST_ACK, O),
    ("closer acknowledges the last FIN", TCP_LAST_ACK, O, ACK, O, TCP_TIME_WAIT, O),
    ("a late ACK from the other side is not the last one", TCP_LAST_ACK, R_, ACK, O, TCP_LAST_ACK, O),
    ("RST closes from any state", TCP_ESTABLISHED, R_, RST, -1, TCP_CLOSE, -1),
    ("RST during the handshake", TCP_SYN_SENT, R_, RST | ACK, -1, TCP_CLOSE, -1),
    ("new SYN in TIME_WAIT reopens", TCP_TIME_WAIT, O, SYN, O, TCP_SYN_SENT, -1),
    ("new SYN after RST reopens", TCP_CLOSE, O, SYN, -1, TCP_SYN_SENT, -1),
    ("new SYN while still closing reopens", TCP_LAST_ACK, O, SYN, R_, TCP_SYN_SENT, -1),
    ("a SYN in an established connection does not reopen", TCP_ESTABLISHED, O, SYN, -1, TCP_ESTABLISHED, -1),
    ("a SYN from the reply side does not reopen", TCP_CLOSE, R_, SYN, -1, TCP_CLOSE, -1),
]


@pytest.mark.parametrize("case", TRANSITIONS, ids=[case[0] for case in TRANSITIONS])
def test_tcp_transition(case: tuple) -> None:
    _, state, direction, flags, closer, expected_state, expected_closer = case
    assert tcp_next(state, direction, flags, closer) == (expected_state, expected_closer)


def states(tm: TrafficManager) -> dict[str, int]:
    return {name: count for name, count in tm.snapshot()["connections"]["by_state"].items() if count}


def test_tcp_lifecycle_with_half_close_and_timeouts() -> None:
    tm = TrafficManager(lab_config_with_dns())
    steps = [
        (tcp(CLIENT, 40000, VIP, 80, SYN), "tcp_syn_sent"),
        (tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), "tcp_syn_recv"),
        (tcp(CLIENT, 40000, VIP, 80, ACK), "tcp_established"),
        (tcp(CLIENT, 40000, VIP, 80, FIN | ACK), "tcp_fin_wait"),
        (tcp(SERVER1, 80, CLIENT, 40000, ACK), "tcp_close_wait"),
        (tcp(SERVER1, 80, CLIENT, 40000, ACK, b"still sending"), "tcp_close_wait"),
        (tcp(SERVER1, 80, CLIENT, 40000, FIN | ACK), "tcp_last_ack"),
        (tcp(CLIENT, 40000, VIP, 80, ACK), "tcp_time_wait"),
    ]
    now = 0.0
    for packet, state in steps:
        assert tm.receive(packet, now).action == "overlay"
        assert states(tm) == {state: 1}
        now += 1.0
    last = now - 1.0
    assert tm.next_deadline() == last + DEFAULT_TIMEOUTS["tcp_time_wait"]
    assert tm.expire(last + DEFAULT_TIMEOUTS["tcp_time_wait"] - 0.001) == 0
    assert tm.expire(last + DEFAULT_TIMEOUTS["tcp_time_wait"]) == 1
    assert states(tm) == {} and tm.next_deadline() is None
    assert tm.counters()["conntrack.expired"] == 1
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), now + 200).reason == "invalid:no-state"


@pytest.mark.parametrize("packets, timeout", [
    ([tcp(CLIENT, 40000, VIP, 80, SYN)], "tcp_syn_sent"),
    ([tcp(CLIENT, 40000, VIP, 80, SYN), tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK),
      tcp(CLIENT, 40000, VIP, 80, ACK)], "tcp_established"),
    ([tcp(CLIENT, 40000, VIP, 80, SYN), tcp(SERVER1, 80, CLIENT, 40000, RST | ACK)], "tcp_close"),
    ([udp(CLIENT, 5000, VIP, 53)], "udp_unreplied"),
    ([udp(CLIENT, 5000, VIP, 53), udp(SERVER1, 53, CLIENT, 5000)], "udp_replied"),
    ([echo(SERVER1, REMOTE, 5)], "icmp"),
], ids=["syn sent", "established", "closed by RST", "udp unreplied", "udp replied", "icmp echo"])
def test_idle_timeout_per_state(packets: list[bytes], timeout: str) -> None:
    """The connection lives exactly its state's timeout after its last packet, even without expire()."""
    timeouts = dict(DEFAULT_TIMEOUTS, **{timeout: 50.0})
    config = dataclasses.replace(lab_config_with_dns(), conntrack=ConntrackConfig(100, timeouts))
    for probe_at, alive in ((49.999, True), (50.0, False)):
        tm = TrafficManager(config)
        for packet in packets:
            tm.receive(packet, 0.0)
        assert tm.next_deadline() == 50.0
        result = tm.receive(packets[-1], probe_at)
        # A dead entry is gone before the probe: a non-opener probe is invalid, an opener opens anew.
        assert (tm.counters()["conntrack.expired"] == 0) == alive, result


def test_refresh_moves_the_deadline_and_expire_takes_only_what_is_due() -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(udp(CLIENT, 5000, VIP, 53), 0.0)            # udp_unreplied: 30 s
    tm.receive(udp(CLIENT_B, 5000, VIP, 53), 10.0)
    tm.receive(udp(CLIENT, 5000, VIP, 53), 20.0)           # refreshed: now due at 50
    assert tm.next_deadline() == 40.0
    assert tm.expire(45.0) == 1
    assert tm.receive(udp(CLIENT_B, 5000, VIP, 53), 45.0).reason == "dnat"   # a new connection
    assert tm.counters()["conntrack.created"] == 3
    assert tm.next_deadline() == 50.0


def test_expiry_releases_the_port_and_the_servers_connection_count() -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(tcp(SERVER1, 5555, REMOTE, 443, SYN), 0.0)
    tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 0.0)
    snapshot = tm.snapshot()
    assert snapshot["ports"]["by_address"][XLATE]["tcp"]["in_use"] == 1
    assert snapshot["services"][0]["servers"][0]["connections"] == 1
    assert tm.expire(1000.0) == 2
    snapshot = tm.snapshot()
    assert snapshot["ports"]["by_address"][XLATE]["tcp"]["in_use"] == 0
    assert snapshot["services"][0]["servers"][0]["connections"] == 0


def full_tm(max_entries: int) -> TrafficManager:
    return TrafficManager(dataclasses.replace(lab_config_with_dns(),
                                              conntrack=ConntrackConfig(max_entries, dict(DEFAULT_TIMEOUTS))))


def establish(tm: TrafficManager, client_port: int, now: float) -> None:
    server = flow(tm.receive(tcp(CLIENT, client_port, VIP, 80, SYN), now).packet).dst
    tm.receive(tcp(server, 80, CLIENT, client_port, SYN | ACK), now)
    tm.receive(tcp(CLIENT, client_port, VIP, 80, ACK), now)


def test_full_table_refuses_new_connections_when_only_established_ones_remain() -> None:
    tm = full_tm(2)
    establish(tm, 40000, 0.0)
    establish(tm, 40001, 0.0)
    assert states(tm) == {"tcp_established": 2}
    result = tm.receive(tcp(CLIENT, 40002, VIP, 80, SYN), 1.0)
    assert (result.action, result.reason) == ("drop", "conntrack-full")
    assert tm.snapshot()["table"] == {"size": 2, "limit": 2, "fullness": 1.0}
    # The established connections were not harmed.
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), 2.0).reason == "dnat"


def test_full_table_evicts_the_oldest_embryonic_connection() -> None:
    tm = full_tm(3)
    establish(tm, 40000, 0.0)
    tm.receive(tcp(CLIENT, 40001, VIP, 80, SYN), 1.0)        # oldest SYN_SENT: evicted
    tm.receive(tcp(CLIENT, 40002, VIP, 80, SYN), 2.0)
    assert tm.receive(tcp(CLIENT, 40003, VIP, 80, SYN), 3.0).reason == "dnat"
    assert tm.counters()["conntrack.early_drop"] == 1
    assert tm.receive(tcp(CLIENT, 40001, VIP, 80, ACK), 4.0).reason == "invalid:no-state"
    assert tm.receive(tcp(CLIENT, 40002, VIP, 80, SYN), 4.0).reason == "dnat"


def test_full_table_expires_due_entries_before_evicting() -> None:
    tm = full_tm(1)
    tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0)
    assert tm.receive(udp(SERVER1, 6001, REMOTE, 53), 31.0).reason == "snat"
    counters = tm.counters()
    assert (counters["conntrack.expired"], counters["conntrack.early_drop"]) == (1, 0)


def test_a_port_is_freed_by_the_connection_that_used_it_only() -> None:
    tm = TrafficManager(lab_config_with_dns())
    tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0)
    tm.receive(udp(SERVER1, 6001, REMOTE, 53), 20.0)
    tm.expire(31.0)                                  # the first expires, its port goes to the back
    out = tm.receive(udp(SERVER1, 6002, REMOTE, 53), 32.0)
    assert out.reason == "snat"
    assert flow(out.packet).sport == FIRST_PORT + 2      # never the live FIRST_PORT + 1


def test_timeouts_not_given_keep_their_defaults() -> None:
    config = dataclasses.replace(lab_config_with_dns(), conntrack=ConntrackConfig(100, {"udp_unreplied": 5.0}))
    tm = TrafficManager(config)
    tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0)
    tm.receive(tcp(SERVER1, 6000, REMOTE, 443, SYN), 0.0)
    assert tm.next_deadline() == 5.0
    tm.expire(5.0)
    assert tm.next_deadline() == DEFAULT_TIMEOUTS["tcp_syn_sent"]
