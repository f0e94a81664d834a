"""`overlay status [URL]` and the admin calls behind `overlay tm drain|enable|disable NAME`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from overlay.status.admin import TM_ACTIONS, TOKEN_ENV, AdminTokenError, load_admin_token
from overlay.status.client import DEFAULT_TIMEOUT, DEFAULT_URL, Reply, StatusClientError, base_url, get_json, request

# Share and rate columns summarise this many recent seconds of /api/history.
RECENT_SECONDS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a node's status (role, config, TMs, health, drops)",
        description="Print a node's status service (/status, /healthz, /api/history) as a terminal summary.",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"status service URL (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the raw /status JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per request (default %(default)s)")
    parser.set_defaults(func=_status_command)

    reload = subparsers.add_parser(
        "reload",
        help="ask a distributor to reload its config (same as SIGHUP)",
        description="POST /admin/reload: the distributor validates the file, swaps atomically, or refuses and keeps the running config.",
    )
    reload.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"distributor status URL (default {DEFAULT_URL})")
    reload.add_argument("--token-file", help="admin token file (default: $OVERLAY_ADMIN_TOKEN)")
    reload.set_defaults(func=_reload_command)


def _reload_command(args: argparse.Namespace) -> int:
    from overlay.status.admin import AdminTokenError, load_admin_token

    try:
        token = load_admin_token(args.token_file)
    except AdminTokenError as error:
        print(f"overlay reload: {error}", file=sys.stderr)
        return 2
    return admin_reload(base_url(args.url), token)


def _status_command(args: argparse.Namespace) -> int:
    url = base_url(args.url)
    try:
        status = get_json(f"{url}/status", args.timeout)
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
            return 0
        health = get_json(f"{url}/healthz", args.timeout)
        history = get_json(f"{url}/api/history", args.timeout)
    except StatusClientError as error:
        print(f"overlay status: {error}", file=sys.stderr)
        return 1
    print(format_summary(status, health, history))
    return 0 if health.get("ok") else 1


# -- the summary ------------------------------------------------------------------------------------------


def recent_rates(history: Mapping[str, Any], seconds: float = RECENT_SECONDS) -> dict[str, float]:
    """Average packets/s per series over the last `seconds` of a /api/history answer."""
    packets: dict[str, float] = {}
    span = 0.0
    for sample in history.get("samples", []):
        if sample.get("age", seconds) < seconds:
            span += sample["span"]
            for name, pps in sample.get("pps", {}).items():
                packets[name] = packets.get(name, 0.0) + pps * sample["span"]
    return {name: total / span for name, total in packets.items()} if span else {}


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    seconds = int(seconds)
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds % 60}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _pairs(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(mapping.items()))


def format_summary(status: Mapping[str, Any], health: Mapping[str, Any], history: Mapping[str, Any]) -> str:
    config = status.get("config") or {}
    details = {key: value for key, value in health.items() if key != "ok" and value is not None}
    lines = [
        f"{status.get('name', '?')} ({status.get('role', '?')}) · version {status.get('version', '?')} · "
        f"up {_duration(status.get('uptime_s'))} · config generation {config.get('generation', '?')} {config.get('hash', '')}".rstrip(),
        f"readiness: {'ready' if health.get('ok') else 'NOT READY'}" + (f" ({_pairs(details)})" if details else ""),
    ]
    datapath = status.get("datapath")
    if isinstance(datapath, Mapping):
        lines.append(f"datapath: {'compiled' if datapath.get('compiled') else 'pure Python'} · "
                     f"TUN offloads {'on' if datapath.get('tun_offload') else 'off'} · "
                     f"workers {datapath.get('workers', '?')}")
    rates = recent_rates(history)
    total_rate = sum(rates.values())
    is_distributor = status.get("role") == "distributor"
    members = (status.get("tms") if is_distributor else status.get("peers")) or {}
    checks = (status.get("health") or {}).get("tms") or {}
    if members:
        rows, header = [], ["TM", "ADMIN", "HEALTH", "RTT", "PPS", "SHARE", "PACKETS"] if is_distributor else ["PEER", "PPS", "SHARE", "PACKETS"]
        for name, member in sorted(members.items()):
            traffic = [
                f"{rates[name]:.0f}" if name in rates else "-",
                f"{rates[name] / total_rate * 100:.1f}%" if name in rates and total_rate else "-",
                str(member.get("packets", "-")),
            ]
            if not is_distributor:  # a TM's peers are distributors: no admin state or health checks
                rows.append([name, *traffic])
                continue
            check = checks.get(name, {})
            up = member.get("up", check.get("up"))
            rtt = check.get("rtt_seconds")
            rtt_text = f"{rtt * 1000:.1f} ms" if isinstance(rtt, (int, float)) else "-"
            rows.append([name, str(member.get("admin", "-")), "-" if up is None else "up" if up else "DOWN", rtt_text, *traffic])
        lines += ["", *_table(header, rows)]
    all_down = (status.get("health") or {}).get("all_down")
    if all_down:
        policy = ((status.get("health") or {}).get("config") or {}).get("all_down", "?")
        lines.append(f"!! every TM is down (all-down policy: {policy})")
    lines += _fleet_lines(status.get("fleet"))
    drops = {reason: count for reason, count in (status.get("drops") or {}).items() if count}
    lines += ["", f"drops: {_pairs(drops) if drops else 'none'}"]
    if status.get("cells"):
        lines.append(f"decisions: {_pairs(status['cells'])}")
    if status.get("reasons"):
        lines.append(f"verdicts: {_pairs(status['reasons'])}")
    connections = status.get("connections")
    if isinstance(connections, Mapping):
        table = status.get("table") or {}
        figures = {"entries": connections.get("total", "?"), **(connections.get("by_state") or {})}
        if "limit" in table:
            figures["limit"] = table["limit"]
        lines.append(f"conntrack: {_pairs(figures)}")
        for service in status.get("services") or []:
            servers = {f"{server.get('address')}:{server.get('port')}": server.get("connections") for server in service.get("servers", [])}
            lines.append(f"service {service.get('name')}: connections {_pairs(servers)}")
    if config.get("last_reload_error"):
        lines.append(f"!! last reload refused, generation {config.get('generation', '?')} stays: {config['last_reload_error']}")
    return "\n".join(lines)


def _fleet_lines(fleet: Any) -> list[str]:
    """A distributor sharing its fleet through etcd: the store's state and the fleet of distributors."""
    if not isinstance(fleet, Mapping) or fleet.get("store") != "etcd":
        return []
    state = str(fleet.get("state", "?"))
    lines = ["", f"fleet store: etcd {fleet.get('prefix', '?')} · {state.upper() if state != 'ok' else state} · "
             f"revision {fleet.get('applied_revision', '?')} · rebuilds {fleet.get('rebuilds', '?')}"]
    if state != "ok":
        lines.append(f"!! fleet store unreachable for {_duration(fleet.get('unavailable_for_s'))}: forwarding on the "
                     f"last agreed view ({fleet.get('last_error') or 'no answer'})")
    votes = fleet.get("votes") or {}
    rows = []
    for name, registration in sorted((fleet.get("distributors") or {}).items()):
        down = (votes.get(name) or {}).get("down") or []
        rows.append([name, str((registration or {}).get("underlay", "-")), ", ".join(down) or "-"])
    if rows:
        lines += _table(["DISTRIBUTOR", "UNDERLAY", "SEES DOWN"], rows)
    if fleet.get("agreed_down"):
        lines.append(f"agreed down: {', '.join(fleet['agreed_down'])}")
    if fleet.get("document_error"):
        lines.append(f"!! fleet document refused, the running fleet stays: {fleet['document_error']}")
    return lines


