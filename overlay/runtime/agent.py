"""What every agent shares: lifecycle, signals, reload, the status service, and start-up errors in plain words.

An agent's life: `open()` the transports and the host setup (synchronously, so a failure is reported
before anything runs), `serve()` until SIGTERM/SIGINT, then `close()`: stop reading, take one last pass
over what the kernel already queued for us (packets in flight are decided and sent, not dropped), remove
every route, rule and device this run added, exit 0. SIGHUP (and the admin API's reload) re-reads the
config; a config that fails to load is logged and the old one keeps running.

Role specifics live in `DistributorAgent` and `TMAgent`, which fill in the `_open_role`, `_close_role`,
`_reconfigure` and `_role_status` hooks.
"""

from __future__ import annotations

import abc
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from overlay import __version__
from overlay.antireplay import SharedWindows
from overlay.auth import Authenticator
from overlay.config import NodeConfig, load_node_config
from overlay.configlib import ConfigError
from overlay.runtime.netsetup import NetPlan, NetSetup
from overlay.runtime import batchio
from overlay.runtime.tun import TunDevice, TunError, wants_offload
from overlay.runtime.udp import UnderlayEndpoint
from overlay.status.admin import AdminTokenError, load_admin_token
from overlay.status.server import start_status_server

log = structlog.get_logger("overlay.runtime")


class StartupError(RuntimeError):
    """The agent cannot start for a reason the operator can fix; the message says what to do."""


def authenticator(config: NodeConfig, lane: int = 0, windows: SharedWindows | None = None) -> Authenticator | None:
    """The node's datagram authenticator, its counter started at the wall clock (overlay/auth.py); `lane`:
    the packet loop's (worker i seals in lane i); `windows`: the replay windows all the node's loops share."""
    return Authenticator(config.auth, time.time_ns(), lane, windows) if config.auth.enabled else None


def reconfigured_authenticator(running: Authenticator | None, old: NodeConfig, new: NodeConfig) -> Authenticator | None:
    """New keys for a reload (rotation); switching authentication on or off needs a restart (the TUN's
    MTU and every peer's expectations change with it)."""
    if old.auth.enabled != new.auth.enabled:
        raise ValueError("auth.mode: switching authentication on or off applies only at restart")
    if running is None:
        return None
    return running.reconfigure(new.auth)


def restart_only_changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """Fields a reload cannot apply to a running agent (sockets, devices, routes are built from them)."""
    changed = []
    for field in ("role", "name", "underlay", "tun", "status", "workers"):
        if getattr(old, field) != getattr(new, field):
            changed.append(field)
    return changed


