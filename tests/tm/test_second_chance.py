"""The TM core's second-chance modes, packet by packet (docs/operations.md, "Drain").

- SECOND_CHANCE (we are a drained row's new TM): whatever we have no state for goes back to the draining
  TM — also UDP and ICMP echo packets that would open state, *before* opening it (nothing but state
  tells an old UDP flow from a new one); only a TCP SYN opens here.
- LAST_CHANCE (we are the draining TM, handed the bounce): our state is used, nothing opens; a packet that
  would open a flow is declined (the distributor opens it on the row's TM).
"""

from __future__ import annotations

import pytest

from overlay.tm.core import LAST_CHANCE, SECOND_CHANCE, UNMARKED, TrafficManager

from .addresses import CLIENT, CLIENT6, FIRST_PORT, REMOTE, SERVER1, VIP, VIP6, XLATE
from .conftest import lab_config_with_dns
from .packets import ACK, SYN, echo, icmp_error, tcp, udp

OPENERS = {
    "UDP to a service": udp(CLIENT, 5000, VIP, 53),
    "UDP to a service, IPv6": udp(CLIENT6, 5000, VIP6, 53),
    "UDP a server sends out (SNAT)": udp(SERVER1, 6000, REMOTE, 123),
    "ICMP echo request (SNAT)": echo(SERVER1, REMOTE, 77),
}


def connections(tm: TrafficManager) -> int:
    return tm.snapshot()["connections"]["total"]


@pytest.mark.parametrize("packet", OPENERS.values(), ids=OPENERS.keys())
def test_marked_udp_and_echo_are_bounced_before_they_open_state(packet: bytes) -> None:
    tm = TrafficManager(lab_config_with_dns())
    result = tm.receive(packet, 1.0, SECOND_CHANCE)
    assert (result.action, result.packet) == ("bounce", None)
    assert connections(tm) == 0 and tm.counters()["bounced.second_chance"] == 1


@pytest.mark.parametrize("packet", OPENERS.values(), ids=OPENERS.keys())
def test_unmarked_they_open_as_always(packet: bytes) -> None:
    tm = TrafficManager(lab_config_with_dns())
    assert tm.receive(packet, 1.0, UNMARKED).action == "overlay" and connections(tm) == 1


def test_marked_tcp_syn_opens_here_and_other_tcp_without_state_is_bounced() -> None:
    tm = TrafficManager(lab_config_with_dns())
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), 1.0, SECOND_CHANCE).action == "bounce"
    assert tm.receive(tcp(CLIENT, 40001, VIP, 80, SYN), 1.0, SECOND_CHANCE).reason == "dnat"
    assert connections(tm) == 1


def test_marked_icmp_error_without_state_is_bounced() -> None:
    tm = TrafficManager(lab_config_with_dns())
    error = icmp_error(REMOTE, XLATE, udp(XLATE, FIRST_PORT, REMOTE, 123))
    assert tm.receive(error, 1.0, SECOND_CHANCE).action == "bounce"
    assert tm.receive(error, 1.0, UNMARKED).reason == "invalid:icmp-error-no-state"


@pytest.mark.parametrize("packet", OPENERS.values(), ids=OPENERS.keys())
def test_last_chance_uses_state_and_declines_what_would_open(packet: bytes) -> None:
    tm = TrafficManager(lab_config_with_dns())
    result = tm.receive(packet, 1.0, LAST_CHANCE)
    assert (result.action, result.packet, result.reason) == ("decline", None, "declined")
    assert connections(tm) == 0 and tm.counters()["bounced.declined"] == 1
    opened = tm.receive(packet, 2.0, UNMARKED)
    again = tm.receive(packet, 3.0, LAST_CHANCE)
    assert (again.action, again.packet) == ("overlay", opened.packet)  # the draining TM's state serves it


def test_last_chance_never_opens_tcp_and_drops_what_has_no_state() -> None:
    tm = TrafficManager(lab_config_with_dns())
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 1.0, LAST_CHANCE).action == "decline"
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), 1.0, LAST_CHANCE).reason == "invalid:no-state"
    assert connections(tm) == 0
