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
from overlay.runtime.udp import UnderlayEndpoint
from overlay.uplink import SEND, TUN, NodeOutput


class EdgeAgent(UplinkAgent):
    role = "edge"

    def __init__(self, config: NodeConfig):
        if config.edge is None:
            raise ValueError(f"{config.source}: not an edge config (node.role = {config.role!r})")
        super().__init__(config)
        self.node: EdgeNode | None = None

    def net_plan(self) -> NetPlan:
        assert self.config.edge is not None
        return edge_plan(self.config.tun, list(self.config.edge.prefixes))

    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.config.edge is not None and self.tun is not None and self.udp is not None
        self.node = node = EdgeNode(self.config.edge.prefixes, self._distributors(self.config),
                                    self.config.underlay.gre_key, authenticator(self.config))
        from_tun, from_overlay = edge_handlers(node, self.tun, self.udp, loop.time)
        self.tun.start(loop, from_tun, self.tun_lost)
        self.udp.start(loop, from_overlay)
        self._announce()

    def _reconfigure(self, new: NodeConfig) -> None:
        assert self.node is not None and self.config.edge is not None
        if new.edge is None:
            raise ValueError("the reloaded config is not an edge's")
        if new.edge.prefixes != self.config.edge.prefixes:
            raise ValueError("edge.prefixes changed: the TUN's addresses and rules apply only at restart")
        rekeyed = reconfigured_authenticator(self.node.auth, self.config, new)
        self.node.configure(self._distributors(new), new.underlay.gre_key, rekeyed)

    def _close_role(self) -> None:
        self._stop_announcing()

    def _role_status(self) -> dict:
        if self.node is None:
            return {}
        counters = {**self.transport_counters(), **edge_counters(self.node)}
        drops = {f"agent:{reason}": count for reason, count in self.node.drops.items()}
        return {
            "auth": self.config.auth.mode,
            "prefixes": [str(prefix) for prefix in self.node.prefixes],
            "peers": {f"{host}:{port}": {"packets": count} for (host, port), count in self.node.peers.items()},
            "drops": drops,
            "counters": counters,
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
