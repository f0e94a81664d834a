"""The edge node's sans-I/O core: a host in another cloud (a server VM, a client site) joins the overlay.

The edge serves `prefixes` (its addresses: a server's service address, a client site's): the host's
packets *from* them enter the TUN (policy routing, runtime/netsetup.py) and go, encapsulated and sealed,
to a distributor, which decides them like any packet (a server's reply is hashed to its client's TM);
the distributor forwards packets *to* them here, and we write them into the TUN. So a server in cloud C
answers through the distributor and its TMs without any change to cloud C's routing.

The link to the distributors (keys, fleet id, keepalive echo, announces that keep a NAT's binding and
tell the distributor where we are) is `overlay.uplink.Uplink`, shared with the TM.

Refused and counted (`drops`): packets from the TUN whose source is not one of our prefixes (the answer
could never come back here), packets from the overlay to an address we do not serve, and whatever the
uplink refuses. Which distributor gets a packet: the one that last sent us something, so a reply
follows its request; the first configured one before any.
"""

from __future__ import annotations

import ipaddress

from overlay import gre
from overlay.auth import Authenticator
from overlay.uplink import NO_OUTPUT, TUN, NodeOutput, Peer, Uplink

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EdgeNode(Uplink):
    def __init__(self, prefixes: tuple[IPNetwork, ...], distributors: dict[str, Peer], fleet_id: int | None,
                 authenticator: Authenticator | None = None) -> None:
        self.set_prefixes(prefixes)
        self.sent = 0
        self.delivered = 0
        self.heard_at = float("-inf")   # when `last` was last heard from (the caller's clock)
        super().__init__(distributors, fleet_id, authenticator)

    def set_prefixes(self, prefixes: tuple[IPNetwork, ...]) -> None:
        if not prefixes:
            raise ValueError("an edge serves at least one prefix")
        self.prefixes = prefixes
        self._v4 = [(int(p.network_address), int(p.netmask)) for p in prefixes if p.version == 4]
        self._v6 = [(int(p.network_address), int(p.netmask)) for p in prefixes if p.version == 6]

    def announcements(self) -> list[tuple[bytes, Peer]]:
        """Sealed announces that also say which prefixes we serve (one per line): the distributor shows
        them beside its own config's, so a mismatch is visible (it never routes by them)."""
        if self.auth is None:
            return []
        announce = gre.encapsulate("\n".join(str(prefix) for prefix in self.prefixes).encode(), key=self.key,
                                   protocol=gre.ANNOUNCE_PROTOCOL)
        return [(self.auth.seal(announce, name), endpoint) for name, endpoint in self.by_name.items()]

    def serves(self, version: int, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        return any(value & mask == network for network, mask in (self._v4 if version == 4 else self._v6))

    def from_tun(self, packet: bytes) -> NodeOutput:
        """A packet the host routed into the TUN: to the distributor, if it is from an address we serve."""
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            source = packet[12:16]
        elif version == 6 and len(packet) >= 40:
            source = packet[8:24]
        else:
            self.drops["malformed:tun"] += 1
            return NO_OUTPUT
        if not self.serves(version, source):
            self.drops["source-not-served"] += 1
            return NO_OUTPUT
        self.sent += 1
        return self.send(packet, self.last)

    def from_overlay(self, payload: bytes, peer: Peer, now: float) -> NodeOutput:
        """A datagram from a distributor: packets for the addresses we serve go into the TUN."""
        name, frame, instead = self.receive(payload, peer)
        if frame is None:
            return instead   # a keepalive echo, or refused
        self.heard_at = now   # `receive` made `name` the distributor we follow
        if frame.protocol == gre.REPLICATION_PROTOCOL:
            self.drops["unsupported-gre-protocol"] += 1    # TM state: never for an edge
            return NO_OUTPUT
        inner = frame.inner
        version = inner[0] >> 4 if inner else 0
        if not (version == 4 and len(inner) >= 20 or version == 6 and len(inner) >= 40):
            self.drops["malformed:inner"] += 1
            return NO_OUTPUT
        if not self.serves(version, inner[16:20] if version == 4 else inner[24:40]):
            self.drops["destination-not-served"] += 1
            return NO_OUTPUT
        self.delivered += 1
        return (TUN, inner, None)