class Agent(abc.ABC):
    """The shared half of an agent; a subclass supplies the core and the packet plumbing."""

    role = ""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.generation = 1
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tun: TunDevice | None = None
        self.udp: UnderlayEndpoint | None = None
        self.netsetup: NetSetup | None = None
        self.reloads = {"ok": 0, "failed": 0}
        self.exit_code = 0
        self.last_reload_error: str | None = None
        self._stop = asyncio.Event()
        self._status_server: Any = None

    # -- lifecycle ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def net_plan(self) -> NetPlan:
        """The addresses, routes and rules this role needs around its TUN."""

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the TUN, set up the host, bind the underlay, build the core; undo everything on failure."""
        self.loop = loop
        config = self.config
        try:
            self.netsetup = NetSetup(self.net_plan())
            try:
                # Several workers read queues of one multi-queue TUN (the flag is the device's, set at creation).
                self.tun = TunDevice(config.tun.name, multi_queue=config.workers > 1,
                                     offload=wants_offload(config.tun.offload, config.role))
            except TunError as error:
                raise StartupError(str(error)) from None
            stale = self.netsetup.clean_stale()
            if stale:
                log.warning("netsetup.stale_removed", count=stale, tun=config.tun.name)
            try:
                self.netsetup.apply()
            except NetlinkError as error:
                raise StartupError(f"setting up routes/rules for {config.tun.name}: {error}") from None
            for warning in self.netsetup.warnings:
                log.warning("netsetup.warning", message=warning)
            try:
                self.udp = UnderlayEndpoint(
                    config.underlay.address, config.underlay.port, source_ports=self.source_ports()
                )
            except OSError as error:
                raise StartupError(
                    f"cannot bind the underlay {config.underlay.address}:{config.underlay.port}: {error.strerror}"
                    f" — is {config.underlay.address} an address of this host, and is the port free?"
                ) from None
            self._open_role(loop)
        except BaseException:
            self._release()
            raise
        log.info(
            "agent.started",
            role=self.role,
            name=config.name,
            tun=self.tun.name,
            underlay=f"{config.underlay.address}:{self.udp.port}",
            source_ports=self.udp.source_ports,
            config=config.source,
            digest=config.digest[:12],
            auth=config.auth.mode,
        )
        if not config.auth.enabled:
            log.warning("agent.unauthenticated", reason="no [auth]: anyone who can reach the underlay port and "
                        "forge a peer's address can inject packets (docs/clouds.md)")

    async def serve(self) -> None:
        """Run the status service until SIGTERM/SIGINT (or `stop()`)."""
        try:
            status = self.config.status
            try:
                token = load_admin_token(status.admin_token_file) if self.admin() is not None else None
            except AdminTokenError as error:
                raise StartupError(f"{error} (status.admin_token_file in {self.config.source})") from None
            try:
                self._status_server = await start_status_server(
                    self, status.host, status.port, admin=self.admin(), admin_token=token
                )
            except OSError as error:
                raise StartupError(
                    f"status service cannot listen on {status.host}:{status.port}: {error.strerror}"
                ) from None
            await self._stop.wait()
        finally:
            if self._status_server is not None:
                await self._status_server.close()
                self._status_server = None

    def stop(self, signum: int | None = None) -> None:
        if not self._stop.is_set():
            log.info("agent.stopping", signal=signal.Signals(signum).name if signum else None)
            self._stop.set()

    def tun_lost(self, error: OSError) -> None:
        """The TUN went away (deleted by someone): nothing can flow any more; exit 1 so a supervisor restarts."""
        log.critical("tun.lost", tun=self.config.tun.name, error=error.strerror)
        self.exit_code = 1
        self.stop()

    def close(self) -> None:
        """Stop reading, handle what already arrived, then remove everything this run added."""
        if self.tun is not None:
            self.tun.stop_reading()
        if self.udp is not None:
            self.udp.stop_reading()
        in_flight = 0
        if self.udp is not None:
            in_flight += self.udp.drain_all()
        if self.tun is not None:
            in_flight += self.tun.drain()
        self._release()
        log.info("agent.stopped", role=self.role, name=self.config.name, in_flight_handled=in_flight)

    def _release(self) -> None:
        self._close_role()
        if self.netsetup is not None:
            self.netsetup.undo()
        if self.tun is not None:
            self.tun.close()
        if self.udp is not None:
            self.udp.close()

    # -- reload ---------------------------------------------------------------------------------------

    def reload(self) -> dict:
        """Re-read the config file; apply it atomically or keep the old one. Returns what the admin API shows."""
        path = self.config.source
        try:
            new = self._load_config(path)
            blocked = restart_only_changes(self.config, new)
            if blocked:
                raise ConfigError("", f"changed {', '.join(blocked)}: these apply only at restart", None, path)
            self._reconfigure(new)
        except (ConfigError, ValueError) as error:
            return self._reload_failed(str(error))
        except Exception as error:
            # A bug in a core's reconfigure must not take the running agent down with it: the dry run
            # (see `_reconfigure`) makes it very likely the running core is still the old, whole one.
            log.exception("config.reload_crashed")
            return self._reload_failed(f"internal error applying {path}: {error!r}")
        if new.log != self.config.log:
            log.warning("config.log_settings_need_restart", format=new.log.format, level=new.log.level)
        self.config = new
        self.generation += 1
        self.reloads["ok"] += 1
        self.last_reload_error = None
        log.info("config.reloaded", generation=self.generation, digest=new.digest[:12])
        return {"ok": True, "error": None, "generation": self.generation}

    def _load_config(self, path: str) -> NodeConfig:
        """The config a reload applies (a distributor with a fleet store adds the store's [[tm]] tables)."""
        return load_node_config(path)

    async def leave(self) -> None:
        """Before closing: say goodbye to whatever shares our state (a distributor's fleet store)."""
        return None

    def _reload_failed(self, error: str) -> dict:
        self.reloads["failed"] += 1
        self.last_reload_error = error
        log.error("config.reload_failed", error=error, keeping_generation=self.generation)
        return {"ok": False, "error": error, "generation": self.generation}

    # -- status (the StatusProvider protocol) -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    def admin(self) -> Any:
        return None

    def transport_counters(self) -> dict[str, int]:
        counters: dict[str, int] = {}
        if self.tun is not None:
            counters.update(self.tun.counters)
        if self.udp is not None:
            counters.update(self.udp.counters)
        counters["config_reloads_ok"] = self.reloads["ok"]
        counters["config_reloads_failed"] = self.reloads["failed"]
        return counters

    def status(self) -> dict:
        status: dict[str, Any] = {
            "role": self.role,
            "name": self.config.name,
            "version": __version__,
            "started": self.started_wall,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "config": {
                "generation": self.generation,
                "hash": self.config.digest,
                "source": str(Path(self.config.source)),
                "last_reload_error": self.last_reload_error,
            },
            "underlay": {
                "address": str(self.config.underlay.address),
                "port": self.udp.port if self.udp else None,
                "source_ports": self.udp.source_ports if self.udp else [],
            },
            "tun": self.config.tun.name,
            # How fast the packet path is built here (issue 10): the compiled batch I/O, TUN offloads.
            "datapath": {
                "compiled": batchio.COMPILED,
                "tun_offload": bool(self.tun and self.tun.offload),
                "workers": self.config.workers,
            },
        }
        status.update(self._role_status())
        return status

    def healthy(self) -> tuple[bool, dict]:
        return True, {"role": self.role, "generation": self.generation}

    # -- hooks for the roles ----------------------------------------------------------------------------

    def source_ports(self) -> int:
        """How many flow-entropy send sockets this role binds (RFC 8086)."""
        return self.config.underlay.source_ports

    @abc.abstractmethod
    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build the core and start reading the TUN and the underlay into it."""

    @abc.abstractmethod
    def _close_role(self) -> None:
        """Cancel the role's timers; must be safe when `_open_role` never ran or failed half-way."""

    @abc.abstractmethod
    def _reconfigure(self, new: NodeConfig) -> None:
        """Apply a reloaded config to the core(s) all at once, or raise (ValueError) and change nothing."""

    @abc.abstractmethod
    def _role_status(self) -> dict:
        """The role's part of `status()`: the core's snapshot and counters, health, peers."""


async def run_agent(agent: Agent) -> int:
    """Open, serve until told to stop, close: the whole life of an agent process. Returns the exit code."""
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM during start-up is then handled (after `open`) like any other.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop, signum)
    loop.add_signal_handler(signal.SIGHUP, agent.reload)
    try:
        try:
            agent.open(loop)
        except StartupError as error:
            log.error("agent.cannot_start", role=agent.role, name=agent.config.name, error=str(error))
            return 2
        try:
            await agent.serve()
        except StartupError as error:
            log.error("agent.cannot_start", role=agent.role, name=agent.config.name, error=str(error))
            return 2
        finally:
            try:
                await asyncio.wait_for(agent.leave(), 2.0)
            except Exception:   # leaving is a courtesy (a timeout included): never block the close
                log.warning("agent.leave_failed", role=agent.role)
            agent.close()
        return agent.exit_code
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


class UplinkAgent(Agent):
    """What a TM and an edge agent share around their `overlay.uplink.Uplink` node: the distributors by
    name, and sealed announces every `underlay.announce_interval` (auth on only)."""

    node: Any = None
    _announce_timer: asyncio.TimerHandle | None = None

    @staticmethod
    def _distributors(config: NodeConfig) -> dict[str, tuple[str, int]]:
        """Each [[distributor]] by name: where answers go."""
        return {name: (str(address), port) for name, (address, port) in zip(config.distributor_names, config.distributors)}

    def _announce(self) -> None:
        assert self.node is not None and self.udp is not None and self.loop is not None
        announcements = self.node.announcements()
        for datagram, distributor in announcements:
            self.udp.reply(datagram, distributor)
        interval = self.config.underlay.announce_interval
        if announcements and interval > 0:
            self._announce_timer = self.loop.call_later(interval, self._announce)  # re-armed each time

    def _stop_announcing(self) -> None:
        if self._announce_timer is not None:
            self._announce_timer.cancel()
            self._announce_timer = None
