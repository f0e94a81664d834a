"""The TM node's sans-I/O core: GRE-in-UDP datagrams in, datagrams and TUN packets out — the TM's
counterpart of `Distributor.from_overlay`. It owns the overlay protocol around the traffic manager:

- only configured distributors may use this TM (by underlay address): anyone else could inject packets
  into its connection table and management stack, or use the keepalive echo as a reflector;
- the fleet id in the GRE key must be ours (another fleet's overlay on the same underlay is refused);
- a keepalive (GRE 0x88B5) is echoed unchanged, before anything else: it measures the tunnel and the
  agent, not the NAT core;
- the distributor's mark (the key's low half) becomes the core's second-chance mode, and a packet the
  core bounces or declines goes back under the second-chance or declined protocol, key echoed.

Every datagram it does not pass on is counted by reason (`drops`). The runtime (`runtime/tm_agent.py`)
only moves bytes: it sends `SEND` results to their peer and writes `TUN` results into the TUN.
"""

from __future__ import annotations

from collections import Counter

from overlay import gre
from overlay.tm.core import BOUNCE, DECLINE, LAST_CHANCE, LOCAL, OVERLAY, SECOND_CHANCE, UNMARKED, TrafficManager
from overlay.tm.core import TMResult

Peer = tuple[str, int]

# What the runtime does with a result: (SEND, datagram, peer) | (TUN, packet, None) | (NOTHING, None, None)
# | (SEND_ALL, [datagram, ...], peer) — a first fragment and the fragments that were held for it.
SEND = 1
TUN = 2
SEND_ALL = 3
NOTHING = 0
NodeOutput = tuple[int, bytes | list[bytes] | None, Peer | None]
_NOTHING: NodeOutput = (NOTHING, None, None)

_KEEPALIVE = gre.KEEPALIVE_PROTOCOL.to_bytes(2, "big")
_IP_PROTOCOLS = (gre.PROTO_IPV4, gre.PROTO_IPV6)


def _mark(key: int | None) -> int:
    low = gre.key_fallback(key)
    if not low:
        return UNMARKED
    return LAST_CHANCE if low == gre.LAST_CHANCE else SECOND_CHANCE


class TMNode:
    def __init__(self, core: TrafficManager, distributors: list[Peer], fleet_id: int | None) -> None:
        self.core = core
        self.peers: Counter[Peer] = Counter()  # packets received per distributor
        self.drops: Counter[str] = Counter()  # datagrams refused before the core saw them, by reason
        self.keepalives_echoed = 0
        self.configure(distributors, fleet_id)

    def configure(self, distributors: list[Peer], fleet_id: int | None) -> None:
        """The distributors allowed to use this TM ((address, port) answers go to) and our fleet id."""
        if not distributors:
            raise ValueError("a TM needs at least one distributor")
        self._distributors = {address: (address, port) for address, port in distributors}
        self._fleet_id = fleet_id or 0
        self._key = gre.make_key(fleet_id, 0)
        if not hasattr(self, "last_distributor") or self.last_distributor[0] not in self._distributors:
            self.last_distributor: Peer = next(iter(self._distributors.values()))

    def from_overlay(self, payload: bytes, peer: Peer, now: float) -> NodeOutput:
        distributor = self._distributors.get(peer[0])
        if distributor is None:
            self.drops["unknown-peer"] += 1
            return _NOTHING
        frame = gre.decapsulate(payload)
        if frame is None:
            self.drops["malformed:gre"] += 1
            return _NOTHING
        if gre.key_fleet(frame.key) != self._fleet_id:
            self.drops["wrong-fleet-id"] += 1
            return _NOTHING
        if payload[2:4] == _KEEPALIVE:
            self.keepalives_echoed += 1
            return (SEND, payload, peer)  # to the very port it came from: the health checker's socket
        if frame.protocol not in _IP_PROTOCOLS:
            self.drops["unsupported-gre-protocol"] += 1
            return _NOTHING
        # Answers go to the distributor's configured port, whichever of its source ports this came from.
        self.last_distributor = distributor
        self.peers[distributor] += 1
        result = self.core.receive(frame.inner, now, _mark(frame.key))
        action = result.action
        if action == BOUNCE:
            # Second chance: the same packet, the same key, back to the distributor, which hands it to
            # the draining TM the key names.
            return (SEND, gre.encapsulate(frame.inner, key=frame.key, protocol=gre.SECOND_CHANCE_PROTOCOL), distributor)
        if action == DECLINE:
            return (SEND, gre.encapsulate(frame.inner, key=frame.key, protocol=gre.DECLINED_PROTOCOL), distributor)
        return self._output(result, distributor)

    def from_tun(self, packet: bytes, now: float) -> NodeOutput:
        """What the TM host's own stack sent (its management addresses' answers)."""
        return self._output(self.core.from_local(packet, now), self.last_distributor)

    def _output(self, result: TMResult, distributor: Peer) -> NodeOutput:
        if result.action == OVERLAY:
            if result.released:
                packets = (result.packet, *result.released)
                return (SEND_ALL, [gre.encapsulate(packet, key=self._key) for packet in packets], distributor)  # type: ignore[arg-type]
            return (SEND, gre.encapsulate(result.packet, key=self._key), distributor)  # type: ignore[arg-type]
        if result.action == LOCAL:
            return (TUN, result.packet, None)
        return _NOTHING
