"""A distributor's (or an edge's) extra packet loops (`[node] workers = N`): N - 1 worker processes next to
the agent's own, one event loop each, sharing the one decision (issue 10; Nebula's `routines`). An edge's
loops share the distributor they follow instead (`LastHeard`).

- Each worker attaches a queue of the agent's multi-queue TUN (the kernel spreads flows over the queues)
  and binds the underlay port with SO_REUSEPORT (the kernel spreads datagrams over the sockets), plus send
  sockets of its own for flow entropy. The agent itself is worker 0: it alone sets up the host, probes the
  TMs, serves status and admin, and follows the fleet store.
- The decision is the same everywhere: every worker builds the core from the same config, and the agent
  hands each one the fleet state after every change (`Distributor.fleet_state()`: admin states, health,
  returns) and every reload (the config it applied — the node's `NodeConfig` itself, keys included, never
  the file again: a file edited since, or a key file rotated on disk, must not reach a restarted worker
  before the agent reloads it). The distributor is
  stateless per packet, so which process sees a packet never matters.
- With `[auth]` worker i seals in lane i (overlay/auth.py: its own nonces, its own replay window at the
  receiver), and every loop opens against the same replay windows: the agent creates them in shared
  memory (overlay/antireplay.py) and hands each worker the descriptor as it starts, so a replay meets
  the window that saw the original whichever socket it was sent to, and a restarted worker rejoins with
  everything the node saw. What one loop learns from a datagram that every loop needs goes through the
  agent (`Distributor.share`): where a peer behind NAT is (`ShareFilter`), what an edge announced.
- Replication telemetry (`SharedLag`: a batch fanned out at one loop may be acknowledged at another) and
  keepalive echoes that reach a worker go to the agent, whose status and health see them all.
- Workers report their counters every `STATS_INTERVAL`; the agent's status and metrics add them up.
- A worker dies with the agent (PR_SET_PDEATHSIG): a SIGKILLed agent leaves no process holding a TUN
  queue (the device, its routes and the fail-closed blackholes behave as for one process). A worker that
  dies on its own is restarted.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import structlog

from overlay.antireplay import SharedWindows
from overlay.config import NodeConfig

log = structlog.get_logger("overlay.workers")

STATS_INTERVAL = 1.0
RESTART_DELAY = 1.0
PR_SET_PDEATHSIG = 1

FleetState = tuple[dict[str, str], dict[str, bool], frozenset[str]]


# -- the worker process ------------------------------------------------------------------------------------

def replay_capacity(config: Any) -> int:
    """Shared replay windows for a node's peers: one per sender key and lane, room for each key in several
    lanes and for the keys reloads and the fleet store add (a power of two; 32 KiB a window, touched only
    once used; the keys table itself 8 bytes a window)."""
    keys = sum(len(keys) for keys in config.auth.peers.values())
    return max(8192, 1 << (16 * keys - 1).bit_length())


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


class ShareFilter:
    """What a packet loop shares with the others (`Distributor.share` messages), thinned: a peer that sends
    from several ports (an edge's entropy ports) moves its learned endpoint with nearly every datagram,
    and any of those ports reaches it. A peer's first endpoint and a change of address go out at once (a
    NAT rebinding: the other loops must follow); a change of port only with `flush`, the latest one."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send
        self._sent: dict[str, tuple[str, int]] = {}
        self._pending: dict[str, tuple[str, int]] = {}

    def offer(self, message: tuple[Any, ...]) -> None:
        kind, peer, value = message
        if kind != "learned":
            self._send(message)
            return
        last = self._sent.get(peer)
        if last is not None and last[0] == value[0]:
            self._pending[peer] = value
            return
        self._pending.pop(peer, None)
        self._sent[peer] = value
        self._send(message)

    def heard(self, message: tuple[Any, ...]) -> None:
        """What another loop shared (through the agent): the endpoint every loop now uses. A later port
        seen here is thinned against that, not against what this loop last sent — else a loop would stay
        silent on a port the others have since moved away from."""
        kind, peer, value = message
        if kind == "learned":
            self._sent[peer] = value
            pending = self._pending.get(peer)
            if pending is not None and (pending == value or pending[0] != value[0]):
                # Nothing new, or a port at an address the peer has since moved away from (a rebinding
                # another loop saw first): sending it would move every loop back for a while.
                del self._pending[peer]

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for peer, value in pending.items():
            if self._sent.get(peer) != value:
                self._sent[peer] = value
                self._send(("learned", peer, value))


