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
  before the agent reloads it). The distributor is stateless per packet, so which process sees a packet
  never matters.
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

Here: the agent's side (`WorkerPool`). The worker processes' loops are overlay/runtime/worker_loops.py;
what the loops tell each other, overlay/runtime/sharing.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
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
from overlay.runtime.sharing import ShareFilter
from overlay.runtime.worker_loops import STATS_INTERVAL, worker_main

log = structlog.get_logger("overlay.workers")

RESTART_DELAY = 1.0

FleetState = tuple[dict[str, str], dict[str, bool], frozenset[str]]


def node_windows(config: NodeConfig) -> SharedWindows | None:
    """The replay windows a node's loops share (overlay/antireplay.py) — several loops with [auth] on, else
    None. Sized for its peers: one window per sender key and lane, room for each key in several lanes and for
    the keys reloads and the fleet store add (a power of two; 32 KiB a window, touched only once used; the
    keys table 8 bytes a window). The agent's own authenticator opens with them, then its WorkerPool hands
    them to every worker and closes them when it stops."""
    if config.workers < 2 or not config.auth.enabled:
        return None
    keys = sum(len(keys) for keys in config.auth.peers.values())
    return SharedWindows.create(max(8192, 1 << (16 * keys - 1).bit_length()))


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

    def add_totals(self, counters: dict[str, int], drops: dict[str, int]) -> None:
        """The workers' counters and drops onto the agent's own (one node, several loops: they add up)."""
        for worker_counters, _, worker_drops, _ in self.stats.values():
            for name, value in worker_counters.items():
                counters[name] = counters.get(name, 0) + value
            for reason, value in worker_drops.items():
                drops[reason] = drops.get(reason, 0) + value

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
        if self.windows is not None:
            self.windows.close()
            self.windows = None

    def _close_control(self, index: int) -> None:
        control = self._controls.pop(index)
        self._drop_outbox(index, control)
        self.loop.remove_reader(control.fileno())
        control.close()
