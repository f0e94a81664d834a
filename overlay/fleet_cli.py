"""`overlay fleet`: operate a fleet whose distributors share their state in etcd ([fleet] store = "etcd").

    overlay fleet --config dist1.toml get                 # the document, admin states, distributors, votes
    overlay fleet --config dist1.toml put fleet.toml      # replace the [[tm]] document (validated first)
    overlay fleet --config dist1.toml drain tm2           # or enable / disable
    overlay fleet --etcd http://10.0.0.5:2379 --prefix /overlay/prod get

`--config` names a distributor config: its `[fleet]` gives the endpoints and prefix, and `put` validates
the document against it exactly as every distributor will (the same parser as a reload), so a document
that any distributor would refuse never reaches the store. `put` is a compare-and-swap on the revision it
read (`--force` to skip): two operators never overwrite each other silently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from overlay.config import load_node_config, parse_node_config
from overlay.configlib import ConfigError, read_text
from overlay.etcd import EtcdClient, EtcdError
from overlay.fleetview import ADMIN, ADMIN_STATES, TMS_KEY, FleetMirror, parse_fleet_document

_STATE_OF_VERB = {"drain": "draining", "enable": "enabled", "disable": "disabled"}


def register(subparsers: argparse._SubParsersAction) -> None:
    fleet = subparsers.add_parser("fleet", help="operate a fleet shared by several distributors through etcd")
    fleet.add_argument("--config", metavar="FILE", help="a distributor config: its [fleet] endpoints and prefix")
    fleet.add_argument("--etcd", metavar="URL[,URL]", help="etcd endpoints (instead of --config's)")
    fleet.add_argument("--prefix", help="the fleet's key prefix (instead of --config's)")
    commands = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    commands.add_parser("get", help="print the fleet as the store holds it (JSON)")
    put = commands.add_parser("put", help="replace the fleet document ([[tm]] tables) after validating it")
    put.add_argument("document", help="a TOML file of [[tm]] tables (a distributor config's syntax)")
    put.add_argument("--force", action="store_true", help="write even if the document changed since it was read")
    for verb in _STATE_OF_VERB:
        action = commands.add_parser(verb, help=f"{verb} a TM at every distributor")
        action.add_argument("tm")
    fleet.set_defaults(func=run_fleet)


def run_fleet(args: argparse.Namespace) -> int:
    try:
        endpoints, prefix, config_path = _where(args)
        return asyncio.run(_run(args, endpoints, prefix, config_path))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except EtcdError as error:
        print(f"error: etcd: {error}", file=sys.stderr)
        return 3


def _where(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    endpoints: list[str] = []
    prefix = None
    if args.config:
        node = load_node_config(args.config)
        if node.distributor is None:
            raise ConfigError("node.role", "--config must be a distributor's config", None, args.config)
        endpoints, prefix = list(node.distributor.fleet.endpoints), node.distributor.fleet.prefix
    if args.etcd:
        endpoints = [url.strip().rstrip("/") for url in args.etcd.split(",") if url.strip()]
    if args.prefix:
        prefix = args.prefix.rstrip("/")
    if not endpoints or not prefix:
        raise ConfigError("fleet", "give --config (a distributor config with [fleet]) or --etcd and --prefix", None, None)
    return endpoints, prefix, args.config


async def _run(args: argparse.Namespace, endpoints: list[str], prefix: str, config_path: str | None) -> int:
    async with EtcdClient(endpoints) as etcd:
        base = prefix + "/"
        if args.fleet_command == "get":
            pairs, revision = await etcd.get_prefix(base)
            mirror = FleetMirror(prefix)
            mirror.load([(kv.key, kv.value, kv.mod_revision) for kv in pairs], revision)
            view = mirror.view()
            out: dict[str, Any] = {
                "prefix": prefix, "revision": revision, "document": view.document,
                "document_revision": view.document_revision, "admin": view.admin,
                "distributors": view.distributors,
                "votes": {name: {"up": sorted(v.up), "down": sorted(v.down)} for name, v in view.votes.items()},
                "problems": view.problems,
            }
            print(json.dumps(out, indent=2))
            return 0
        if args.fleet_command == "put":
            text = read_text(Path(args.document), "fleet document")
            document = parse_fleet_document(text, args.document)
            if config_path is not None:
                # Exactly what every distributor will do with it: the reload parser, with this document.
                parse_node_config(read_text(Path(config_path)), config_path, Path(config_path).parent, document)
            if args.force:
                await etcd.put(base + TMS_KEY, text)
            else:
                current = await etcd.get(base + TMS_KEY)
                if not await etcd.txn_put_if(base + TMS_KEY, text, current.mod_revision if current else 0):
                    print("error: the fleet document changed while we validated it: read it again (or --force)",
                          file=sys.stderr)
                    return 4
            print(f"fleet document {base}{TMS_KEY} written")
            return 0
        state = _STATE_OF_VERB[args.fleet_command]
        assert state in ADMIN_STATES
        await etcd.put(base + ADMIN + args.tm, state)
        print(f"{args.tm}: {state} (every distributor watching {prefix})")
        return 0