class SharedLag:
    """A worker's stand-in for `replication.StandbyLag`: a batch fanned out here may be acknowledged at
    another loop, so the events go to the agent, whose StandbyLag the status shows."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send

    def fanned(self, origin: str, sequence: int, now: float) -> None:
        self._send(("fanned", origin, (sequence, now)))

    def acked(self, origin: str, standby: str, sequence: int, now: float) -> None:
        self._send(("acked", origin, (standby, sequence, now)))

    def status(self, now: float) -> dict[str, dict]:
        return {}


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


class LastHeard:
    """An edge's loops agreeing on a distributor. An edge sends to the distributor it last heard from
    (overlay/uplink.py: a dead one stops sending, a live one takes over); a loop that seldom or never
    receives would stay with its first choice, up or down. So each loop says which distributor it follows
    when that changed, with when it last heard from it (`EdgeNode.heard_at`: the loops' clock is the
    machine's monotonic clock, one for all processes) — checked every STATS_INTERVAL, so a choice that
    flips per datagram (two distributors answering) costs one message a second at most — and follows what
    another loop heard more recently than anything it heard itself: the newest datagram decides, as in one
    loop, not the order the messages happen to arrive in."""

    def __init__(self, node: Any, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._node = node
        self._send = send
        self._said = node.last
        self._adopted = float("-inf")   # when the choice we took from another loop was heard there

    def newest(self) -> tuple[str, float]:
        """The choice here and when it was heard (for a loop that starts later)."""
        node = self._node
        return (node.last, node.heard_at) if node.heard_at >= self._adopted else (node.last, self._adopted)

    def flush(self) -> None:
        node = self._node
        if node.last != self._said and node.heard_at > self._adopted:
            self._said = node.last
            self._send(("heard", node.last, node.heard_at))

    def heard(self, message: tuple[Any, ...]) -> None:
        _, name, at = message
        node = self._node
        if name in node.by_name and at > max(node.heard_at, self._adopted):
            node.last = self._said = name
            self._adopted = at


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

    def to_agent(message: tuple[Any, ...]) -> None:
        try:
            control.send(("shared", index, message))
        except (BrokenPipeError, OSError):
            stop.set()

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

    def to_agent(message: tuple[Any, ...]) -> None:
        try:
            control.send(("shared", index, message))
        except (BrokenPipeError, OSError):
            stop.set()

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


# -- the agent's side ----------------------------------------------------------------------------------------

def _frame(message: tuple[Any, ...]) -> bytes:
    """`message` as `Connection.send` frames it: a 4-byte big-endian length, then the pickle."""
    data = bytes(reduction.ForkingPickler.dumps(message))
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(data)) + data
    return struct.pack("!i", len(data)) + data


class WorkerPool:
    """Workers 1..count-1 of a distributor (or edge) agent: started, kept in step, their counters
    collected. An edge has no fleet state: its `state` gives None, which its workers ignore."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop, state: Callable[[], FleetState | None],
                 on_shared: Callable[[tuple[Any, ...]], None] = lambda message: None,
                 known: Callable[[], list[tuple[Any, ...]]] = list, windows: SharedWindows | None = None) -> None:
        self.count = count
        self.windows = windows                   # with [auth]: handed to every worker as it starts
        self.loop = loop
        self._state = state
        self._on_shared = on_shared              # what a worker shared: the agent takes it in
        self._known = known                      # what the agent knows of it: for a (re)started worker
        self._shared = ShareFilter(self._broadcast)   # what the agent's own loop learned: to every worker
        self._ticker: asyncio.TimerHandle | None = None
        self.ticking: list[Callable[[], None]] = []   # more of the agent's own loop to share, every tick
        self._context = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked event loop
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._controls: dict[int, Connection] = {}
        self._outbox: dict[int, bytearray] = {}   # what a worker's pipe has not taken yet, in order
        self.stats: dict[int, tuple[dict[str, int], dict[str, int], dict[str, int], float]] = {}
        self.restarts = 0
        self.ready: set[int] = set()     # workers whose TUN queue and sockets are open
        self._config: NodeConfig | None = None
        self._stopping = False

    def start(self, config: NodeConfig) -> None:
        self._config = config
        for index in range(1, self.count):
            self._spawn(index)
        self._tick()

    def _tick(self) -> None:
        self._shared.flush()
        for flush in self.ticking:
            flush()
        self._ticker = self.loop.call_later(STATS_INTERVAL, self._tick)

    def broadcast(self, message: tuple[Any, ...]) -> None:
        """To every worker as it is (an edge's `LastHeard`: thinned already)."""
        self._broadcast(message)

    def share(self, message: tuple[Any, ...]) -> None:
        """The agent's own loop learned something every loop needs (`Distributor.share`)."""
        self._shared.offer(message)

    def _broadcast(self, message: tuple[Any, ...], but: int | None = None) -> None:
        for index in list(self._controls):
            if index != but:
                self._send(index, ("shared", message))

    def _spawn(self, index: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=worker_main, args=(self._config, index, theirs),
                                        name=f"overlay-worker-{index}", daemon=False)
        process.start()
        theirs.close()
        if self.windows is not None and process.pid is not None:
            try:
                self.windows.send_to(ours, process.pid)   # before anything else on the pipe
            except OSError as error:
                # It is gone already: its sentinel fires `_on_exit` below, which restarts it.
                log.error("worker.handover_failed", worker=index, error=repr(error))
        self._processes[index], self._controls[index] = process, ours
        self.loop.add_reader(ours.fileno(), self._on_message, index)
        self.loop.add_reader(process.sentinel, self._on_exit, index)
        self._send(index, ("state", self._state()))
        for message in self._known():
            self._send(index, ("shared", message))
        log.info("worker.started", worker=index, pid=process.pid)

    def _on_message(self, index: int) -> None:
        control = self._controls.get(index)
        if control is None:
            return
        try:
            message = control.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(control.fileno())
            return
        if message[0] == "ready":
            self.ready.add(index)
            log.info("worker.ready", worker=index, pid=message[2])
        elif message[0] == "stats":
            _, _, counters, by_tm, drops = message
            self.stats[index] = (counters, by_tm, drops, time.monotonic())
        elif message[0] == "shared":
            shared = message[2]
            self._on_shared(shared)
            if shared[0] in ("learned", "announced", "heard"):
                self._shared.heard(shared)           # the agent's own loop: it now uses that endpoint too
                self._broadcast(shared, but=index)   # the other workers; the agent took it just now

    def _on_exit(self, index: int) -> None:
        process = self._processes.pop(index, None)
        if process is not None:
            self.loop.remove_reader(process.sentinel)
            process.join(0)
        if index in self._controls:
            self._close_control(index)
        self.stats.pop(index, None)
        self.ready.discard(index)
        if self._stopping:
            return
        self.restarts += 1
        log.error("worker.died", worker=index, exitcode=process.exitcode if process else None,
                  restarting_in_s=RESTART_DELAY)
        self.loop.call_later(RESTART_DELAY, self._restart, index)

    def _restart(self, index: int) -> None:
        if not self._stopping and index not in self._processes:
            self._spawn(index)

    def _send(self, index: int, message: tuple[Any, ...]) -> None:
        """`message` to a worker without ever blocking the agent's loop: as much as its pipe takes now, the
        rest when it is writable again (a restarted worker's `shared_state` can be large, and a worker
        busy with packets reads its pipe only between batches). The framing is multiprocessing's, so the
        worker reads it with `Connection.recv`."""
        control = self._controls.get(index)
        if control is None:
            return
        frame = _frame(message)
        pending = self._outbox.get(index)
        if pending:
            pending += frame
            return
        sent = self._write(control, frame)
        if 0 <= sent < len(frame):
            self._outbox[index] = bytearray(frame[sent:])
            self.loop.add_writer(control.fileno(), self._flush, index)

    def _write(self, control: Connection, data: bytes | bytearray) -> int:
        """Bytes the pipe took (MSG_DONTWAIT: the descriptor stays blocking for `recv`), -1 if it is gone."""
        try:
            with socket.socket(fileno=os.dup(control.fileno())) as sock:
                return sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError:
            return -1   # it died: `_on_exit` restarts it, with the state of then

    def _flush(self, index: int) -> None:
        control, pending = self._controls.get(index), self._outbox.get(index)
        if control is None or not pending:
            self._drop_outbox(index, control)
            return
        sent = self._write(control, pending)
        if sent < 0:
            self._drop_outbox(index, control)
            return
        del pending[:sent]
        if not pending:
            self._drop_outbox(index, control)

    def _drop_outbox(self, index: int, control: Connection | None) -> None:
        if self._outbox.pop(index, None) is not None and control is not None:
            self.loop.remove_writer(control.fileno())

    def sync(self) -> None:
        """The fleet state changed (health, admin, a return ended): every worker takes it."""
        state = self._state()
        for index in list(self._controls):
            self._send(index, ("state", state))

    def reconfigure(self, config: NodeConfig) -> None:
        """A reload was applied: the same config (with the fleet document it took in) everywhere, then
        the state."""
        self._config = config
        for index in list(self._controls):
            self._send(index, ("config", config))
        self.sync()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "count": self.count,
            "running": 1 + len(self.ready & set(self._processes)),   # ready: reading their queue and socket
            "restarts": self.restarts,
            "pids": {str(index): process.pid for index, process in sorted(self._processes.items())},
            "stats_age_s": {str(index): round(now - seen, 3) for index, (_, _, _, seen) in sorted(self.stats.items())},
            # What each worker read from its TUN queue and its sockets (the agent's own are its counters).
            "packets": {str(index): counters.get("tun_rx_packets", 0) + counters.get("udp_rx_datagrams", 0)
                        for index, (counters, _, _, _) in sorted(self.stats.items())},
            # With [auth]: the replay windows every loop opens against (per sender key and lane).
            "replay_windows": None if self.windows is None else
            {"shared": True, "in_use": self.windows.in_use(), "capacity": self.windows.capacity * 3 // 4},
        }

    def stop(self, timeout: float = 3.0) -> None:
        self._stopping = True
        if self._ticker is not None:
            self._ticker.cancel()
        stop = _frame(("stop",))
        for index, control in list(self._controls.items()):
            if self._outbox.get(index) or self._write(control, stop) != len(stop):
                # Behind a message it has not taken (or a pipe too full for this one): end the pipe
                # instead — EOF stops a worker too — since nothing drains an outbox while we join.
                self._close_control(index)
        deadline = time.monotonic() + timeout
        for process in list(self._processes.values()):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
            self.loop.remove_reader(process.sentinel)
        for index in list(self._controls):
            self._close_control(index)
        self._processes.clear()

    def _close_control(self, index: int) -> None:
        control = self._controls.pop(index)
        self._drop_outbox(index, control)
        self.loop.remove_reader(control.fileno())
        control.close()
