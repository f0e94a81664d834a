"""The edge agent: a host in another cloud joins the overlay (overlay/edge.py has the why).

TUN in (what the host sends from the prefixes it serves) → `EdgeNode.from_tun` → sealed GRE-in-UDP to
a distributor; GRE-in-UDP in → `EdgeNode.from_overlay` → the TUN. Announces go to every distributor every
`underlay.announce_interval` (with `[auth]` on), so a distributor reaches an edge behind NAT. Sends leave
from the RFC 8086 entropy ports (flow hash of the inner addresses) like every node; behind a NAT each of
them is a binding the announces and the traffic keep alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import xxhash

from overlay.config import NodeConfig
from overlay.edge import EdgeNode
from overlay.runtime.agent import UplinkAgent, authenticator, reconfigured_authenticator
from overlay.runtime.netsetup import NetPlan, edge_plan
from overlay.runtime.tun import TunDevice
from overlay.runtime.udp import UnderlayEndpoint, attach_steering
from overlay.runtime.sharing import LastHeard
from overlay.runtime.workers import WorkerPool, node_windows
from overlay.uplink import SEND, TUN, NodeOutput


class EdgeAgent(UplinkAgent):
    role = "edge"

    def __init__(self, config: NodeConfig):
        if config.edge is None:
            raise ValueError(f"{config.source}: not an edge config (node.role = {config.role!r})")
        super().__init__(config)
        self.node: EdgeNode | None = None
        self.pool: WorkerPool | None = None          # [node] workers > 1: the other packet loops
        self.following: LastHeard | None = None      # ... and the distributor they all follow

    def source_ports(self) -> int:
        # With several loops, everything leaves from the well-known port: what a distributor learns of us
        # (and sends our traffic back to) is then the receive group, steered by sealed bytes over all our
        # loops — not the entropy socket of whichever loop sent last.
        return 0 if self.config.workers > 1 else self.config.underlay.source_ports

    def net_plan(self) -> NetPlan:
        assert self.config.edge is not None
        return edge_plan(self.config.tun, list(self.config.edge.prefixes))

    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.config.edge is not None and self.tun is not None and self.udp is not None
        windows = node_windows(self.config)   # several loops with [auth]: one set of replay windows for all
        self.node = node = EdgeNode(self.config.edge.prefixes, self._distributors(self.config),
                                    self.config.underlay.gre_key, authenticator(self.config, windows=windows))
        from_tun, from_overlay = edge_handlers(node, self.tun, self.udp, loop.time)
        self.tun.start(loop, from_tun, self.tun_lost)
        self.udp.start(loop, from_overlay)
        self._announce()
        if self.config.workers > 1:
            # The other packet loops (overlay/runtime/workers.py): the edge keeps no state a packet needs
            # but the distributor it follows, which its loops tell each other through us (`LastHeard`).
            attach_steering(self.udp.receive_socket, self.config.workers)
            self.pool = pool = WorkerPool(self.config.workers, loop, lambda: None, self._on_shared,
                                          lambda: [("heard", *self.following.newest())] if self.following else [],
                                          windows)
            self.following = LastHeard(node, pool.broadcast)
            pool.ticking.append(self.following.flush)
            pool.start(self.config)

    def _on_shared(self, message: tuple) -> None:
        """What a worker said: the distributor it now follows (the pool tells the other workers)."""
        if message[0] == "heard" and self.following is not None:
            self.following.heard(message)

    def _reconfigure(self, new: NodeConfig) -> None:
        assert self.node is not None and self.config.edge is not None
        if new.edge is None:
            raise ValueError("the reloaded config is not an edge's")
        if new.edge.prefixes != self.config.edge.prefixes:
            raise ValueError("edge.prefixes changed: the TUN's addresses and rules apply only at restart")
        rekeyed = reconfigured_authenticator(self.node.auth, self.config, new)
        self.node.configure(self._distributors(new), new.underlay.gre_key, rekeyed)
        if self.pool is not None:
            self.pool.reconfigure(new)

    def _close_role(self) -> None:
        self._stop_announcing()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def _role_status(self) -> dict:
        if self.node is None:
            return {}
        counters = {**self.transport_counters(), **edge_counters(self.node)}
        drops = {f"agent:{reason}": count for reason, count in self.node.drops.items()}
        peers = {f"{host}:{port}": {"packets": count} for (host, port), count in self.node.peers.items()}
        if self.pool is not None:
            # One edge, several packet loops: their counters and drops add up.
            self.pool.add_totals(counters, drops)
            for _, worker_peers, _, _ in self.pool.stats.values():
                for peer, value in worker_peers.items():
                    peers[peer] = {"packets": peers.get(peer, {"packets": 0})["packets"] + value}
        return {
            "auth": self.config.auth.mode,
            "prefixes": [str(prefix) for prefix in self.node.prefixes],
            "peers": peers,
            "drops": drops,
            "counters": counters,
            "following": self.node.last,
            "workers": {"count": 1, "running": 1} if self.pool is None else self.pool.status(),
        }


def edge_counters(node: EdgeNode) -> dict[str, int]:
    return {"packets.sent": node.sent, "packets.delivered": node.delivered,
            "keepalives_echoed": node.keepalives_echoed}


def edge_handlers(node: EdgeNode, tun: TunDevice, udp: UnderlayEndpoint, clock: Callable[[], float]
                  ) -> tuple[Callable[[bytes], None], Callable[[bytes, tuple[str, int]], None]]:
    """The edge's two packet callbacks: TUN → `from_tun` → the
    distributor; underlay → `from_overlay` → the TUN (or a keepalive echo back)."""
    tun_write, udp_send, udp_reply = tun.write, udp.send, udp.reply
    node_from_tun, node_from_overlay = node.from_tun, node.from_overlay
    hash_addresses = xxhash.xxh32_intdigest

    def from_tun(packet: bytes) -> None:
        action, datagram, peer = node_from_tun(packet)
        if action == SEND:
            # One inner flow, one outer source port (its addresses: fragments stay together).
            addresses = packet[12:20] if packet[0] >> 4 == 4 else packet[8:40]
            udp_send(datagram, peer, hash_addresses(addresses))  # type: ignore[arg-type]

    def from_overlay(payload: bytes, peer: tuple[str, int]) -> None:
        output: NodeOutput = node_from_overlay(payload, peer, clock())
        action, data, to = output
        if action == TUN:
            tun_write(data)  # type: ignore[arg-type]
        elif action == SEND:
            udp_reply(data, to)  # type: ignore[arg-type]   # a keepalive echo: from the well-known port

    return from_tun, from_overlay
