"""Offline commands: `overlay check`, `overlay explain`, `overlay replay` — no network, no root."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.configlib import ConfigError

if TYPE_CHECKING:
    from overlay.fleet import Disagreement


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser("check", help="validate a node config (any role) and summarise it, or a whole fleet's")
    check.add_argument("config", nargs="?", help="node config file (TOML)")
    check.add_argument("--fleet", metavar="DIR", type=Path, help="check every *.toml node config in DIR, and that they agree")
    check.add_argument("--json", action="store_true", help="print the summary, or the errors, as JSON")
    check.set_defaults(func=run_check)

    explain = subparsers.add_parser(
        "explain",
        help="show how the distributor decides one packet",
        description="PACKET is the hex bytes of an IP packet (nothing but hex digits, spaces and one leading 0x; "
        "any length) or else a flow spec, e.g. "
        "'tcp 198.51.100.100:40000 > 203.0.113.80:80' or "
        "'icmp 192.0.2.1 > 198.51.100.100 frag-needed mtu 1400 quoting tcp 198.51.100.100:40000 > 203.0.113.10:80'.",
    )
    explain.add_argument("--config", required=True, help="distributor config file")
    explain.add_argument("--from-peer", metavar="ADDR:PORT", help="treat the packet as arriving over the overlay from this underlay peer")
    explain.add_argument("--down", action="append", default=[], metavar="TM", help="consider TM down (repeatable)")
    explain.add_argument("--json", action="store_true", help="machine-readable trace")
    explain.add_argument("packet", nargs="+", help="hex bytes or a flow spec (quote it or not)")
    explain.set_defaults(func=run_explain)

    replay = subparsers.add_parser("replay", help="run a pcap/pcapng through the distributor offline")
    replay.add_argument("--config", required=True, help="distributor config file")
    replay.add_argument("--pcap", required=True, type=Path, help="input capture (pcap or pcapng)")
    replay.add_argument("--out", required=True, type=Path, help="output directory")
    replay.set_defaults(func=run_replay)


def _distributor_config(path: str):  # type: ignore[no-untyped-def]
    from overlay.config import load_node_config

    node = load_node_config(path)
    if node.distributor is None:
        raise ConfigError("node.role", f"is {node.role!r}; this command needs a distributor config", None, path)
    return node


def run_check(args: argparse.Namespace) -> int:
    from overlay.config import load_node_config

    if (args.config is None) == (args.fleet is None):
        print("error: give a CONFIG file or --fleet DIR", file=sys.stderr)
        return 2
    if args.fleet is not None:
        return _check_fleet(args.fleet, args.json)
    try:
        node = load_node_config(args.config)
    except ConfigError as exc:
        return _check_failed({"file": args.config}, [exc], args.json)
    summary: dict[str, object] = {"ok": True, "file": args.config, "errors": [], "role": node.role, "name": node.name,
                                  "digest": node.digest, "auth": node.auth.mode}
    if node.distributor is not None:
        from overlay.distributor.core import Distributor

        distributor = Distributor(node.distributor)
        summary["tms"] = {name: round(share, 4) for name, share in distributor.table.share().items()}
        summary["table_rows"] = distributor.table.rows
        summary["hash_key"] = node.distributor.hash_key
        summary["decision_table"] = node.distributor.decision.render()
    if node.tm is not None:
        summary["mode"] = getattr(node.tm, "mode", None)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.config}: ok ({node.role} {node.name}, sha256 {node.digest[:12]})")
    if not node.auth.enabled:
        print("auth: off — datagrams are not authenticated: anyone who can reach the underlay port and forge a "
              "peer's address can inject packets ([auth], docs/clouds.md)")
    else:
        print(f"auth: {node.auth.mode}, {len(node.auth.private_keys)} private key(s), peers {', '.join(sorted(node.auth.peers))}")
    if node.distributor is not None:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in distributor.table.share().items())
        print(f"table: {distributor.table.rows} rows, hash key {node.distributor.hash_key}; share {shares}")
        print(node.distributor.decision.render())
    return 0


def _check_failed(head: dict[str, object], errors: Sequence[ConfigError | Disagreement], as_json: bool) -> int:
    """Errors as `error: FILE:LINE: FIELD: MESSAGE` lines on stderr, or as the documented JSON on stdout."""
    if as_json:
        print(json.dumps({"ok": False, **head, "errors": [error.as_dict() for error in errors]}, indent=2))
    else:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
    return 1


def _check_fleet(directory: Path, as_json: bool) -> int:
    from overlay.fleet import check_fleet

    fleet = check_fleet(directory)
    if fleet.errors:
        return _check_failed({"fleet": str(directory)}, fleet.errors, as_json)
    names = [node.config.name for node in fleet.nodes]
    if as_json:
        nodes = [{"file": node.config.source, "role": node.config.role, "name": node.config.name} for node in fleet.nodes]
        print(json.dumps({"ok": True, "fleet": str(directory), "errors": [], "nodes": nodes}, indent=2))
        return 0
    counts = f"{_count(len(fleet.distributors), 'distributor')} and {_count(len(fleet.tms), 'TM')}"
    print(f"{directory}: ok ({counts} agree: {', '.join(sorted(names))})")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def run_explain(args: argparse.Namespace) -> int:
    from overlay.configlib import to_endpoint
    from overlay.distributor.core import Distributor
    from overlay.explain import explain, render, to_json
    from overlay.flowspec import FlowSpecError, build_packet, looks_like_hex, parse_hex

    try:
        node = _distributor_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = " ".join(args.packet)
    try:
        packet = parse_hex(text) if looks_like_hex(text) else build_packet(text)
        peer = None
        if args.from_peer:
            address, port = to_endpoint(args.from_peer, 4754)
            peer = (str(address), port)
    except (FlowSpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    distributor = Distributor(node.distributor)
    for name in args.down:
        try:
            distributor.set_tm_up(name, False)
        except KeyError:
            print(f"error: --down {name}: no such TM", file=sys.stderr)
            return 2
    trace = explain(distributor, packet, peer)
    print(to_json(trace) if args.json else render(trace))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from overlay.distributor.core import Distributor
    from overlay.replay import ReplayError, replay

    try:
        node = _distributor_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.pcap.is_file():
        print(f"error: {args.pcap}: no such file", file=sys.stderr)
        return 2
    try:
        summary = replay(Distributor(node.distributor), args.pcap, args.out, str(node.underlay.address), node.underlay.source_ports)
    except ReplayError as exc:
        print(f"error: {args.pcap}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    for warning in summary["warnings"]:
        print(f"warning: {args.pcap}: {warning}", file=sys.stderr)
    # A cut-short file is replayed as far as it goes, but a script must not take that for the whole capture;
    # 3, not 1 (config error) or 2 (usage), so that it can tell "replayed, input incomplete" apart.
    return 3 if summary["truncated"] else 0
