"""The TM agent: GRE-in-UDP in, `overlay.tm.core.TrafficManager` in the middle, GRE-in-UDP back out.

- Datagrams from addresses that are not a configured `[[distributor]]` are dropped and counted.
- A keepalive (GRE protocol 0x88B5) is echoed to its sender unchanged, before anything else: it must
  measure the tunnel and the agent, not the core.
- Anything else is decapsulated and given to `receive(inner, now)`; an "overlay" result goes back,
  encapsulated, to the distributor it came from; a "local" one (addressed to a management address) is
  written into the TUN, where the host's own stack (the status service) answers it.
- What that stack answers leaves by the TUN (netsetup's `from MGMT` rule) into `from_local(packet, now)`,
  and goes to the distributor that last sent us something (else the first configured one).
- Connection timeouts: one `loop.call_at` timer, re-armed to `next_deadline()` once per loop iteration
  in which packets were handled (not per packet).

Everything leaves from the well-known port: the distributor recognises a TM by its underlay (address,
port) — what the `[[tm]] underlay` of its config says — so a TM cannot spread its replies over source ports.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from overlay import gre
from overlay.config import NodeConfig
from overlay.runtime.agent import Agent
from overlay.runtime.netsetup import NetPlan, tm_plan
from overlay.tm.core import BOUNCE, LOCAL, OVERLAY, TMResult, TrafficManager

_KEEPALIVE = gre.KEEPALIVE_PROTOCOL.to_bytes(2, "big")


class TMAgent(Agent):
    role = "tm"

    def __init__(self, config: NodeConfig):
        if config.tm is None:
            raise ValueError(f"{config.source}: not a TM config (node.role = {config.role!r})")
        super().__init__(config)
        self.core: TrafficManager | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._rearm_pending = False
        self._distributors = self._configured_distributors(config)
        self._last_distributor: tuple[str, int] = next(iter(self._distributors.values()))
        # Per peer: packets received; per reason: what this agent itself dropped before the core saw it.
        self.peers: Counter[tuple[str, int]] = Counter()
        self.drops: Counter[str] = Counter()
        self.keepalives_echoed = 0

    @staticmethod
    def _configured_distributors(config: NodeConfig) -> dict[str, tuple[str, int]]:
        return {str(address): (str(address), port) for address, port in config.distributors}

    def source_ports(self) -> int:
        # Everything leaves from the well-known port (see the module docstring): no entropy sockets.
        return 0

    def net_plan(self) -> NetPlan:
        assert self.config.tm is not None
        return tm_plan(self.config.tun, list(self.config.tm.management))

    # -- packets --------------------------------------------------------------------------------------

    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.config.tm is not None and self.tun is not None and self.udp is not None
        self.core = core = TrafficManager(self.config.tm)
        tun_write, udp_send, udp_reply = self.tun.write, self.udp.send, self.udp.reply
        clock, call_soon = loop.time, loop.call_soon
        distributors, peers, drops = self._distributors, self.peers, self.drops
        key = self.config.underlay.gre_key  # [underlay] only changes with a restart
        decapsulate, encapsulate, ip_protocols = gre.decapsulate, gre.encapsulate, (gre.PROTO_IPV4, gre.PROTO_IPV6)
        key_fallback, second_chance = gre.key_fallback, gre.SECOND_CHANCE_PROTOCOL

        # The per-packet path: closures over locals (no attribute lookups, no Optional checks per packet).
        # `reconfigure` changes the core and `distributors` in place, so these stay valid across reloads.
        def execute(result: TMResult, distributor: tuple[str, int]) -> None:
            action = result.action
            if action == OVERLAY:
                udp_send(encapsulate(result.packet, key=key), distributor)  # type: ignore[arg-type]
            elif action == LOCAL:
                tun_write(result.packet)  # type: ignore[arg-type]
            if not self._rearm_pending:
                # A new connection may need an earlier expiry than the armed one: check once per loop
                # iteration, not per packet.
                self._rearm_pending = True
                call_soon(self._rearm)

        def from_overlay(payload: bytes, peer: tuple[str, int]) -> None:
            # Only configured distributors may use this TM: anyone else could inject packets into its
            # connection table and management stack, or use the keepalive echo as a reflector.
            distributor = distributors.get(peer[0])
            if distributor is None:
                drops["unknown-peer"] += 1
                return
            if payload[2:4] == _KEEPALIVE:
                udp_reply(payload, peer)
                self.keepalives_echoed += 1
                return
            frame = decapsulate(payload)
            if frame is None:
                drops["malformed:gre"] += 1
                return
            if frame.protocol not in ip_protocols:
                drops["unsupported-gre-protocol"] += 1
                return
            # Answers go to the distributor's configured port, whichever of its source ports this came from.
            self._last_distributor = distributor
            peers[distributor] += 1
            marked = key_fallback(frame.key) != 0
            result = core.receive(frame.inner, clock(), marked)
            if result.action == BOUNCE:
                # Second chance: the same packet, the same key, back to the distributor under the
                # bounce protocol; it forwards it to the draining TM the key names.
                udp_send(encapsulate(frame.inner, key=frame.key, protocol=second_chance), distributor)
                return
            execute(result, distributor)

        def from_tun(packet: bytes) -> None:
            execute(core.from_local(packet, clock()), self._last_distributor)

        self.tun.start(loop, from_tun, self.tun_lost)
        self.udp.start(loop, from_overlay)
        self._rearm()

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
        self.core.reconfigure(new.tm)
        # In place: the packet path holds this very dict.
        self._distributors.clear()
        self._distributors.update(self._configured_distributors(new))
        if self._last_distributor[0] not in self._distributors:
            self._last_distributor = next(iter(self._distributors.values()))
        self._rearm()

    def _close_role(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- status ---------------------------------------------------------------------------------------

    def _role_status(self) -> dict:
        if self.core is None:
            return {}
        snapshot = dict(self.core.snapshot())
        counters = self.transport_counters()
        counters.update(self.core.counters())
        counters["keepalives_echoed"] = self.keepalives_echoed
        drops = dict(snapshot.pop("drops", {}) or {})
        for reason, count in self.drops.items():
            drops[f"agent:{reason}"] = count
        return {
            **snapshot,
            "peers": {f"{host}:{port}": {"packets": count} for (host, port), count in self.peers.items()},
            "drops": drops,
            "counters": counters,
        }
