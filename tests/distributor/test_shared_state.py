"""Several packet loops of one distributor (`[node] workers`) with `[auth]`: what one loop learns from a
sealed datagram, every loop needs — where an edge behind NAT is reached, what it announced — and the
replication telemetry belongs to the agent. In memory: the real distributor cores of two loops, a real
edge core, the messages of overlay/runtime/sharing.py between them."""

from __future__ import annotations

from pathlib import Path

from overlay.config import load_node_config
from overlay.distributor.core import PINNED, Distributor
from overlay.runtime.agent import authenticator
from overlay.runtime.sharing import ShareFilter, SharedLag
from tests.authconfig import EDGE_SERVER_V4, with_auth, with_edge
from tests.test_edge_fleet import EDGE_UNDERLAY, EdgeFleet
from tests.tm import packets as P

NAT = ("198.51.100.223", 40777)   # where the edge's datagrams come from: behind NAT


def two_loops(tmp_path: Path) -> tuple[EdgeFleet, Distributor, list[tuple]]:
    """The fleet (its distributor: loop 0), a second loop (lane 1) of the same distributor, and the
    messages loop 0 shares, thinned as a worker thins them."""
    with_edge(tmp_path, f"{EDGE_UNDERLAY[0]}:{EDGE_UNDERLAY[1]}")
    with_auth(tmp_path, source=tmp_path)
    fleet = EdgeFleet(tmp_path, nat=NAT)
    node = load_node_config(tmp_path / "distributor.toml")
    assert node.distributor is not None
    other = Distributor(node.distributor, authenticator(node, lane=1))
    sent: list[tuple] = []
    shared = ShareFilter(sent.append)
    fleet.distributor.share = shared.offer
    fleet.shared = shared  # type: ignore[attr-defined]
    return fleet, other, sent


def to_the_edge_server(fleet: EdgeFleet, loop: Distributor) -> tuple[str, tuple[str, int], int]:
    """What a loop does with a TM's output for the server behind the edge: where it sends it, from where."""
    tm = fleet.nodes["tm1"]
    datagram = tm.datagram(P.tcp("198.51.100.100", 41000, EDGE_SERVER_V4, 80, P.SYN), tm.last)
    verdict = loop.from_overlay(datagram, fleet.underlay["tm1"])
    assert verdict.dest is not None
    return verdict.action, verdict.dest, verdict.flow_hash


def test_what_one_loop_learns_of_an_edge_behind_nat_reaches_the_other(tmp_path: Path) -> None:
    fleet, other, sent = two_loops(tmp_path)
    (announce, _), = fleet.edge.announcements()
    assert fleet.distributor.from_overlay(announce, NAT).reason == "announce"
    assert to_the_edge_server(fleet, fleet.distributor) == ("forward", NAT, PINNED)
    # Negative control: the loop that did not hear the announce sends to the configured endpoint, which
    # the edge's NAT never lets through.
    assert to_the_edge_server(fleet, other)[1] == EDGE_UNDERLAY
    assert [message[:2] for message in sent] == [("learned", "edge1"), ("announced", "edge1"), ("learned", "tm1")]
    for message in sent:
        other.apply_shared(message)
    assert to_the_edge_server(fleet, other) == ("forward", NAT, PINNED)
    assert other.snapshot()["edges"] == fleet.distributor.snapshot()["edges"]
    # A loop that starts late gets the same from the agent's `shared_state`.
    late = Distributor(fleet.distributor.config)
    for message in fleet.distributor.shared_state():
        late.apply_shared(message)
    assert late.endpoint("edge1") == NAT and late.behind_nat("edge1")
    late.apply_shared(("learned", "no-such-peer", ("192.0.2.99", 1)))   # another config's peer: ignored
    assert "no-such-peer" not in late.learned


def test_an_endpoint_that_moves_per_datagram_is_shared_thinned_and_a_rebinding_at_once(tmp_path: Path) -> None:
    """An edge sends from its entropy ports: its learned endpoint moves with nearly every datagram. A new
    port waits for the next flush (any of them reaches the edge), the latest one; a new address — a NAT
    rebinding — goes at once."""
    fleet, other, sent = two_loops(tmp_path)
    (announce, _), = fleet.edge.announcements()
    for port in (40001, 40002, 40003):
        fleet.distributor.from_overlay(fleet.edge.announcements()[0][0], (NAT[0], port))
    assert [message for message in sent if message[0] == "learned"] == [("learned", "edge1", (NAT[0], 40001))]
    fleet.shared.flush()  # type: ignore[attr-defined]
    assert sent[-1] == ("learned", "edge1", (NAT[0], 40003)), "the latest port, once"
    fleet.shared.flush()  # type: ignore[attr-defined]
    assert sent[-1] == ("learned", "edge1", (NAT[0], 40003)) and len([m for m in sent if m[0] == "learned"]) == 2
    fleet.distributor.from_overlay(announce, ("198.51.100.224", 40001))
    assert sent[-2] == ("learned", "edge1", ("198.51.100.224", 40001)), "a rebinding: at once"
    for message in sent:
        other.apply_shared(message)
    assert other.endpoint("edge1") == ("198.51.100.224", 40001)


def test_a_port_is_thinned_against_what_every_loop_uses_not_against_what_this_one_sent() -> None:
    """Loop A shared port 1; loop B moved everyone to port 2 (`heard`). When A then sees port 1 again, it
    must say so at the next flush — every loop sends to port 2 now. Negative control: without `heard`, A
    compares with its own last message (port 1) and stays silent."""
    for hears in (True, False):
        sent: list[tuple] = []
        loop_a = ShareFilter(sent.append)
        loop_a.offer(("learned", "edge1", (NAT[0], 40001)))
        if hears:
            loop_a.heard(("learned", "edge1", (NAT[0], 40002)))   # from loop B, through the agent
        loop_a.offer(("learned", "edge1", (NAT[0], 40001)))
        loop_a.flush()
        assert (sent[-1:] == [("learned", "edge1", (NAT[0], 40001))] and len(sent) == 2) == hears, (hears, sent)
    sent = []
    loop_a = ShareFilter(sent.append)
    loop_a.offer(("learned", "edge1", (NAT[0], 40001)))
    loop_a.offer(("learned", "edge1", (NAT[0], 40002)))      # pending here...
    loop_a.heard(("learned", "edge1", (NAT[0], 40002)))      # ...and already shared by another loop
    loop_a.flush()
    assert len(sent) == 1, "nothing to say that every loop does not know"


def test_a_workers_replication_telemetry_goes_to_the_agent() -> None:
    sent: list[tuple] = []
    lag = SharedLag(sent.append)
    lag.fanned("tm1", 7, 10.0)
    lag.acked("tm1", "tm2", 7, 10.004)
    assert sent == [("fanned", "tm1", (7, 10.0)), ("acked", "tm1", ("tm2", 7, 10.004))]
    assert lag.status(11.0) == {}
