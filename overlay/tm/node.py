"""The TM node's sans-I/O core: GRE-in-UDP datagrams in, datagrams and TUN packets out — the TM's
counterpart of `Distributor.from_overlay`. It owns the overlay protocol around the traffic manager:

- only configured distributors may use this TM: anyone else could inject packets into its connection
  table and management stack, or use the keepalive echo as a reflector. With authentication on
  (overlay/auth.py) a distributor is known by its key — from any address, so NAT in between is fine —
  and everything we send is sealed to it; without, by its underlay address (which anyone can forge);
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
from overlay.auth import Authenticator
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
    def __init__(self, core: TrafficManager, distributors: dict[str, Peer], fleet_id: int | None,
                 authenticator: Authenticator | None = None) -> None:
        self.core = core
        self.peers: Counter[Peer] = Counter()  # packets received per distributor
        self.drops: Counter[str] = Counter()  # datagrams refused before the core saw them, by reason
        self.keepalives_echoed = 0
        self.configure(distributors, fleet_id, authenticator)

    def configure(self, distributors: dict[str, Peer], fleet_id: int | None,
                  authenticator: Authenticator | None = None) -> None:
        """The distributors allowed to use this TM (name → the (address, port) answers go to), our fleet
        id, and the authenticator (keys by the same names)."""
        if not distributors:
            raise ValueError("a TM needs at least one distributor")
        self.auth = authenticator
        self._by_name = dict(distributors)
        self._by_address = {address: (name, (address, port)) for name, (address, port) in distributors.items()}
        self._fleet_id = fleet_id or 0
        self._key = gre.make_key(fleet_id, 0)
        if not hasattr(self, "last_distributor") or self.last_distributor not in self._by_name:
            self.last_distributor: str = next(iter(self._by_name))

    def from_overlay(self, payload: bytes, peer: Peer, now: float) -> NodeOutput:
        if self.auth is not None:
            opened = self.auth.open(payload)
            if isinstance(opened, str):
                self.drops[opened] += 1   # forged, replayed, plain or of an unknown key: never decapsulated
                return _NOTHING
            name, payload = opened
        else:
            known = self._by_address.get(peer[0])
            if known is None:
                self.drops["unknown-peer"] += 1
                return _NOTHING
            name = known[0]
        distributor = self._by_name[name]
        frame = gre.decapsulate(payload)
        if frame is None:
            self.drops["malformed:gre"] += 1
            return _NOTHING
        if gre.key_fleet(frame.key) != self._fleet_id:
            self.drops["wrong-fleet-id"] += 1
            return _NOTHING
        if payload[2:4] == _KEEPALIVE:
            self.keepalives_echoed += 1
            # To the very port it came from: the health checker's socket.
            return (SEND, payload if self.auth is None else self.auth.seal(payload, name), peer)
        if frame.protocol not in _IP_PROTOCOLS:
            self.drops["unsupported-gre-protocol"] += 1
            return _NOTHING
        # Answers go to the distributor's configured port, whichever of its source ports this came from.
        self.last_distributor = name
        self.peers[distributor] += 1
        result = self.core.receive(frame.inner, now, _mark(frame.key))
        action = result.action
        if action == BOUNCE:
            # Second chance: the same packet, the same key, back to the distributor, which hands it to
            # the draining TM the key names.
            bounced = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.SECOND_CHANCE_PROTOCOL)
            return (SEND, self._seal(bounced, name), distributor)
        if action == DECLINE:
            declined = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.DECLINED_PROTOCOL)
            return (SEND, self._seal(declined, name), distributor)
        return self._output(result, name)

    def from_tun(self, packet: bytes, now: float) -> NodeOutput:
        """What the TM host's own stack sent (its management addresses' answers)."""
        return self._output(self.core.from_local(packet, now), self.last_distributor)

    def announcements(self) -> list[tuple[bytes, Peer]]:
        """A sealed announce for every distributor: behind NAT, how a distributor learns where we are,
        and what keeps the NAT's binding alive (`underlay.announce_interval`). Nothing without auth."""
        if self.auth is None:
            return []
        announce = gre.encapsulate(b"", key=self._key, protocol=gre.ANNOUNCE_PROTOCOL)
        return [(self.auth.seal(announce, name), endpoint) for name, endpoint in self._by_name.items()]

    def _seal(self, gre_payload: bytes, name: str) -> bytes:
        return gre_payload if self.auth is None else self.auth.seal(gre_payload, name)

    def _output(self, result: TMResult, name: str) -> NodeOutput:
        distributor = self._by_name[name]
        if result.action == OVERLAY:
            if result.released:
                packets = (result.packet, *result.released)
                return (SEND_ALL, [self._seal(gre.encapsulate(packet, key=self._key), name) for packet in packets], distributor)  # type: ignore[arg-type]
            return (SEND, self._seal(gre.encapsulate(result.packet, key=self._key), name), distributor)  # type: ignore[arg-type]
        if result.action == LOCAL:
            return (TUN, result.packet, None)
        return _NOTHING
