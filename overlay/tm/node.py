"""The TM node's sans-I/O core: GRE-in-UDP datagrams in, datagrams and TUN packets out — the TM's
counterpart of `Distributor.from_overlay`. The link to the distributors (who may talk to us, the fleet
id, keepalives, sealing, announces) is `overlay.uplink.Uplink`, shared with the edge; here:

- the distributor's mark (the key's low half) becomes the core's second-chance mode, and a packet the
  core bounces or declines goes back under the second-chance or declined protocol, key echoed;
- what the core passes goes back to the distributor it came from; what is for a management address goes
  into the TUN, where the host's own stack answers it.

Every datagram it does not pass on is counted by reason (`drops`). The runtime (`runtime/tm_agent.py`)
only moves bytes: it sends `SEND` results to their peer and writes `TUN` results into the TUN.
"""

from __future__ import annotations

from typing import Any

from overlay import compiled, gre
from overlay.auth import Authenticator
from overlay.tm.core import BOUNCE, DECLINE, DEFER, LAST_CHANCE, LOCAL, OVERLAY, SECOND_CHANCE, UNMARKED, TrafficManager
from overlay.tm.core import TMResult
from overlay.uplink import FLUSH, NO_OUTPUT, NOTHING, SEND, SEND_ALL, TUN, NodeOutput, Peer, Uplink

__all__ = ["TMNode", "NodeOutput", "FLUSH", "NOTHING", "SEND", "SEND_ALL", "SEND_EACH", "TUN"]

# Datagrams each to its own destination, [(datagram, destination)]: what the compiled fast path sends
# (a TM node's own output kind, after overlay.uplink's).
SEND_EACH = 5

_FLUSH: NodeOutput = (FLUSH, None, None)


def _mark(key: int | None) -> int:
    low = gre.key_fallback(key)
    if not low:
        return UNMARKED
    return LAST_CHANCE if low == gre.LAST_CHANCE else SECOND_CHANCE


