"""A node's link to its distributors — what a TM and an edge share: who may talk to us, the fleet id, the
keepalive echo, sealing, and announces. Sans-I/O.

- Only configured distributors may use this node: anyone else could inject packets, or use the keepalive
  echo as a reflector. With authentication on (overlay/auth.py) a distributor is known by its key — from
  any address, so NAT in between is fine — and everything we send is sealed to it; without, by its
  underlay address (which anyone can forge).
- The fleet id in the GRE key must be ours (another fleet's overlay on the same underlay is refused).
- A keepalive (GRE 0x88B5) is echoed unchanged, before anything else: it measures the tunnel and the
  agent, not the core behind it.
- Announces (GRE 0x88B8, sealed, every `underlay.announce_interval`): behind NAT, how a distributor
  learns where we are, and what keeps the NAT's binding alive.
"""

from __future__ import annotations

from collections import Counter

from overlay import gre
from overlay.auth import Authenticator

Peer = tuple[str, int]

# What the runtime does with a node's result: (SEND, datagram, peer) | (TUN, packet, None) |
# (SEND_ALL, [datagram, ...], peer) | (NOTHING, None, None) | (FLUSH, None, None).
NOTHING = 0
SEND = 1
TUN = 2
SEND_ALL = 3
FLUSH = 4   # nothing to send now, but replication must be flushed soon: a packet waits for its standbys
NodeOutput = tuple[int, bytes | list[bytes] | None, Peer | None]
NO_OUTPUT: NodeOutput = (NOTHING, None, None)

_KEEPALIVE = gre.KEEPALIVE_PROTOCOL.to_bytes(2, "big")


class Uplink:
    def __init__(self, distributors: dict[str, Peer], fleet_id: int | None,
                 authenticator: Authenticator | None = None) -> None:
        self.peers: Counter[Peer] = Counter()  # packets received per distributor
        self.drops: Counter[str] = Counter()  # datagrams refused before the core saw them, by reason
        self.keepalives_echoed = 0
        self.configure(distributors, fleet_id, authenticator)

    def configure(self, distributors: dict[str, Peer], fleet_id: int | None,
                  authenticator: Authenticator | None = None) -> None:
        """The distributors allowed to use this node (name → the (address, port) answers go to), our fleet
        id, and the authenticator (keys by the same names)."""
        if not distributors:
            raise ValueError("a node needs at least one distributor")
        self.auth = authenticator
        self.by_name = dict(distributors)
        self._by_address = {address: name for name, (address, _) in distributors.items()}
        self._fleet_id = fleet_id or 0
        self.key = gre.make_key(fleet_id, 0)
        # The GRE header of what we send, IPv4 and IPv6 inner: built once, not per packet.
        self._headers = (gre.encapsulate(b"\x45", key=self.key)[:-1], gre.encapsulate(b"\x60", key=self.key)[:-1])
        if not hasattr(self, "last") or self.last not in self.by_name:
            self.last: str = next(iter(self.by_name))   # the distributor that last sent us something

    def receive(self, payload: bytes, peer: Peer) -> tuple[str, gre.Decapsulated | None, NodeOutput]:
        """(distributor name, GRE frame for the core, NO_OUTPUT) — or, with no frame, what to do instead:
        the keepalive echo, or nothing (refused and counted)."""
        if self.auth is not None:
            opened = self.auth.open(payload)
            if isinstance(opened, str):
                self.drops[opened] += 1   # forged, replayed, plain or of an unknown key: never decapsulated
                return "", None, NO_OUTPUT
            name, payload = opened
        else:
            found = self._by_address.get(peer[0])
            if found is None:
                self.drops["unknown-peer"] += 1
                return "", None, NO_OUTPUT
            name = found
        frame = gre.decapsulate(payload)
        if frame is None:
            self.drops["malformed:gre"] += 1
            return name, None, NO_OUTPUT
        if gre.key_fleet(frame.key) != self._fleet_id:
            self.drops["wrong-fleet-id"] += 1
            return name, None, NO_OUTPUT
        if payload[2:4] == _KEEPALIVE:
            self.keepalives_echoed += 1
            return name, None, (SEND, self.seal(payload, name), peer)  # to the very port it came from: the prober's
        if frame.protocol != gre.PROTO_IPV4 and frame.protocol != gre.PROTO_IPV6 \
                and frame.protocol != gre.REPLICATION_PROTOCOL and frame.protocol != gre.REPLICATION_ACK_PROTOCOL:
            self.drops["unsupported-gre-protocol"] += 1
            return name, None, NO_OUTPUT
        self.last = name
        self.peers[self.by_name[name]] += 1
        return name, frame, NO_OUTPUT

    def seal(self, gre_payload: bytes, name: str) -> bytes:
        return gre_payload if self.auth is None else self.auth.seal(gre_payload, name)

    def datagram(self, packet: bytes, name: str) -> bytes:
        """An inner packet as it goes to distributor `name`: encapsulated with our fleet id, sealed."""
        payload = self._headers[bool(packet) and packet[0] >> 4 == 6] + packet
        return payload if self.auth is None else self.auth.seal(payload, name)

    def send(self, packet: bytes, name: str) -> NodeOutput:
        return (SEND, self.datagram(packet, name), self.by_name[name])

    def announcements(self) -> list[tuple[bytes, Peer]]:
        """A sealed announce for every distributor (nothing without auth: endpoints are never learned from
        unauthenticated datagrams)."""
        if self.auth is None:
            return []
        announce = gre.encapsulate(b"", key=self.key, protocol=gre.ANNOUNCE_PROTOCOL)
        return [(self.auth.seal(announce, name), endpoint) for name, endpoint in self.by_name.items()]
