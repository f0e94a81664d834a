"""`overlay lab up|run|down|status` and `overlay demo`.

The demo is the README's main job: bring the namespace lab up, run a few seconds of real HTTP traffic
from many client addresses to the virtual address (IPv4 and IPv6), print each TM's share and the failed
connections, and tear everything down — in a `finally`, with SIGTERM turned into the same path as Ctrl-C,
and with Ctrl-C ignored while the teardown runs so a second one cannot leave the host half-cleaned.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from overlay.lab import netns, nsnet, report
from overlay.lab.lab import Lab, LabUnavailable, default_prefix, unavailable_reason
from overlay.lab.topology import STATUS_PORT, TMS


def register(subparsers: argparse._SubParsersAction) -> None:
    lab = subparsers.add_parser("lab", help="the reference lab in network namespaces (needs root)")
    lab.add_argument("--prefix", default=None, help="namespace name prefix (default $OVERLAY_LAB_PREFIX or ovl-)")
    lab.add_argument("--config-dir", type=Path, default=None, help="node configs (default ./config)")
    actions = lab.add_subparsers(dest="lab_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="build the lab and start servers and agents")
    up.add_argument("--no-agents", action="store_true", help="topology and servers only (kernel routing)")
    up.add_argument("--distributor-config", type=Path, default=None, help="another distributor config")
    up.set_defaults(func=_guarded(_up))
    run = actions.add_parser("run", help="run traffic through a lab that is up and print the result")
    _traffic_arguments(run)
    run.set_defaults(func=_guarded(_run))
    down = actions.add_parser("down", help="stop every lab process and remove its namespaces")
    down.set_defaults(func=_guarded(_down))
    status = actions.add_parser("status", help="namespaces and processes of the lab")
    status.set_defaults(func=_status)

    demo = subparsers.add_parser("demo", help="lab up, real traffic, per-TM share, lab down (needs root)")
    demo.add_argument("--prefix", default=None, help="namespace name prefix (default $OVERLAY_LAB_PREFIX or ovl-)")
    demo.add_argument("--config-dir", type=Path, default=None, help="node configs (default ./config)")
    _traffic_arguments(demo)
    demo.set_defaults(func=_guarded(_demo))


def _traffic_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=4000, help="requests at most (default 4000)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds at most (default 15)")
    parser.add_argument("--v4", type=int, default=100, help="IPv4 client addresses (default 100, max 100)")
    parser.add_argument("--v6", type=int, default=100, help="IPv6 client addresses (default 100, max 256)")
    parser.add_argument("--concurrency", type=int, default=32)


def _lab(args: argparse.Namespace, distributor_config: Path | None = None) -> Lab:
    return Lab(args.prefix or default_prefix(), config_dir=args.config_dir, distributor_config=distributor_config)


def _guarded(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Refuse early, with the reason, where the lab cannot run; turn lab errors into exit code 1."""

    def guarded(args: argparse.Namespace) -> int:
        reason = unavailable_reason()
        if reason:
            print(f"overlay: cannot run the lab: {reason}", file=sys.stderr)
            return 2
        try:
            return action(args)
        except (LabUnavailable, netns.LabError) as error:
            print(f"overlay: {error}", file=sys.stderr)
            return 1

    return guarded


def _up(args: argparse.Namespace) -> int:
    lab = _lab(args, args.distributor_config)
    try:
        lab.up(agents=not args.no_agents)
    except BaseException:
        print(f"the lab did not come up; logs of every process: {lab.processes.log_dir}", file=sys.stderr)
        lab.down()
        raise
    print(f"lab {lab.prefix} up: {', '.join(sorted(lab.plan.namespaces[r].name for r in lab.plan.namespaces))}")
    print(f"logs in {lab.processes.log_dir}; `overlay lab down` tears the lab down")
    return 0


def _run(args: argparse.Namespace) -> int:
    lab = _lab(args)
    return report.run_and_print(lab, count=args.count, duration=args.duration, v4=args.v4, v6=args.v6,
                                concurrency=args.concurrency)


def _down(args: argparse.Namespace) -> int:
    removed = _lab(args).down()
    print(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    names = netns.list_namespaces(lab.prefix)
    print(f"namespaces ({len(names)}): {', '.join(names) or '-'}")
    for name, pid in lab.processes.recorded().items():
        print(f"  {name}: pid {pid}{_health(lab, name) if name in AGENT_ROLES else ''}")
    return 0 if names else 3


def _health(lab: Lab, role: str) -> str:
    try:
        status, body = nsnet.http_request(lab.ns(role), f"http://127.0.0.1:{STATUS_PORT}/healthz", timeout=1.0)
    except OSError as error:
        return f", /healthz: {error}"
    return f", /healthz: HTTP {status} {body.decode(errors='replace').strip()}"


AGENT_ROLES = frozenset({"dist", *TMS})


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    lab = _lab(args)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        print(f"building the lab: {len(lab.plan.namespaces)} namespaces {lab.prefix}*, 4 HTTP servers, 3 TM agents, 1 distributor ...")
        lab.up()
        return report.run_and_print(lab, count=args.count, duration=args.duration, v4=args.v4, v6=args.v6,
                                    concurrency=args.concurrency)
    except KeyboardInterrupt:
        print("interrupted; tearing the lab down", file=sys.stderr)
        return 130
    except (LabUnavailable, netns.LabError):
        print(f"logs of every process: {lab.processes.log_dir}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            removed = lab.down()
            print(f"lab down: removed {len(removed)} namespaces")
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
