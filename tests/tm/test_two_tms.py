"""The negative control the lab relies on: two TM cores wired in memory behind a stand-in distributor.

With the distributor's rule (hash the client both ways; replies to an xlate address go to its owner)
every conversation completes and no TM counts an invalid packet. Split the same conversations across
the two TMs — or hash the symmetric 5-tuple, which NAT changes between the directions — and they break,
and the TM that got the stray packets counts them as invalid: the signal that exposes a distributor
that broke symmetry.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest

from overlay.tm.core import TrafficManager

from .addresses import REMOTE, SERVER1, SERVER2, VIP, XLATE, XLATE_TM2
from .conftest import lab_config, lab_config_with_dns
from .packets import A, ACK, SYN, Flow, flow, tcp, udp

CONVERSATIONS = 24
Route = Callable[[bytes, str], int]    # (packet, "request" | "reply") → index of the TM


def hashed(address: str) -> int:
    return zlib.crc32(A(address).packed) % 2


def by_endpoint(packet: bytes, leg: str) -> int:
    """The distributor's rule: the client (or remote) address picks the TM in both directions; a reply
    to an xlate address goes to the TM that owns it."""
    f = flow(packet)
    if f.dst in (XLATE, XLATE_TM2):
        return 0 if f.dst == XLATE else 1
    if f.dst == VIP or leg == "request":
        return hashed(f.src) if f.dst == VIP else hashed(f.dst)
    return hashed(f.dst)


def split(packet: bytes, leg: str) -> int:
    """Requests as the distributor would send them, every reply to the other TM."""
    correct = by_endpoint(packet, leg)
    return correct if leg == "request" else 1 - correct


def symmetric_five_tuple(packet: bytes, leg: str) -> int:
    """A symmetric 5-tuple hash: the same for both directions of a tuple — but NAT changes the tuple."""
    f = flow(packet)
    ends = sorted([(A(f.src).packed, f.sport), (A(f.dst).packed, f.dport)])
    return zlib.crc32(repr((f.protocol, ends)).encode()) % 2


def deliver(tms: list[TrafficManager], route: Route, packet: bytes, leg: str, now: float) -> Flow | None:
    result = tms[route(packet, leg)].receive(packet, now)
    return flow(result.packet) if result.action == "overlay" and result.packet else None


def load_balanced_conversation(tms: list[TrafficManager], route: Route, index: int, now: float) -> bool:
    """client → VIP handshake, request and response; True when every packet arrived as it should."""
    client, port = f"198.51.100.{100 + index}", 40000 + index
    out = deliver(tms, route, tcp(client, port, VIP, 80, SYN), "request", now)
    if out is None or out.dst not in (SERVER1, SERVER2):
        return False
    server = out.dst
    back = deliver(tms, route, tcp(server, 80, client, port, SYN | ACK), "reply", now)
    if back != Flow("tcp", VIP, 80, client, port):
        return False
    out = deliver(tms, route, tcp(client, port, VIP, 80, ACK, b"GET /"), "request", now)
    if out != Flow("tcp", client, port, server, 80):
        return False
    return deliver(tms, route, tcp(server, 80, client, port, ACK, b"200 OK"), "reply", now) == back


def outbound_conversation(tms: list[TrafficManager], route: Route, index: int, now: float) -> bool:
    """server → remote over source NAT (UDP), and the answer."""
    remote = f"198.51.100.{20 + index}"
    out = deliver(tms, route, udp(SERVER1, 50000 + index, remote, 53), "request", now)
    if out is None or out.src not in (XLATE, XLATE_TM2):
        return False
    back = deliver(tms, route, udp(remote, 53, out.src, out.sport), "reply", now)
    return back == Flow("udp", remote, 53, SERVER1, 50000 + index)


def invalid(tm: TrafficManager) -> int:
    return sum(count for name, count in tm.counters().items() if name.startswith("invalid."))


def run(route: Route) -> tuple[int, list[int]]:
    tms = [TrafficManager(lab_config(1)), TrafficManager(lab_config(2))]
    completed = 0
    for index in range(CONVERSATIONS):
        completed += load_balanced_conversation(tms, route, index, float(index))
        completed += outbound_conversation(tms, route, index, float(index))
    return completed, [invalid(tm) for tm in tms]


def test_the_distributors_rule_keeps_every_conversation_on_one_tm() -> None:
    completed, invalid_counts = run(by_endpoint)
    assert completed == 2 * CONVERSATIONS
    assert invalid_counts == [0, 0]


def test_splitting_conversations_across_two_tms_breaks_them_and_is_counted_as_invalid() -> None:
    completed, invalid_counts = run(split)
    assert completed == 0
    # Every first reply was stray: one invalid drop per conversation, on whichever TM received it.
    assert sum(invalid_counts) == 2 * CONVERSATIONS
    assert all(count > 0 for count in invalid_counts)


def test_symmetric_five_tuple_hashing_breaks_through_nat_and_is_counted() -> None:
    completed, invalid_counts = run(symmetric_five_tuple)
    broken = 2 * CONVERSATIONS - completed
    assert broken > 0
    assert sum(invalid_counts) >= broken


@pytest.mark.parametrize("packet, reason", [
    (tcp(SERVER1, 80, "198.51.100.100", 40000, SYN | ACK), "invalid:no-state"),
    (tcp(REMOTE, 443, XLATE, 1024, SYN | ACK), "invalid:foreign-xlate"),
    (udp(REMOTE, 53, XLATE, 1024), "invalid:foreign-xlate"),
], ids=["TCP reply of a DNAT", "TCP reply to tm1's xlate", "UDP reply to tm1's xlate"])
def test_stray_replies_on_a_tm_without_state(packet: bytes, reason: str) -> None:
    tm2 = TrafficManager(lab_config_with_dns(2))
    result = tm2.receive(packet, 1.0)
    assert (result.action, result.reason) == ("drop", reason)
