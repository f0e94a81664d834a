"""A worker process of `[node] workers` (overlay/runtime/workers.py has the design): one packet loop — a
distributor's or an edge's — on its own TUN queue and sockets, kept in step by the agent over its pipe.

The pipe, in order: the node's replay windows with `[auth]` (SCM_RIGHTS), the fleet state (a distributor
takes it before its first packet), what the other loops shared; then, any time, a new fleet state, a new
config (the `NodeConfig` the agent applied), or stop. Back: ready, counters every STATS_INTERVAL, and what
this loop learned that the others need (overlay/runtime/sharing.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from overlay.antireplay import SharedWindows
from overlay.config import NodeConfig
from overlay.runtime.sharing import LastHeard, SharedLag, ShareFilter

STATS_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1


def worker_main(config: NodeConfig, index: int, control: Connection) -> None:
    """The worker's process: the packet loop until the agent says stop (or goes away)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return   # the agent died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the agent stops us, over the pipe
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, index, control))


async def _run(loop: asyncio.AbstractEventLoop, control: Connection, on_control: Callable[[], None],
               report: Callable[[], None], stop: asyncio.Event, tun: Any, udp: Any, index: int,
               start: Callable[[], None]) -> None:
    """A worker's life: read the control pipe, start the packet callbacks, report, stop and close."""
    loop.add_reader(control.fileno(), on_control)
    start()
    control.send(("ready", index, os.getpid()))
    loop.call_soon(report)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(control.fileno())
        tun.stop_reading()
        udp.stop_reading()
        udp.drain_all()
        tun.close()
        udp.close()


def _to_agent(control: Connection, index: int, stop: asyncio.Event) -> Callable[[tuple[Any, ...]], None]:
    """What this loop shares, to the agent (which passes it on); a pipe gone means the agent is: stop."""
    def send(message: tuple[Any, ...]) -> None:
        try:
            control.send(("shared", index, message))
        except (BrokenPipeError, OSError):
            stop.set()

    return send


async def _serve(config: NodeConfig, index: int, control: Connection) -> None:
    # The agent hands over the node's replay windows first thing on the pipe (WorkerPool._spawn): it
    # made them because this config has [auth] on, the config it handed us.
    windows = SharedWindows.receive(control) if config.auth.enabled else None
    if config.role == "edge":
        await _serve_edge(config, index, control, windows)
    else:
        await _serve_distributor(config, index, control, windows)


async def _serve_edge(config: NodeConfig, index: int, control: Connection, windows: SharedWindows | None) -> None:
    """An edge's packet loop: the same node as the agent's (its distributors; its key in lane `index`). The
    edge keeps no state a packet needs but which distributor it follows (`LastHeard`); the agent alone
    sends the announces."""
    from overlay.edge import EdgeNode
    from overlay.runtime.agent import UplinkAgent, authenticator, reconfigured_authenticator
    from overlay.runtime.edge_agent import edge_counters, edge_handlers
    from overlay.runtime.tun import TunDevice, wants_offload
    from overlay.runtime.udp import UnderlayEndpoint

    loop = asyncio.get_running_loop()
    assert config.edge is not None, "the agent hands its workers its own config"
    node = EdgeNode(config.edge.prefixes, UplinkAgent._distributors(config), config.underlay.gre_key,
                    authenticator(config, lane=index, windows=windows))
    tun = TunDevice(config.tun.name, multi_queue=True, offload=wants_offload(config.tun.offload, config.role))
    # Everything from the well-known port, as the agent's (EdgeAgent.source_ports): the receive group.
    udp = UnderlayEndpoint(config.underlay.address, config.underlay.port, source_ports=0)
    stop = asyncio.Event()

    to_agent = _to_agent(control, index, stop)
    following = LastHeard(node, to_agent)

    def on_control() -> None:
        nonlocal config
        try:
            message = control.recv()
        except (EOFError, OSError):
            stop.set()
            return
        if message[0] == "shared":
            following.heard(message[1])
        elif message[0] == "config":
            new = message[1]
            node.configure(UplinkAgent._distributors(new), new.underlay.gre_key,
                           reconfigured_authenticator(node.auth, config, new))
            config = new
        elif message[0] == "stop":
            stop.set()

    def report() -> None:
        following.flush()
        counters = {**udp.counters, **tun.counters, **edge_counters(node)}
        drops = {f"agent:{reason}": count for reason, count in node.drops.items()}
        peers = {f"{host}:{port}": count for (host, port), count in node.peers.items()}
        try:
            control.send(("stats", index, counters, peers, drops))
        except (BrokenPipeError, OSError):
            stop.set()
            return
        loop.call_later(STATS_INTERVAL, report)

    from_tun, from_overlay = edge_handlers(node, tun, udp, loop.time)

    def start() -> None:
        tun.start(loop, from_tun, lambda error: stop.set())
        udp.start(loop, from_overlay)

    await _run(loop, control, on_control, report, stop, tun, udp, index, start)


