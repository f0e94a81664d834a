"""`overlay ecmp --config router.toml`: keep a router's resilient nexthop groups to the live distributors
(overlay/ecmp.py). Runs until SIGTERM/SIGINT; with `--once`, programs the groups once and exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator
from typing import cast

import structlog

from overlay.configlib import ConfigError
from overlay.ecmp import EcmpConfig, load_ecmp_config, plan, setup
from overlay.etcd import EtcdClient, EtcdCompacted, EtcdError, WatchEvent
from overlay.fleetview import DISTRIBUTORS

log = structlog.get_logger("overlay.ecmp")


def register(subparsers: argparse._SubParsersAction) -> None:
    ecmp = subparsers.add_parser("ecmp", help="keep a router's ECMP nexthop groups to the live distributors (etcd)")
    ecmp.add_argument("--config", required=True, metavar="FILE", help="the controller's config ([fleet], [[group]])")
    ecmp.add_argument("--once", action="store_true", help="program the groups from the current registrations, then exit")
    ecmp.set_defaults(func=run_ecmp)


def run_ecmp(args: argparse.Namespace) -> int:
    try:
        config = load_ecmp_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Controller(config).run(once=args.once))
    except EtcdError as error:
        print(f"error: etcd: {error}", file=sys.stderr)
        return 3


def _execute(command: list[str]) -> bool:
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        log.error("ecmp.command_failed", command=" ".join(command), error=result.stderr.strip())
    return result.returncode == 0


class Controller:
    def __init__(self, config: EcmpConfig) -> None:
        self.config = config
        self.prefix = config.fleet.prefix + "/" + DISTRIBUTORS
        self.live: set[str] = set()
        # Per group, by (namespace, id): groups of two routers may share an id.
        self.applied: dict[tuple[str | None, int], frozenset[str]] = {}

    def apply(self, live: set[str]) -> None:
        self.live = live
        for group in self.config.groups:
            key = (group.namespace, group.id)
            members = frozenset(m.name for m in group.members if m.name in live)
            if members == self.applied.get(key):
                continue
            commands = plan(group, set(live))
            if not commands:
                log.critical("ecmp.no_live_member", group=group.id, namespace=group.namespace,
                             keeping=sorted(self.applied.get(key, ())))
                continue
            if all([_execute(command) for command in commands]):
                log.warning("ecmp.group", group=group.id, namespace=group.namespace, members=sorted(members))
                self.applied[key] = members

    async def run(self, once: bool = False) -> int:
        for group in self.config.groups:
            if all([_execute(command) for command in setup(group)]):
                self.applied[group.namespace, group.id] = frozenset(m.name for m in group.members)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        watcher = loop.create_task(self._follow(once))
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (watcher, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return 0

    async def _follow(self, once: bool) -> None:
        """Registrations in, groups out; through an etcd outage the groups stay as they are."""
        while True:
            try:
                async with EtcdClient(list(self.config.fleet.endpoints)) as etcd:
                    pairs, revision = await etcd.get_prefix(self.prefix)
                    live = {kv.key[len(self.prefix):] for kv in pairs}
                    self.apply(live)
                    if once:
                        return
                    watch = cast(AsyncGenerator[list[WatchEvent], None], etcd.watch(self.prefix, revision + 1))
                    async with contextlib.aclosing(watch) as batches:
                        async for events in batches:
                            for event in events:
                                name = event.key[len(self.prefix):]
                                (live.add if event.type == "put" else live.discard)(name)
                            self.apply(set(live))
            except EtcdCompacted:
                continue
            except (EtcdError, OSError) as error:
                if once:
                    raise EtcdError(str(error)) from error
                log.error("ecmp.store_unavailable", error=str(error), keeping=sorted(self.live))
                await asyncio.sleep(0.5)
