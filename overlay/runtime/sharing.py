"""What a node's packet loops tell each other (`[node] workers`, overlay/runtime/workers.py), thinned:
each class sits in one loop and talks to the others through the agent, which passes it on.

- `ShareFilter`: where a peer behind NAT is, what an edge announced (`Distributor.share`).
- `SharedLag`: replication telemetry, which the agent's status shows.
- `LastHeard`: which distributor an edge's loops send to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ShareFilter:
    """What a packet loop shares with the others (`Distributor.share` messages), thinned: a peer that sends
    from several ports (an edge's entropy ports) moves its learned endpoint with nearly every datagram,
    and any of those ports reaches it. A peer's first endpoint and a change of address go out at once (a
    NAT rebinding: the other loops must follow); a change of port only with `flush`, the latest one."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send
        self._sent: dict[str, tuple[str, int]] = {}
        self._pending: dict[str, tuple[str, int]] = {}

    def offer(self, message: tuple[Any, ...]) -> None:
        kind, peer, value = message
        if kind != "learned":
            self._send(message)
            return
        last = self._sent.get(peer)
        if last is not None and last[0] == value[0]:
            self._pending[peer] = value
            return
        self._pending.pop(peer, None)
        self._sent[peer] = value
        self._send(message)

    def heard(self, message: tuple[Any, ...]) -> None:
        """What another loop shared (through the agent): the endpoint every loop now uses. A later port
        seen here is thinned against that, not against what this loop last sent — else a loop would stay
        silent on a port the others have since moved away from."""
        kind, peer, value = message
        if kind == "learned":
            self._sent[peer] = value
            pending = self._pending.get(peer)
            if pending is not None and (pending == value or pending[0] != value[0]):
                # Nothing new, or a port at an address the peer has since moved away from (a rebinding
                # another loop saw first): sending it would move every loop back for a while.
                del self._pending[peer]

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for peer, value in pending.items():
            if self._sent.get(peer) != value:
                self._sent[peer] = value
                self._send(("learned", peer, value))


class SharedLag:
    """A worker's stand-in for `replication.StandbyLag`: a batch fanned out here may be acknowledged at
    another loop, so the events go to the agent, whose StandbyLag the status shows."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send

    def fanned(self, origin: str, sequence: int, now: float) -> None:
        self._send(("fanned", origin, (sequence, now)))

    def acked(self, origin: str, standby: str, sequence: int, now: float) -> None:
        self._send(("acked", origin, (standby, sequence, now)))

    def status(self, now: float) -> dict[str, dict]:
        return {}


class LastHeard:
    """An edge's loops agreeing on a distributor. An edge sends to the distributor it last heard from
    (overlay/uplink.py: a dead one stops sending, a live one takes over); a loop that seldom or never
    receives would stay with its first choice, up or down. So each loop says which distributor it follows
    when that changed, with when it last heard from it (`EdgeNode.heard_at`: the loops' clock is the
    machine's monotonic clock, one for all processes) — checked every STATS_INTERVAL, so a choice that
    flips per datagram (two distributors answering) costs one message a second at most — and follows what
    another loop heard more recently than anything it heard itself: the newest datagram decides, as in one
    loop, not the order the messages happen to arrive in."""

    def __init__(self, node: Any, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._node = node
        self._send = send
        self._said = node.last
        self._adopted = float("-inf")   # when the choice we took from another loop was heard there

    def newest(self) -> tuple[str, float]:
        """The choice here and when it was heard (for a loop that starts later)."""
        node = self._node
        return (node.last, node.heard_at) if node.heard_at >= self._adopted else (node.last, self._adopted)

    def flush(self) -> None:
        node = self._node
        if node.last != self._said and node.heard_at > self._adopted:
            self._said = node.last
            self._send(("heard", node.last, node.heard_at))

    def heard(self, message: tuple[Any, ...]) -> None:
        _, name, at = message
        node = self._node
        if name in node.by_name and at > max(node.heard_at, self._adopted):
            node.last = self._said = name
            self._adopted = at
