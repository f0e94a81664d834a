"""An edge's packet loops agree on the distributor they send to (`workers.LastHeard`). An edge follows the
distributor it last heard from; with several loops, one that does not receive would keep its first choice
— a distributor that may be gone. The loops tell each other (through the agent) when they changed, at most
once a flush, with when they heard it, and follow what another loop heard more recently. Negative control:
a loop on its own keeps sending to the first distributor."""

from __future__ import annotations

import ipaddress

from overlay import gre
from overlay.edge import EdgeNode
from overlay.runtime.sharing import LastHeard
from overlay.uplink import SEND
from tests.tm.packets import SYN, tcp

DISTRIBUTORS = {"dist1": ("192.0.2.2", 4754), "dist2": ("192.0.2.12", 4754)}
SERVED = "203.0.113.12"


def loop() -> EdgeNode:
    return EdgeNode((ipaddress.ip_network(f"{SERVED}/32"),), DISTRIBUTORS, None)


def datagram() -> bytes:
    return gre.encapsulate(tcp("198.51.100.100", 41000, SERVED, 80, SYN))


def sends_to(edge: EdgeNode) -> tuple[str, int]:
    action, _, peer = edge.from_tun(tcp(SERVED, 80, "198.51.100.100", 41000, SYN))
    assert action == SEND and peer is not None
    return peer


def test_a_loop_that_does_not_receive_follows_the_one_that_did() -> None:
    hears, deaf = loop(), loop()
    said: list[tuple] = []
    shared = [LastHeard(hears, said.append), LastHeard(deaf, said.append)]
    assert sends_to(hears) == sends_to(deaf) == DISTRIBUTORS["dist1"]
    # dist1 is gone; dist2 now sends to the edge, and one loop hears it.
    hears.from_overlay(datagram(), DISTRIBUTORS["dist2"], 5.0)
    assert sends_to(hears) == DISTRIBUTORS["dist2"]
    assert sends_to(deaf) == DISTRIBUTORS["dist1"], "the negative control: on its own it stays with dist1"
    for following in shared:
        following.flush()
    assert said == [("heard", "dist2", 5.0)], "the loop that changed says so, once, with when"
    shared[1].heard(said[0])
    assert sends_to(deaf) == DISTRIBUTORS["dist2"]
    for following in shared:
        following.flush()
    assert said == [("heard", "dist2", 5.0)], "nothing new to say: nothing said"
    shared[1].heard(("heard", "not-a-distributor", 9.0))
    assert sends_to(deaf) == DISTRIBUTORS["dist2"], "a name the config does not have is ignored"


def test_the_newest_datagram_decides_not_the_order_the_messages_arrive_in() -> None:
    """Loop 1 last heard dist1 at t=1 (just before dist1 died); loop 2 heard dist2 at t=2. Whichever of their
    messages reaches a loop last, every loop ends on dist2 — as one loop would have."""
    for order in ((0, 1), (1, 0)):
        first, second, third = loop(), loop(), loop()
        said: list[tuple] = []
        loops = [LastHeard(first, said.append), LastHeard(second, said.append), LastHeard(third, said.append)]
        first.from_overlay(datagram(), DISTRIBUTORS["dist2"], 0.5)
        loops[0].flush()                  # dist2 at 0.5
        first.from_overlay(datagram(), DISTRIBUTORS["dist1"], 1.0)
        second.from_overlay(datagram(), DISTRIBUTORS["dist2"], 2.0)
        said.clear()
        loops[0].flush()
        loops[1].flush()
        assert sorted(said, key=lambda m: m[2]) == [("heard", "dist1", 1.0), ("heard", "dist2", 2.0)]
        for index in order:
            for receiver in loops:
                receiver.heard(said[index])
        assert [sends_to(edge) for edge in (first, second, third)] == [DISTRIBUTORS["dist2"]] * 3, order
        assert loops[2].newest() == ("dist2", 2.0)
