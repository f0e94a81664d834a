"""The TM agent: GRE-in-UDP in, `overlay.tm.node.TMNode` (the overlay protocol around the NAT core,
`overlay.tm.core.TrafficManager`) in the middle, GRE-in-UDP back out.

- Every datagram goes to `TMNode.from_overlay`, which refuses unknown peers and foreign fleet ids, echoes
  keepalives, and runs the core; its output is sent to the distributor or written into the TUN, where
  the host's own stack (the status service) answers what was addressed to a management address.
- What that stack answers leaves by the TUN (netsetup's `from MGMT` rule) into `TMNode.from_tun`, and
  goes to the distributor that last sent us something (else the first configured one).
- Connection timeouts: one `loop.call_at` timer, re-armed to `next_deadline()` once per loop iteration
  in which packets were handled (not per packet).

Everything leaves from the well-known port: the distributor recognises a TM by its underlay (address,
port) — what the `[[tm]] underlay` of its config says — so a TM cannot spread its replies over source ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from overlay.config import NodeConfig
from overlay.runtime.agent import UplinkAgent, authenticator, reconfigured_authenticator
from overlay.runtime.netsetup import NetPlan, tm_plan
from overlay.tm.core import TrafficManager
from overlay.tm.node import FLUSH, SEND, SEND_ALL, SEND_EACH, TUN, NodeOutput, TMNode


class TMAgent(UplinkAgent):
    role = "tm"

    def __init__(self, config: NodeConfig):
        if config.tm is None:
            raise ValueError(f"{config.source}: not a TM config (node.role = {config.role!r})")
        super().__init__(config)
        self.core: TrafficManager | None = None
        self.node: TMNode | None = None
        self._replication_timer: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self._release_timer: asyncio.TimerHandle | None = None
        self._release_at = float("inf")
        self._execute: Callable[[NodeOutput], None] = lambda output: None   # the packet path's, once open
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._rearm_pending = False

    def source_ports(self) -> int:
        # Everything leaves from the well-known port (see the module docstring): no entropy sockets.
        return 0

    def net_plan(self) -> NetPlan:
        assert self.config.tm is not None
        return tm_plan(self.config.tun, list(self.config.tm.management))

    # -- packets --------------------------------------------------------------------------------------

    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.config.tm is not None and self.tun is not None and self.udp is not None
        self.core = TrafficManager(self.config.tm)
        # [underlay] (and so the fleet id) only changes with a restart.
        self.node = node = TMNode(self.core, self._distributors(self.config), self.config.underlay.gre_key,
                                  authenticator(self.config))
        tun_write, udp_reply = self.tun.write, self.udp.reply
        clock, call_soon = loop.time, loop.call_soon
        node_from_overlay, node_from_tun = node.from_overlay, node.from_tun
        node_from_overlay_train = node.from_overlay_train
        udp_send_all = self.udp.send_all

        def udp_reply_all(datagrams: list[bytes], peer: tuple[str, int]) -> None:
            udp_send_all(datagrams, peer, -1)      # a negative flow hash: the well-known port, as `reply`

        # The per-packet path: closures over locals (no attribute lookups, no Optional checks per packet).
        # `reconfigure` changes the node and core in place, so these stay valid across reloads.
        def execute(output: NodeOutput) -> None:
            action, data, peer = output
            if action == SEND:
                udp_reply(data, peer)  # type: ignore[arg-type]
            elif action == TUN:
                tun_write(data)  # type: ignore[arg-type]
            elif action == SEND_ALL:
                udp_reply_all(data, peer)  # type: ignore[arg-type]
            elif action == FLUSH:
                # Strict replication holds a new connection's packets until its standbys have it: send the
                # batch at the end of this loop iteration (one batch for all of its new connections).
                if not self._flush_pending:
                    self._flush_pending = True
                    call_soon(self._flush)
            else:
                return
            if not self._rearm_pending:
                # A new connection may need an earlier expiry than the armed one: check once per loop
                # iteration, not per packet.
                self._rearm_pending = True
                call_soon(self._rearm)

        def from_overlay(payload: bytes, peer: tuple[str, int]) -> None:
            output = node_from_overlay(payload, peer, clock())
            if output[0] == SEND and self._rearm_pending:
                # `execute`'s first case, inline: an established flow's datagram (the node's fast path)
                # costs one call less. The first of a loop iteration goes through `execute` for the rearm.
                udp_reply(output[1], output[2])  # type: ignore[arg-type]
            else:
                execute(output)

        def from_overlay_train(payloads: list[bytes], peer: tuple[str, int]) -> None:
            # A UDP GRO train: runs of one connection translated together, sent as one batch.
            for output in node_from_overlay_train(payloads, peer, clock()):
                if output[0] == SEND_ALL and self._rearm_pending:
                    udp_reply_all(output[1], output[2])  # type: ignore[arg-type]
                elif output[0] == SEND_EACH:
                    send_each(output[1])  # type: ignore[arg-type]
                else:
                    execute(output)

        node_from_overlay_batch = node.from_overlay_batch
        udp_queue_all = self.udp.queue_all

        def send_each(sends: list[tuple[bytes, tuple[str, int]]]) -> None:
            udp_queue_all([sends])      # from the well-known port: a TM has no entropy sockets
            if not self._rearm_pending:
                self._rearm_pending = True
                call_soon(self._rearm)

        def from_overlay_batch(items: list[tuple[bytes, tuple[str, int]]]) -> None:
            # A receive batch: the established flows' datagrams translated in C, sent as they are.
            for output in node_from_overlay_batch(items, clock()):
                if output[0] == SEND_EACH:
                    send_each(output[1])  # type: ignore[arg-type]
                else:
                    execute(output)

        def from_tun(packet: bytes) -> None:
            execute(node_from_tun(packet, clock()))

        self._execute = execute
        self.tun.start(loop, from_tun, self.tun_lost)
        self.udp.start(loop, from_overlay, from_overlay_train, from_overlay_batch)
        self._rearm()
        self._announce()
        self._replicate()

    def _replicate(self) -> None:
        """Every `tm.replication.interval`: what changed in the connection table, to the distributor, which
        hands each entry to its row's second choice (overlay/tm/replication.py)."""
        assert self.loop is not None and self.config.tm is not None
        replication = self.config.tm.replication
        if not replication.enabled:
            return
        self._send_replication()
        self._replication_timer = self.loop.call_later(replication.interval, self._replicate)

    def _flush(self) -> None:
        self._flush_pending = False
        self._send_replication()

    def _send_replication(self) -> None:
        assert self.node is not None and self.udp is not None and self.loop is not None and self.core is not None
        for datagram, distributor in self.node.replication(self.loop.time()):
            self.udp.reply(datagram, distributor)
        self._arm_release()

    def _arm_release(self) -> None:
        """Strict mode: a timer for the first held packet whose acks are overdue (`defer_timeout`)."""
        assert self.core is not None and self.loop is not None
        deadline = self.core.next_release()
        if deadline is None or deadline >= self._release_at:
            return
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._release_at = deadline
        self._release_timer = self.loop.call_at(deadline, self._on_release)

    def _on_release(self) -> None:
        assert self.node is not None and self.loop is not None
        self._release_timer, self._release_at = None, float("inf")
        self._execute(self.node.overdue(self.loop.time()))
        self._arm_release()

    # -- timers ---------------------------------------------------------------------------------------

    def _rearm(self) -> None:
        assert self.core is not None and self.loop is not None
        self._rearm_pending = False
        deadline = self.core.next_deadline()
        if deadline is None:
            deadline = float("inf")
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline != float("inf"):
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        assert self.core is not None and self.loop is not None
        self._timer = None
        self._timer_at = float("inf")
        self.core.expire(self.loop.time())
        self._rearm()

    # -- control --------------------------------------------------------------------------------------

    def _reconfigure(self, new: NodeConfig) -> None:
        assert self.core is not None and self.config.tm is not None
        if new.tm is None:
            raise ValueError("the reloaded config is not a TM's")
        if new.tm.management != self.config.tm.management:
            raise ValueError("tm.management changed: the TUN's addresses apply only at restart")
        # Dry run first: a config the core refuses raises here, before the running core changes at all.
        TrafficManager(new.tm)
        assert self.node is not None
        rekeyed = reconfigured_authenticator(self.node.auth, self.config, new)
        self.core.reconfigure(new.tm)
        self.node.configure(self._distributors(new), new.underlay.gre_key, rekeyed)
        self._rearm()
        if new.tm.replication.enabled and self._replication_timer is None and self.loop is not None:
            self.loop.call_soon(self._replicate)   # switched on by this reload (after it took effect)

    def _close_role(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_announcing()
        if self._replication_timer is not None:
            self._replication_timer.cancel()
            self._replication_timer = None
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None

    # -- status ---------------------------------------------------------------------------------------

    def _role_status(self) -> dict:
        if self.core is None or self.node is None:
            return {}
        snapshot = dict(self.core.snapshot())
        counters = self.transport_counters()
        counters.update(self.core.counters())
        counters["keepalives_echoed"] = self.node.keepalives_echoed
        drops = dict(snapshot.pop("drops", {}) or {})
        for reason, count in self.node.drops.items():
            drops[f"agent:{reason}"] = count
        return {
            **snapshot,
            "auth": self.config.auth.mode,
            "peers": {f"{host}:{port}": {"packets": count} for (host, port), count in self.node.peers.items()},
            "drops": drops,
            "counters": counters,
        }
