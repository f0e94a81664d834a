"""The distributor agent: TUN + GRE-in-UDP sockets around `overlay.distributor.core.Distributor`.

Per packet the agent only executes the core's `Verdict`: "tm" → `sendto(dest)` from the source-port
socket its flow hash picks (RFC 8086 entropy); "forward" → into the TUN (the host routes it on), or to
an edge agent when the verdict names one; "local" → an echoed keepalive for the health checker; "drop" →
nothing (the core counted it with its reason).

Health: one `loop.call_at` timer, re-armed to `HealthChecker.next_deadline()`, sends keepalives
(GRE protocol 0x88B5) through the same tunnel as traffic and applies up/down changes to the core. What the
table serves follows `HealthChecker.serving()`, so the all-down policy `keep-last` is honoured here too.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import structlog

from overlay import gre
from overlay.config import NodeConfig, load_node_config
from overlay.fleetview import FleetView
from overlay.runtime.fleet_sync import FleetSync
from overlay.distributor.core import PINNED, Distributor
from overlay.health import HealthChecker
from overlay.runtime.agent import Agent, authenticator, reconfigured_authenticator
from overlay.runtime.netsetup import NetPlan, distributor_plan
from overlay.runtime.packet_path import packet_handlers
from overlay.runtime.tables import TableBuilder
from overlay.runtime.udp import attach_steering
from overlay.runtime.workers import WorkerPool, node_windows

log = structlog.get_logger("overlay.distributor")

HTTP_HEALTH_PATH = "/healthz"


class DistributorAgent(Agent):
    role = "distributor"

    def __init__(self, config: NodeConfig):
        if config.distributor is None:
            raise ValueError(f"{config.source}: not a distributor config (node.role = {config.role!r})")
        super().__init__(config)
        self.core: Distributor | None = None
        self.health: HealthChecker | None = None
        self._serving: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._http_checks: set[asyncio.Task[None]] = set()
        self._all_down_logged = False
        self._probes_sent = 0
        # [fleet] store = "etcd": the TM set, admin states and agreed health come from the store.
        self.fleet: FleetSync | None = None
        self._fleet_view: FleetView | None = None
        self._fleet_document_revision = 0
        self.fleet_document_error: str | None = None
        self.pool: WorkerPool | None = None          # [node] workers > 1: the other packet loops
        self.tables: TableBuilder | None = None
        self._synced_state: object = None

    def net_plan(self) -> NetPlan:
        return distributor_plan(self.config.tun)

    def admin(self) -> Any:
        return self

    # -- packets --------------------------------------------------------------------------------------

    def _open_role(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.config.distributor is not None and self.tun is not None and self.udp is not None
        dconfig = self.config.distributor
        windows = node_windows(self.config)   # several loops with [auth]: one set of replay windows for all
        self.core = core = Distributor(dconfig, authenticator(self.config, windows=windows))
        core.clock = loop.time
        self.tables = core.prepare_tables = TableBuilder(loop)   # full table builds off the loop
        now = loop.time()
        self.health = HealthChecker(dconfig.health, [tm.name for tm in dconfig.tms], now, sender=self.config.name)
        self._serving = self.health.serving()
        for tm in dconfig.tms:
            core.set_tm_up(tm.name, tm.name in self._serving)
        (from_tun, from_overlay, from_tun_train, from_overlay_train, from_tun_batch,
         from_overlay_batch) = packet_handlers(core, self.tun, self.udp, self._on_keepalive)
        self.tun.start(loop, from_tun, self.tun_lost, from_tun_train, from_tun_batch)
        self.udp.start(loop, from_overlay, from_overlay_train, from_overlay_batch)
        self._arm_health(now)
        if self.config.workers > 1:
            # The receive sockets of all workers form one SO_REUSEPORT group: spread by the inner flow.
            attach_steering(self.udp.receive_socket, self.config.workers)
            self.pool = WorkerPool(self.config.workers, loop, core.fleet_state, self._on_shared, core.shared_state,
                                   windows)
            core.share = self.pool.share
            self.pool.start(self.config)
            self._synced_state = core.fleet_state()
        if dconfig.fleet.store == "etcd":
            registration = {"underlay": f"{self.config.underlay.address}:{self.config.underlay.port}",
                            "status": f"{self.config.status.host}:{self.config.status.port}",
                            "started": time.time()}
            self.fleet = FleetSync(dconfig.fleet, self.config.name, registration, self._apply_fleet)
            self.fleet.start(loop)

    # -- the fleet store ------------------------------------------------------------------------------

    def _apply_fleet(self, view: FleetView) -> None:
        """A new view of the store (coalesced): its [[tm]] document through the reload path (validated the
        same way; a bad one is refused and the running fleet kept), then admin states, then agreed health."""
        assert self.core is not None and self.loop is not None
        self._fleet_view = view
        if view.document is not None and view.document_revision != self._fleet_document_revision:
            self._fleet_document_revision = view.document_revision
            result = self.reload()
            self.fleet_document_error = None if result["ok"] else result["error"]
        states = self.core.tm_states()
        for tm, state in states.items():
            wanted = view.admin.get(tm, "enabled")
            if state["admin"] != wanted:
                log.warning("tm.admin_state", tm=tm, state=wanted, previous=state["admin"], by="fleet store")
                self.core.set_tm_state(tm, wanted)
                self._arm_return(tm)
        self._apply_health(self.loop.time())

    def _load_config(self, path: str) -> NodeConfig:
        view = self._fleet_view
        if self.fleet is None or view is None or view.document is None:
            return load_node_config(path)
        return load_node_config(path, view.document, f"etcd:{self.fleet.prefix}tms")

    async def leave(self) -> None:
        if self.fleet is not None:
            await self.fleet.stop()

    def _on_shared(self, message: tuple[Any, ...]) -> None:
        """What a worker learned that we need too (overlay/runtime/workers.py)."""
        assert self.core is not None
        kind, peer, value = message
        if kind == "keepalive":
            self._on_keepalive(value)
        elif kind == "fanned":
            self.core.replication_lag.fanned(peer, *value)
        elif kind == "acked":
            self.core.replication_lag.acked(peer, *value)
        else:
            self.core.apply_shared(message)

    def _on_keepalive(self, payload: bytes) -> None:
        assert self.health is not None and self.loop is not None
        now = self.loop.time()
        self.health.on_reply(payload, now)
        self._apply_health(now)

    # -- health ---------------------------------------------------------------------------------------

    def _arm_health(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self.health is not None and self.loop is not None
        deadline = self.health.next_deadline()
        if deadline != float("inf"):
            self._timer = self.loop.call_at(max(deadline, now), self._on_health_timer)

    def _on_health_timer(self) -> None:
        assert self.health is not None and self.loop is not None and self.udp is not None
        assert self.config.distributor is not None
        now = self.loop.time()
        assert self.core is not None
        for tm, payload in self.health.due_probes(now):
            # Sealed when authentication is on; to the TM's learned endpoint when it is behind NAT.
            datagram, destination = self.core.keepalive_datagram(tm, payload)
            # Probes rotate over the source ports, so over time each TM is probed on every ECMP path
            # its traffic may take, not just one (a TM behind NAT: from the well-known port only).
            self._probes_sent += 1
            self.udp.send(datagram, destination, PINNED if self.core.behind_nat(tm) else self._probes_sent)
        for tm in self.health.due_http(now):
            task = self.loop.create_task(self._check_http(tm))
            self._http_checks.add(task)
            task.add_done_callback(self._http_checks.discard)
        self._apply_health(now)
        self._arm_health(now)

    async def _check_http(self, tm: str) -> None:
        """`/healthz` of the TM's status service on its first management address (same port as ours)."""
        import aiohttp

        assert self.health is not None and self.config.distributor is not None and self.loop is not None
        entry = next((entry for entry in self.config.distributor.tms if entry.name == tm), None)
        if entry is None or not entry.management:
            self.health.on_http(tm, False, self.loop.time())
            return
        address = entry.management[0]
        host = f"[{address}]" if address.version == 6 else str(address)
        url = f"http://{host}:{self.config.status.port}{HTTP_HEALTH_PATH}"
        timeout = aiohttp.ClientTimeout(total=self.health.config.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url) as response:
                    ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        now = self.loop.time()
        self.health.on_http(tm, ok, now)
        self._apply_health(now)

    def _apply_health(self, now: float) -> None:
        """Feed up/down changes to the core; log each loudly, and the fleet being all down louder."""
        assert self.health is not None and self.core is not None
        for tm, up in self.health.tick(now):
            if up:
                log.warning("tm.up", tm=tm)
            else:
                log.error("tm.down", tm=tm, detection_time_s=self.health.config.detection_time)
        serving = self.health.serving()
        if self.fleet is not None:
            # Ours is one vote; the table follows what a majority of the distributors observe, and while
            # the store is unreachable, the last agreed view (the same at every distributor).
            tms = set(self.health.up()) | set(self._tm_names())
            self.fleet.publish(serving, tms - serving)
            if self._fleet_view is not None:
                if self.fleet.state == "ok":
                    names = self._tm_names()
                    serving = set(names) - self._fleet_view.agreed_down(names)
                else:
                    serving = self._serving
        if serving != self._serving:
            grace = self.health.config.return_grace
            changed = serving ^ self._serving
            self.core.set_tms_up({tm: tm in serving for tm in sorted(changed)})   # one rebuild for the pass
            for tm in changed:
                if tm in serving and grace > 0 and self.loop is not None:
                    self.loop.call_later(grace, self._end_return, tm, self.core.return_token(tm))
            self._serving = serving
        all_down = self.health.all_down()
        if all_down and not self._all_down_logged:
            log.critical("fleet.all_down", policy=self.health.config.all_down, serving=sorted(serving))
        elif not all_down and self._all_down_logged:
            log.warning("fleet.recovered", up=sorted(self.health.up()))
        self._all_down_logged = all_down
        self._sync_workers()

    def _arm_return(self, tm: str) -> None:
        """A TM enabled again after a drain shares its rows for `return_grace` (Distributor.set_tm_state)."""
        assert self.core is not None and self.loop is not None and self.health is not None
        if self.core.tm_states()[tm]["returning"]:
            self.loop.call_later(self.health.config.return_grace, self._end_return, tm, self.core.return_token(tm))

    def _end_return(self, tm: str, token: int) -> None:
        assert self.core is not None
        self.core.end_return(tm, token)
        self._sync_workers()

    def _sync_workers(self) -> None:
        """Every worker decides from the same fleet state as we do: hand it over when it changed."""
        if self.pool is not None and self.core is not None:
            state = self.core.fleet_state()
            if state != self._synced_state:
                self._synced_state = state
                self.pool.sync()

    # -- control --------------------------------------------------------------------------------------

    def _tm_names(self) -> list[str]:
        assert self.config.distributor is not None
        return [tm.name for tm in self.config.distributor.tms]

    def set_tm_state(self, name: str, state: str) -> dict:
        """Admin API: drain/enable/disable a TM (KeyError for an unknown TM, ValueError for a bad state)."""
        assert self.core is not None
        if self.fleet is not None:
            raise ValueError("this fleet's admin states live in its store: use `overlay fleet drain|enable|disable`")
        previous = self.core.tm_states()[name]["admin"]
        self.core.set_tm_state(name, state)
        self._arm_return(name)
        self._sync_workers()
        log.warning("tm.admin_state", tm=name, state=state, previous=previous)
        return {"tm": name, "state": state, "previous": previous}

    def _reconfigure(self, new: NodeConfig) -> None:
        assert self.core is not None and self.health is not None and self.loop is not None
        if new.distributor is None:
            raise ValueError("the reloaded config is not a distributor's")
        # Dry run first: a config the core refuses raises here, before the running core changes at all.
        Distributor(new.distributor)
        rekeyed = reconfigured_authenticator(self.core.auth, self.config, new)
        self.core.reconfigure(new.distributor)
        self.core.auth = rekeyed
        now = self.loop.time()
        if new.distributor.health != self.health.config:
            self.health.config = new.distributor.health
        self.health.set_tms([tm.name for tm in new.distributor.tms], now)
        self._serving = self.health.serving()
        for tm in new.distributor.tms:
            self.core.set_tm_up(tm.name, tm.name in self._serving)
        self._arm_health(now)
        if self.pool is not None:
            self.pool.reconfigure(new)
            self._synced_state = self.core.fleet_state()

    def _close_role(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._http_checks):
            task.cancel()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self.tables is not None:
            self.tables.close()
            self.tables = None

    # -- status ---------------------------------------------------------------------------------------

    def _role_status(self) -> dict:
        if self.core is None or self.health is None:
            return {}
        snapshot = self.core.snapshot()
        counters = self.transport_counters()
        counters.update(self.core.counters())
        counters["table.rebuilds_deferred"] = self.core.rebuilds_deferred   # full builds run off the loop
        if self.pool is not None:
            # One fleet, several packet loops: their counters add up (status, metrics, the page).
            self.pool.add_totals(counters, snapshot["drops"])  # type: ignore[arg-type]
            for _, by_tm, _, _ in self.pool.stats.values():
                for tm, value in by_tm.items():
                    if tm in snapshot["tms"]:  # type: ignore[operator]
                        snapshot["tms"][tm]["packets"] += value  # type: ignore[index]
        # Replication per TM: seconds since its last batch (≈ its [tm.replication] interval while it has
        # changes), and per standby the lag of its acks (distributor → standby → distributor).
        now = self.loop.time() if self.loop is not None else 0.0
        replication = self.core.replication_lag.status(now)
        fleet: dict[str, Any] = {"store": "file"}
        if self.fleet is not None:
            fleet = self.fleet.status()
            fleet["document_error"] = self.fleet_document_error
            names = self._tm_names()
            fleet["agreed_down"] = sorted(self._fleet_view.agreed_down(names)) if self._fleet_view else None
            counters["fleet.rebuilds"] = self.fleet.rebuilds
            counters["fleet.store_outages"] = self.fleet.outages
            gauges = {"fleet.store_available": int(self.fleet.state == "ok"), "fleet.distributors": len(fleet["distributors"])}
        else:
            gauges = {}
        workers = {"count": 1, "running": 1} if self.pool is None else self.pool.status()
        return {**snapshot, "health": self.health.snapshot(), "counters": counters, "replication": replication,
                "fleet": fleet, "workers": workers, **({"gauges": gauges} if gauges else {})}

    def healthy(self) -> tuple[bool, dict]:
        if self.health is None:
            return False, {"reason": "starting"}
        up = sorted(self.health.up())
        return bool(up), {"up": up, "serving": sorted(self.health.serving()), "generation": self.generation}
