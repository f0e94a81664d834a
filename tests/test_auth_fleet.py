"""The whole data path in memory with authentication on: the real distributor core and three real TM node
cores exchanging sealed datagrams (tests/test_fleet_in_memory.py's fleet, keys from tests/authconfig.py).

Proves: every conversation still meets one TM both ways; a host on the underlay that forges a TM's or the
distributor's source address and sends well-formed GRE-in-UDP gets nothing into any TUN or TM (counted);
a captured datagram replayed is refused; a node with the wrong key cannot join; a NAT'd TM is reached where
its sealed datagrams come from. Negative control: with authentication off, the same forgery gets through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay import auth, gre
from overlay.auth import AuthConfig, Authenticator
from overlay.distributor.core import PINNED
from overlay.tm.node import NOTHING, SEND
from tests.authconfig import with_auth
from tests.test_fleet_in_memory import CLIENTS, VIP, Fleet, exchange, open_connection, tcp

SERVER = "203.0.113.10:80"


@pytest.fixture()
def sealed_fleet(tmp_path: Path) -> Fleet:
    with_auth(tmp_path)
    return Fleet(config=tmp_path)


def forged_from_a_tm(fleet: Fleet) -> bytes:
    """A server's reply as tm1 would send it, plain GRE — what a forger on the underlay can make."""
    return gre.encapsulate(tcp(f"{VIP}:80", "198.51.100.100:40000", "SA"))


def test_every_conversation_meets_one_tm_through_sealed_datagrams(sealed_fleet: Fleet) -> None:
    used = set()
    for client in CLIENTS[:30]:
        tm, server_end = open_connection(sealed_fleet, client)
        forward_tms, back_tms, delivered = exchange(sealed_fleet, client, server_end)
        assert delivered and forward_tms == back_tms == [tm]
        used.add(tm)
    assert used == set(sealed_fleet.tms) and sealed_fleet.invalid() == 0


def test_a_forged_datagram_from_a_tms_address_reaches_no_tun(sealed_fleet: Fleet) -> None:
    verdict = sealed_fleet.distributor.from_overlay(forged_from_a_tm(sealed_fleet), sealed_fleet.underlay["tm1"])
    assert (verdict.action, verdict.reason) == ("drop", auth.UNAUTHENTICATED)
    assert sealed_fleet.distributor.counters_drop[auth.UNAUTHENTICATED] == 1


def test_a_forged_datagram_from_the_distributors_address_reaches_no_tm(sealed_fleet: Fleet) -> None:
    node = sealed_fleet.nodes["tm1"]
    forged = gre.encapsulate(tcp("198.51.100.100:40000", f"{VIP}:80", "S"))
    assert node.from_overlay(forged, sealed_fleet.dist_underlay, 1.0) == (NOTHING, None, None)
    keepalive = gre.encapsulate(b"OVKA" + bytes(28), protocol=gre.KEEPALIVE_PROTOCOL)
    assert node.from_overlay(keepalive, sealed_fleet.dist_underlay, 1.0) == (NOTHING, None, None), "no reflector"
    assert node.drops == {auth.UNAUTHENTICATED: 2}
    assert node.core.counters()["packets.received"] == 0 and node.keepalives_echoed == 0


def test_negative_control_without_authentication_the_forgery_gets_through() -> None:
    fleet = Fleet()
    verdict = fleet.distributor.from_overlay(forged_from_a_tm(fleet), fleet.underlay["tm1"])
    assert (verdict.action, verdict.reason) == ("forward", "from-tm"), "written into the protected network"
    node = fleet.nodes["tm1"]
    forged = gre.encapsulate(tcp("198.51.100.100:40000", f"{VIP}:80", "S"))
    assert node.from_overlay(forged, fleet.dist_underlay, 1.0)[0] == SEND
    assert node.core.counters()["conntrack.created"] == 1, "a forged SYN opened state"


def test_a_replayed_datagram_is_refused(sealed_fleet: Fleet) -> None:
    verdict = sealed_fleet.distributor.from_tun(tcp("198.51.100.100:40000", f"{VIP}:80", "S"))
    assert verdict.action == "tm" and verdict.packet is not None
    node = sealed_fleet.nodes[verdict.tm]
    assert node.from_overlay(verdict.packet, sealed_fleet.dist_underlay, 1.0)[0] == SEND
    assert node.from_overlay(verdict.packet, sealed_fleet.dist_underlay, 1.1) == (NOTHING, None, None)
    assert node.drops == {auth.REPLAYED: 1} and node.core.counters()["packets.received"] == 1


def test_a_node_with_the_wrong_key_cannot_join(sealed_fleet: Fleet) -> None:
    """An impostor with its own key pair, knowing every public key, posing as tm1."""
    distributor_key = next(iter(sealed_fleet.nodes["tm1"].auth.config.peers.values()))  # type: ignore[union-attr]
    impostor = Authenticator(AuthConfig("authenticate", (auth.generate_private_key(),), {"dist1": distributor_key}), 10**18)
    sealed = impostor.seal(forged_from_a_tm(sealed_fleet), "dist1")
    verdict = sealed_fleet.distributor.from_overlay(sealed, sealed_fleet.underlay["tm1"])
    assert (verdict.action, verdict.reason) == ("drop", auth.UNKNOWN_KEY)


def test_a_tm_behind_nat_is_reached_where_its_sealed_datagrams_come_from(sealed_fleet: Fleet) -> None:
    """tm2's packets arrive from its NAT's public endpoint: the distributor answers there, also after the
    NAT rebinds the TM to another port (roaming)."""
    core = sealed_fleet.distributor
    node = sealed_fleet.nodes["tm2"]
    for public in (("198.51.100.250", 31000), ("198.51.100.250", 31999)):
        (announce, _), *_ = node.announcements()
        assert core.from_overlay(announce, public).reason == "announce"
        assert core.endpoint("tm2") == public
        client = next(c for c in CLIENTS if core.from_tun(tcp(c, f"{VIP}:80", "S")).tm == "tm2")
        verdict = core.from_tun(tcp(client, f"{VIP}:80", "S"))
        # From the well-known port, the one its NAT binding knows: a port-restricted NAT drops the rest.
        assert (verdict.dest, verdict.flow_hash) == (public, PINNED)
        assert core.keepalive_datagram("tm2", b"probe")[1] == public and core.behind_nat("tm2")
    assert core.endpoint("tm1") == sealed_fleet.underlay["tm1"], "a TM not heard from is reached as configured"
    other = next(c for c in CLIENTS if core.from_tun(tcp(c, f"{VIP}:80", "S")).tm == "tm1")
    assert core.from_tun(tcp(other, f"{VIP}:80", "S")).flow_hash >= 0, "entropy ports for a TM reached directly"


def test_an_unsealed_announce_never_moves_an_endpoint() -> None:
    fleet = Fleet()
    announce = gre.encapsulate(b"", protocol=gre.ANNOUNCE_PROTOCOL)
    assert fleet.distributor.from_overlay(announce, ("198.51.100.250", 31000)).reason == "announce-unauthenticated"
    assert fleet.distributor.endpoint("tm2") == fleet.underlay["tm2"]