async def _serve_distributor(config: NodeConfig, index: int, control: Connection,
                             windows: SharedWindows | None) -> None:
    from overlay.distributor.core import Distributor
    from overlay.runtime.agent import authenticator, reconfigured_authenticator
    from overlay.runtime.packet_path import packet_handlers
    from overlay.runtime.tables import TableBuilder
    from overlay.runtime.tun import TunDevice, wants_offload
    from overlay.runtime.udp import UnderlayEndpoint

    loop = asyncio.get_running_loop()
    assert config.distributor is not None, "the agent hands its workers its own config"
    core = Distributor(config.distributor, authenticator(config, lane=index, windows=windows))
    core.clock = loop.time
    # The fleet state comes next on the pipe (WorkerPool._spawn): taken before the first packet and built on
    # the spot — a worker that starts (or restarts) must not forward a single packet by the default table.
    if control.poll(30):
        first = control.recv()
        if first[0] == "state":
            core.apply_fleet_state(*first[1])
    tables = core.prepare_tables = TableBuilder(loop)   # later full table builds off the loop, as at the agent
    tun = TunDevice(config.tun.name, multi_queue=True, offload=wants_offload(config.tun.offload, config.role))
    udp = UnderlayEndpoint(config.underlay.address, config.underlay.port, source_ports=config.underlay.source_ports)
    stop = asyncio.Event()

    to_agent = _to_agent(control, index, stop)
    shared = ShareFilter(to_agent)
    core.share = shared.offer
    core.replication_lag = SharedLag(to_agent)  # type: ignore[assignment]

    def keepalive(payload: bytes) -> None:
        # Probes leave from the agent's own sockets and their echoes come back there, except a probe
        # from the well-known port (a TM behind NAT): its echo may land in any loop of the group.
        to_agent(("keepalive", None, payload))

    (from_tun, from_overlay, from_tun_train, from_overlay_train, from_tun_batch,
     from_overlay_batch) = packet_handlers(core, tun, udp, keepalive)

    def on_control() -> None:
        try:
            message = control.recv()
        except (EOFError, OSError):
            stop.set()            # the agent is gone
            return
        nonlocal config
        kind = message[0]
        if kind == "state":
            core.apply_fleet_state(*message[1])
        elif kind == "shared":
            core.apply_shared(message[1])
            shared.heard(message[1])
        elif kind == "config":
            new = message[1]
            assert new.distributor is not None
            rekeyed = reconfigured_authenticator(core.auth, config, new)   # the agent checked it applies
            core.reconfigure(new.distributor)
            core.auth, config = rekeyed, new
        elif kind == "stop":
            stop.set()

    def report() -> None:
        shared.flush()
        counters = {**udp.counters, **tun.counters, **core.counters(), "table.rebuilds_deferred": core.rebuilds_deferred}
        try:
            control.send(("stats", index, counters, dict(core.counters_tm), dict(core.counters_drop)))
        except (BrokenPipeError, OSError):
            stop.set()
            return
        loop.call_later(STATS_INTERVAL, report)

    def start() -> None:
        tun.start(loop, from_tun, lambda error: stop.set(), from_tun_train, from_tun_batch)
        udp.start(loop, from_overlay, from_overlay_train, from_overlay_batch)

    try:
        await _run(loop, control, on_control, report, stop, tun, udp, index, start)
    finally:
        tables.close()