class TMNode(Uplink):
    def __init__(self, core: TrafficManager, distributors: dict[str, Peer], fleet_id: int | None,
                 authenticator: Authenticator | None = None, *, fast_path: bool = True) -> None:
        self.core = core
        # False sends every datagram through the full path (`_from_overlay`): for the differential test.
        self.fast_path = fast_path
        super().__init__(distributors, fleet_id, authenticator)

    def configure(self, distributors: dict[str, Peer], fleet_id: int | None,
                  authenticator: Authenticator | None = None) -> None:
        super().configure(distributors, fleet_id, authenticator)
        # The fast path's view of the same settings: a known distributor by underlay address → (its name,
        # where answers go); the GRE headers it takes → where the inner packet starts. With authentication
        # nothing is known by address (every datagram must be opened first): the full path, always.
        self._fast_peers: dict[str, tuple[str, Peer]] = {} if authenticator is not None else {
            address: (name, self.by_name[name]) for address, name in self._by_address.items()}
        # GRE flags and protocol: a key and nothing else (its fleet half is checked apart, its mark is any),
        # or no key at all — which is fleet id 0. No checksum, no sequence number.
        self._fast_fleet = (fleet_id or 0).to_bytes(2, "big")
        self._fast_headers: dict[bytes, int] = {}
        for protocol in (gre.PROTO_IPV4, gre.PROTO_IPV6):
            self._fast_headers[gre.FLAG_KEY.to_bytes(2, "big") + protocol.to_bytes(2, "big")] = 8
            if not fleet_id:
                self._fast_headers[bytes(2) + protocol.to_bytes(2, "big")] = 4

    def compiled_state(self) -> tuple[Any, ...] | None:
        """What `_fastio.translate` (`from_overlay`'s fast path for a receive batch, in C) needs; None
        without the extension, with the fast path off, or with authentication (nothing is known by address).
        Built per batch (a reload replaces some of its parts); their contents are read and changed live."""
        if compiled.translate is None or not self.fast_path or not self._fast_peers:
            return None
        core_parts = self.core.compiled_parts()
        # (peers by address, GRE headers, fleet id bytes, the core's objects..., the prefixes, the peer counts)
        return (self._fast_peers, self._fast_headers, self._fast_fleet, *core_parts[:7], self._headers,
                *core_parts[7:], self.peers)

    def from_overlay_batch(self, items: list[tuple[bytes, Peer]], now: float) -> list[NodeOutput]:
        """A receive batch, [(payload, peer)]: what `from_overlay` gives for each, in order — the fast path
        in C (`_fastio.translate`) for as many as it serves, as one (SEND_EACH, [(datagram, destination)],
        None); the first it does not serve through `from_overlay`, then on from the next."""
        state = self.compiled_state()
        if state is None:
            return [self.from_overlay(payload, peer, now) for payload, peer in items]
        outputs: list[NodeOutput] = []
        index, count = 0, len(items)
        translate = compiled.translate
        while index < count:
            sends, stop, received, last = translate(items, index, state, now)  # type: ignore[misc]
            if received:
                self.core.count_received(received)
                self.last = last
                outputs.append((SEND_EACH, sends, None))  # type: ignore[arg-type]
            if stop < count:
                outputs.append(self.from_overlay(*items[stop], now))
                stop += 1
                state = self.compiled_state()
                if state is None:
                    return outputs + [self.from_overlay(payload, peer, now) for payload, peer in items[stop:]]
            index = stop
        return outputs

    def from_overlay_train(self, payloads: list[bytes], peer: Peer, now: float) -> list[NodeOutput]:
        """A UDP GRO train from one peer (a distributor's GSO send): what `from_overlay` gives for each of
        its datagrams, in order. Where the fast path passes the first of a run of one TCP connection
        (`flow_run`: the same GRE header, headers differing only as one stream's segments do), the rest of
        the run is translated together (`TrafficManager.forward_run`) and leaves as one SEND_ALL."""
        outputs: list[NodeOutput] = []
        index, count = 0, len(payloads)
        fast = self.fast_path and self._fast_peers.get(peer[0])
        if fast and count > 1 and compiled.translate is not None:
            # A train that is not one connection's run (a GSO send groups what is equal in size, whatever
            # the flow): each datagram through the compiled fast path, which serves them one by one.
            at = self._fast_headers.get(payloads[0][:4])
            if at is None or compiled.flow_run(payloads, 0, at) < count:
                return self.from_overlay_batch([(payload, peer) for payload in payloads], now)
        while index < count:
            payload = payloads[index]
            if fast:
                at = self._fast_headers.get(payload[:4])
                if at == 4 or (at == 8 and payload[4:6] == self._fast_fleet):
                    datagram = self.core.forward_established(payload, at, self._headers, now)
                    if datagram is not None:
                        name, destination = fast
                        run = compiled.flow_run(payloads, index, at) if index + 1 < count else 1
                        self.last = name
                        self.peers[destination] += run
                        if run == 1:
                            outputs.append((SEND, datagram, destination))
                        else:
                            rest = self.core.forward_run(payloads, index + 1, run - 1, at, self._headers, now)
                            outputs.append((SEND_ALL, [datagram, *rest], destination))
                        index += run
                        continue
            outputs.append(self.from_overlay(payload, peer, now))
            index += 1
        return outputs

    def from_overlay(self, payload: bytes, peer: Peer, now: float) -> NodeOutput:
        """A datagram from the underlay: what to do with it (`overlay.uplink` NodeOutput)."""
        if self.fast_path:
            # An established flow's packet from a known distributor, plain GRE of our fleet: decapsulate,
            # translate, encapsulate in one pass (`TrafficManager.forward_established`); everything that
            # is not exactly that returns None there, unchanged, and takes the full path below.
            via = self._fast_peers.get(peer[0])
            if via is not None:
                at = self._fast_headers.get(payload[:4])
                if at == 4 or (at == 8 and payload[4:6] == self._fast_fleet):
                    datagram = self.core.forward_established(payload, at, self._headers, now)
                    if datagram is not None:
                        # What `Uplink.receive` records of every datagram it passes to the core.
                        name, destination = via
                        self.last = name
                        self.peers[destination] += 1
                        return (SEND, datagram, destination)
        return self._from_overlay(payload, peer, now)

    def _from_overlay(self, payload: bytes, peer: Peer, now: float) -> NodeOutput:
        """The full path: every kind of datagram, with every check and counter."""
        name, frame, instead = self.receive(payload, peer)
        if frame is None:
            return instead   # a keepalive echo, or refused
        if frame.protocol == gre.REPLICATION_PROTOCOL:
            # Another TM's connections, for which the distributor made us the standby: acknowledged.
            ack = self.core.import_replication(frame.inner, now)
            if isinstance(ack, str):
                self.drops[ack] += 1
                return NO_OUTPUT
            acked = gre.encapsulate(ack, key=self.key, protocol=gre.REPLICATION_ACK_PROTOCOL)
            return (SEND, self.seal(acked, name), self.by_name[name])
        if frame.protocol == gre.REPLICATION_ACK_PROTOCOL:
            # A standby has one of our batches: in strict mode, the packets held for it go on.
            released = self.core.replication_acked(frame.inner, now)
            if isinstance(released, str):
                self.drops[released] += 1
                return NO_OUTPUT
            return self._release(released)
        result = self.core.receive(frame.inner, now, _mark(frame.key))
        action = result.action
        if action == BOUNCE:
            # Second chance: the same packet, the same key, back to the distributor, which hands it to
            # the draining TM the key names.
            bounced = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.SECOND_CHANCE_PROTOCOL)
            return (SEND, self.seal(bounced, name), self.by_name[name])
        if action == DECLINE:
            declined = gre.encapsulate(frame.inner, key=frame.key, protocol=gre.DECLINED_PROTOCOL)
            return (SEND, self.seal(declined, name), self.by_name[name])
        return self._output(result, name)

    def replication(self, now: float) -> list[tuple[bytes, Peer]]:
        """What changed in our connection table since the last call, in sealed batches for the distributor
        we last heard from (it forwards each entry to its row's second choice)."""
        name = self.last
        return [(self.seal(gre.encapsulate(batch, key=self.key, protocol=gre.REPLICATION_PROTOCOL), name),
                 self.by_name[name]) for batch in self.core.export_replication(now)]

    def overdue(self, now: float) -> NodeOutput:
        """Strict mode: packets held past `defer_timeout` without every standby's ack, sent anyway."""
        return self._release(self.core.release_overdue(now))

    def _release(self, packets: list[bytes]) -> NodeOutput:
        if not packets:
            return NO_OUTPUT
        name = self.last
        return (SEND_ALL, [self.datagram(packet, name) for packet in packets], self.by_name[name])

    def from_tun(self, packet: bytes, now: float) -> NodeOutput:
        """What the TM host's own stack sent (its management addresses' answers)."""
        return self._output(self.core.from_local(packet, now), self.last)

    def _output(self, result: TMResult, name: str) -> NodeOutput:
        if result.action == OVERLAY:
            packet = result.packet
            assert packet is not None
            if result.released:
                return (SEND_ALL, [self.datagram(each, name) for each in (packet, *result.released)], self.by_name[name])
            return self.send(packet, name)
        if result.action == LOCAL:
            return (TUN, result.packet, None)
        if result.action == DEFER:
            return _FLUSH
        return NO_OUTPUT