# -- admin calls ------------------------------------------------------------------------------------------


def _admin_call(path: str, url: str, token: str | None, what: str) -> Reply | int:
    """POST an admin path; an int is the exit code of a failure already reported on stderr."""
    if token is None:
        try:
            token = load_admin_token(None)
        except AdminTokenError as error:
            print(f"overlay: {error}", file=sys.stderr)
            return 2
    if not token:
        print(f"overlay: {what}: no admin token (set ${TOKEN_ENV} or give the token file)", file=sys.stderr)
        return 2
    target = f"{base_url(url)}{path}"
    try:
        reply = request(target, method="POST", token=token)
    except StatusClientError as error:
        print(f"overlay: {what}: {error}", file=sys.stderr)
        return 1
    if reply.status == 401:
        print(f"overlay: {what}: refused, the admin token is missing or wrong for {base_url(url)}", file=sys.stderr)
        return 1
    if reply.status == 404 and reply.body is None:
        print(f"overlay: {what}: no admin API at {base_url(url)} (not a distributor, or no admin token configured there)", file=sys.stderr)
        return 1
    return reply


def tm_admin(action: str, name: str, url: str, token: str | None) -> int:
    """Drain, enable or disable TM `name` on the distributor at `url`; prints the result, 0 on success.

    `token` None reads $OVERLAY_ADMIN_TOKEN.
    """
    if action not in TM_ACTIONS:
        print(f"overlay: unknown action {action!r} (one of {', '.join(TM_ACTIONS)})", file=sys.stderr)
        return 2
    reply = _admin_call(f"/admin/tm/{quote(name, safe='')}/{action}", url, token, f"{action} {name}")
    if isinstance(reply, int):
        return reply
    body = reply.body or {}
    if reply.status != 200 or not body.get("ok"):
        print(f"overlay: {action} {name}: {body.get('error') or f'HTTP {reply.status}'}", file=sys.stderr)
        return 1
    previous = body.get("previous")
    change = f"{previous} -> {body.get('state')}" if previous else str(body.get("state"))
    print(f"{name}: {change}")
    return 0


def admin_reload(url: str, token: str | None) -> int:
    """Ask the distributor at `url` to reload its config; prints the new generation or the refusal."""
    reply = _admin_call("/admin/reload", url, token, "reload")
    if isinstance(reply, int):
        return reply
    body = reply.body or {}
    if reply.status == 200 and body.get("ok"):
        print(f"reloaded: config generation {body.get('generation')}")
        return 0
    print(f"overlay: reload refused, generation {body.get('generation', '?')} stays: {body.get('error') or f'HTTP {reply.status}'}", file=sys.stderr)
    return 1
