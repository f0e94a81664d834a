"""A distributor's link to its fleet store (etcd): register under a lease, publish what it observes of
the TMs, mirror the fleet's keys through a watch, and hand the agent one coalesced view to apply.

- Registration: `distributors/<name>` and `health/<name>` live under this distributor's lease (`[fleet]
  lease_ttl`), kept alive every third of it; a distributor that dies drops out of the quorum when the
  lease expires.
- Watch storms: events only mark the view dirty; the agent applies it once `settle` seconds after the
  first (100 updates in a second are a handful of rebuilds, tests/test_fleet_sync.py).
- etcd unavailable: the agent keeps forwarding on the last view it applied; `state` says "unavailable"
  (status, metrics) and we reconnect with backoff (attempts at most half `lease_ttl` apart, so a restarted
  etcd never lets our registration lapse first), re-register, re-read everything and watch again, so
  nothing that changed meanwhile is missed and nothing flaps: the view changes only when the store's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import structlog

from overlay.etcd import EtcdClient, EtcdCompacted, EtcdError, WatchEvent
from overlay.fleetview import DISTRIBUTORS, HEALTH, FleetMirror, FleetStoreConfig, FleetView, vote

log = structlog.get_logger("overlay.fleet")

RETRY_MIN, RETRY_MAX = 0.25, 2.0   # seconds between reconnection attempts (doubling)


def retry_max(lease_ttl: float) -> float:
    """The longest wait between reconnection attempts: RETRY_MAX, but at most half the lease's TTL. etcd,
    restarted, restores every lease with about its TTL to live (it renews them all when it elects its
    leader); a distributor that waits longer than that to come back loses its registration meanwhile, and an
    ECMP controller withdraws it and puts it back a moment later — a flap (the ECMP lab, lease_ttl = 1)."""
    return min(RETRY_MAX, max(RETRY_MIN, lease_ttl / 2))


class FleetSync:
    def __init__(self, config: FleetStoreConfig, name: str, registration: dict[str, Any],
                 apply: Callable[[FleetView], None]) -> None:
        self.config = config
        self.name = name
        self.registration = registration
        self._apply_view = apply
        self.mirror = FleetMirror(config.prefix)
        self.state = "connecting"          # "ok" | "unavailable"
        self.last_error: str | None = None
        self.unavailable_since: float | None = None
        self.rebuilds = 0                  # views handed to the agent
        self.events = 0                    # watch events received
        self.outages = 0
        self.applied_revision = 0
        self._vote = vote(set(), set())
        self._client: EtcdClient | None = None
        self._lease = 0
        self._apply_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._delay = RETRY_MIN

    @property
    def prefix(self) -> str:
        return self.mirror.prefix

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run(), name=f"fleet-sync-{self.name}")

    async def stop(self) -> None:
        """Leave the fleet cleanly: revoke our lease (our registration and votes go at once)."""
        for task in (self._task, self._publishing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._apply_handle is not None:
            self._apply_handle.cancel()
        if self._lease and self.state == "ok":
            async with EtcdClient(list(self.config.endpoints), timeout=1.0) as client:
                with contextlib.suppress(EtcdError, OSError, asyncio.TimeoutError):
                    await client.lease_revoke(self._lease)
        self._lease = 0

    async def _run(self) -> None:
        self._delay = RETRY_MIN
        while True:
            self._client = client = EtcdClient(list(self.config.endpoints), timeout=max(1.0, self.config.lease_ttl / 3))
            try:
                await self._session(client)
            except EtcdCompacted:
                continue            # we fell behind a compaction: re-read everything, at once
            except (TimeoutError, EtcdError, OSError) as error:
                self._unavailable(str(error) or type(error).__name__)
            finally:
                await client.close()
                self._client = None
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, retry_max(self.config.lease_ttl))

    async def _session(self, client: EtcdClient) -> None:
        self._lease = await client.lease_grant(self.config.lease_ttl)
        await client.put(self.prefix + DISTRIBUTORS + self.name, json.dumps(self.registration), self._lease)
        await client.put(self.prefix + HEALTH + self.name, self._vote, self._lease)
        pairs, revision = await client.get_prefix(self.prefix)
        self.mirror.load([(kv.key, kv.value, kv.mod_revision) for kv in pairs], revision)
        self._available()
        self._schedule_apply(now=True)
        keepalive = asyncio.get_running_loop().create_task(self._keepalive(client))
        try:
            watch = cast(AsyncGenerator[list[WatchEvent], None], client.watch(self.prefix, revision + 1))
            async with contextlib.aclosing(watch) as batches:
                async for events in batches:
                    for event in events:
                        if event.type == "put":
                            self.mirror.put(event.key, event.value, event.mod_revision)
                        else:
                            self.mirror.delete(event.key, event.mod_revision)
                    self.events += len(events)
                    self._schedule_apply()
                    if keepalive.done():
                        keepalive.result()   # raises what ended it
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keepalive

    async def _keepalive(self, client: EtcdClient) -> None:
        while True:
            await asyncio.sleep(self.config.lease_ttl / 3)
            if await client.lease_keepalive(self._lease) <= 0:
                raise EtcdError("our lease expired (etcd was unreachable longer than lease_ttl)")

    def _available(self) -> None:
        if self.state != "ok":
            log.warning("fleet.store_ok", prefix=self.prefix, revision=self.mirror.revision,
                        was=self.state)
        self.state, self.unavailable_since, self.last_error = "ok", None, None
        self._delay = RETRY_MIN

    def _unavailable(self, error: str) -> None:
        if self.state != "unavailable":
            self.outages += 1
            self.unavailable_since = time.monotonic()
            log.error("fleet.store_unavailable", error=error, keeping_revision=self.applied_revision)
        self.state, self.last_error = "unavailable", error

    # -- the view -------------------------------------------------------------------------------------
    def _schedule_apply(self, now: bool = False) -> None:
        if self._apply_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._apply_handle = loop.call_later(0 if now else self.config.settle, self._apply)

    def _apply(self) -> None:
        self._apply_handle = None
        self.rebuilds += 1
        self.applied_revision = self.mirror.revision
        self._apply_view(self.mirror.view())

    # -- our observations -----------------------------------------------------------------------------
    def publish(self, up: set[str], down: set[str]) -> None:
        """What our own health checks see now; written under our lease (while the store is reachable; a
        reconnection writes the latest)."""
        payload = vote(up, down)
        if payload == self._vote:
            return
        self._vote = payload
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        written = None
        while written != self._vote and self._client is not None and self._lease and self.state == "ok":
            written = self._vote
            try:
                await self._client.put(self.prefix + HEALTH + self.name, written, self._lease)
            except (TimeoutError, EtcdError, OSError) as error:
                log.warning("fleet.vote_not_written", error=str(error))   # the reconnection writes it
                return

    def status(self) -> dict[str, Any]:
        view = self.mirror.view()
        return {
            "store": "etcd",
            "endpoints": list(self.config.endpoints),
            "prefix": self.config.prefix,
            "state": self.state,
            "unavailable_for_s": None if self.unavailable_since is None
            else round(time.monotonic() - self.unavailable_since, 3),
            "last_error": self.last_error,
            "revision": self.mirror.revision,
            "applied_revision": self.applied_revision,
            "rebuilds": self.rebuilds,
            "events": self.events,
            "outages": self.outages,
            "distributors": view.distributors,
            "votes": {name: {"up": sorted(v.up), "down": sorted(v.down)} for name, v in view.votes.items()},
            "admin": view.admin,
            "document_revision": view.document_revision,
            "problems": view.problems,
        }
