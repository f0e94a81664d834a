"""`overlay distributor`, `overlay tm` and `overlay edge`: run an agent, or (`overlay tm
drain|enable|disable NAME`) ask a distributor's admin API to change a TM's state."""

from __future__ import annotations

import argparse
import asyncio
import sys

DEFAULT_ADMIN_URL = "http://127.0.0.1:8080"


def register(subparsers: argparse._SubParsersAction) -> None:
    distributor = subparsers.add_parser("distributor", help="run a distributor agent")
    _agent_arguments(distributor, required=True)
    distributor.set_defaults(func=run_distributor)

    tm = subparsers.add_parser(
        "tm",
        help="run a TM agent (--config), or drain/enable/disable a TM on a distributor",
        description="Run a TM agent with --config FILE, or change a TM's admin state on a distributor.",
    )
    _agent_arguments(tm, required=False)
    tm.set_defaults(func=run_tm)
    actions = tm.add_subparsers(dest="tm_action", metavar="ACTION")
    for action, text in (
        ("drain", "keep the TM's established connections, give it no new ones"),
        ("enable", "put the TM back into service"),
        ("disable", "take the TM out of the table now"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("name", help="the TM's name in the distributor config")
        parser.add_argument("--url", default=DEFAULT_ADMIN_URL, help=f"distributor status URL ({DEFAULT_ADMIN_URL})")
        parser.add_argument(
            "--token-file", default=None, help="file holding the admin token (default: $OVERLAY_ADMIN_TOKEN)"
        )
        parser.set_defaults(func=run_tm_admin)


    edge = subparsers.add_parser("edge", help="run an edge agent: this host joins the overlay (docs/clouds.md)")
    _agent_arguments(edge, required=True)
    edge.set_defaults(func=run_edge)


def _agent_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--config", required=required, metavar="FILE", help="the node's config file")
    parser.add_argument(
        "--log-format", choices=("console", "json"), default=None, help="override the config's [log] format"
    )


def run_distributor(args: argparse.Namespace) -> int:
    from overlay.runtime.distributor_agent import DistributorAgent

    return _run(args, "distributor", DistributorAgent)


def run_tm(args: argparse.Namespace) -> int:
    if not args.config:
        print("overlay tm: give --config FILE to run a TM agent, or an ACTION (drain|enable|disable)", file=sys.stderr)
        return 2
    from overlay.runtime.tm_agent import TMAgent

    return _run(args, "tm", TMAgent)


def run_edge(args: argparse.Namespace) -> int:
    from overlay.runtime.edge_agent import EdgeAgent

    return _run(args, "edge", EdgeAgent)


def run_tm_admin(args: argparse.Namespace) -> int:
    from overlay.status.admin import AdminTokenError, load_admin_token
    from overlay.status.cli import tm_admin

    try:
        token = load_admin_token(args.token_file)
    except AdminTokenError as error:
        print(f"overlay tm {args.tm_action}: {error}", file=sys.stderr)
        return 2
    return tm_admin(args.tm_action, args.name, args.url, token)


def _run(args: argparse.Namespace, role: str, agent_class: type) -> int:
    import uvloop

    from overlay.config import load_node_config
    from overlay.configlib import ConfigError
    from overlay.runtime.agent import run_agent
    from overlay.runtime.logging import configure_logging

    try:
        config = load_node_config(args.config)
    except ConfigError as error:
        print(f"overlay {role}: {error}", file=sys.stderr)
        return 2
    if config.role != role:
        print(f"overlay {role}: {config.source} is a {config.role} config (node.role)", file=sys.stderr)
        return 2
    configure_logging(args.log_format or config.log.format, config.log.level)
    agent = agent_class(config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_agent(agent))
