"""Host network setup around the agent's TUN: addresses, routes, policy rules, rp_filter — and their removal.

Two steps, so the interesting part is testable without root:

- `distributor_plan(config)` / `tm_plan(config)` turn a node config into a `NetPlan`: plain data saying
  which addresses, routes and rules the node needs.
- `NetSetup(plan)` applies a plan over netlink (pyroute2, no shelling out to ip(8)), remembers exactly what
  it added and removes exactly that on `undo()`. `clean_stale()` first removes what a crashed earlier run
  with the same TUN name and table left behind (the TUN itself dies with its process; policy rules do not).

Distributor: the `tun.capture` prefixes are routed into the TUN in the main table; traffic *from* the
`tun.capture_from` prefixes is sent into the TUN by `from PREFIX lookup TABLE` with `default dev TUN` in
TABLE. What the distributor writes back into the TUN arrives with iif TUN and, by a rule of higher
priority, is routed by the main table — so its own output never loops back into the TUN, whatever source
address it carries.

Fail closed: each of those routes has a `blackhole` twin of a worse metric (`FAIL_CLOSED_METRIC`). While
the TUN lives, its route wins; when the agent dies without undoing its setup (SIGKILL), the TUN and its
routes go, the rules and blackholes stay, and the host drops what it would otherwise have forwarded itself
— clients' packets to the virtual addresses, and the servers' replies *without their NAT undone*, which
reach the clients as strays and get the servers' side of live connections reset (found in the ECMP lab:
half the streams another distributor carried broke). A clean exit removes the blackholes with the rest;
the next start's `clean_stale` removes a crashed run's.

TM: the management addresses live on the TUN, and `from MGMT lookup TABLE` sends what the TM host's own
stack answers from them (its status service) back into the TUN, hence into the overlay, whatever route the
host would otherwise take to the client.

Edge: the same for the prefixes it serves (`edge_plan`).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

DEFAULT_TABLE = 4754
# Rules sit well above `main` (32766). Packets arriving from the TUN are routed by `main`; if `main` has no
# route for one, the lookup would fall through to the `from` rules and back into the TUN, so an
# `unreachable` rule for iif TUN sits between them: no route means an ICMP error, never a loop.
IIF_RULE_PRIORITY = 4754
IIF_UNREACHABLE_PRIORITY = 4755
FROM_RULE_PRIORITY = 4756
MAIN_TABLE = 254
FR_ACT_TO_TBL = 1
FR_ACT_UNREACHABLE = 7
RTN_BLACKHOLE = 6
FAIL_CLOSED_METRIC = 4754   # worse than any route of ours (0 for IPv4, 1024 for IPv6 by default)
ADDR_GEN_MODE_NONE = 1  # IN6_ADDR_GEN_MODE_NONE

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Route:
    """`dst dev TUN table TABLE`, or with `blackhole`: `blackhole dst table TABLE metric FAIL_CLOSED_METRIC`."""

    dst: IPNetwork
    table: int
    blackhole: bool = False


@dataclass(frozen=True)
class Rule:
    """`priority P [from SRC] [iif IIF] lookup TABLE` (or `unreachable`, table 0) for one address family."""

    priority: int
    table: int
    version: int
    src: IPNetwork | None = None
    iif: str | None = None
    unreachable: bool = False


@dataclass(frozen=True)
class NetPlan:
    tun: str
    mtu: int
    table: int
    addresses: tuple[IPInterface, ...] = ()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()
    # The distributor receives packets from TMs with client sources on the TUN: strict rp_filter drops them.
    loose_rp_filter: bool = True
    # IP versions this host must forward (what the distributor writes into the TUN is routed onwards).
    forwarding: tuple[int, ...] = ()


def _default_route(version: int, table: int) -> Route:
    return Route(ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0"), table)


def distributor_plan(tun: Any, *, table: int = DEFAULT_TABLE) -> NetPlan:
    """The plan for a distributor from its `[tun]` section (`name`, `mtu`, `capture`, `capture_from`)."""
    routes = [Route(prefix, MAIN_TABLE) for prefix in tun.capture]
    routes += [Route(prefix, MAIN_TABLE, blackhole=True) for prefix in tun.capture]
    rules: list[Rule] = []
    versions = sorted({prefix.version for prefix in tun.capture_from})
    for version in versions:
        routes.append(_default_route(version, table))
        routes.append(Route(_default_route(version, table).dst, table, blackhole=True))
        rules.append(Rule(IIF_RULE_PRIORITY, MAIN_TABLE, version, iif=tun.name))
        rules.append(Rule(IIF_UNREACHABLE_PRIORITY, 0, version, iif=tun.name, unreachable=True))
    for prefix in tun.capture_from:
        rules.append(Rule(FROM_RULE_PRIORITY, table, prefix.version, src=prefix))
    return NetPlan(
        tun=tun.name,
        mtu=tun.mtu,
        table=table,
        routes=tuple(routes),
        rules=tuple(rules),
        forwarding=tuple(sorted({prefix.version for prefix in (*tun.capture, *tun.capture_from)} or {4})),
    )


def tm_plan(tun: Any, management: list[Any], *, table: int = DEFAULT_TABLE) -> NetPlan:
    """The plan for a TM host: management addresses on the TUN, their replies policy-routed into it."""
    addresses = tuple(ipaddress.ip_interface(address) for address in management)
    versions = sorted({address.version for address in addresses})
    routes = tuple(_default_route(version, table) for version in versions) + tuple(
        Route(prefix, MAIN_TABLE) for prefix in tun.capture
    )
    rules = tuple(Rule(FROM_RULE_PRIORITY, table, address.version, src=address.network) for address in addresses)
    return NetPlan(tun=tun.name, mtu=tun.mtu, table=table, addresses=addresses, routes=routes, rules=rules)


def edge_plan(tun: Any, prefixes: list[Any], *, table: int = DEFAULT_TABLE) -> NetPlan:
    """The plan for an edge host: its host prefixes (/32, /128) on the TUN, so local servers bind to them;
    what is sent from any served prefix policy-routed into the TUN (into the overlay), whatever route the
    host would otherwise take; `tun.capture` destinations routed into the TUN. A served prefix wider than
    one host is a site behind the edge: the host forwards for it."""
    addresses = tuple(
        ipaddress.ip_interface(prefix.network_address) for prefix in prefixes if prefix.num_addresses == 1
    )
    versions = sorted({prefix.version for prefix in prefixes})
    routes = tuple(_default_route(version, table) for version in versions) + tuple(
        Route(prefix, MAIN_TABLE) for prefix in tun.capture
    )
    rules = tuple(Rule(FROM_RULE_PRIORITY, table, prefix.version, src=prefix) for prefix in prefixes)
    forwarding = tuple(sorted({prefix.version for prefix in prefixes if prefix.num_addresses > 1}))
    return NetPlan(tun=tun.name, mtu=tun.mtu, table=table, addresses=addresses, routes=routes, rules=rules,
                   forwarding=forwarding)


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _rule_args(rule: Rule) -> dict[str, Any]:
    args: dict[str, Any] = {"family": _family(rule.version), "priority": rule.priority}
    if rule.unreachable:
        args["action"] = FR_ACT_UNREACHABLE
    else:
        args["table"] = rule.table
    if rule.src is not None:
        args["src"] = str(rule.src.network_address)
        args["src_len"] = rule.src.prefixlen
    if rule.iif is not None:
        args["iifname"] = rule.iif
    return args


def _route_args(route: Route, index: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": _family(route.dst.version),
        "dst": str(route.dst.network_address),
        "dst_len": route.dst.prefixlen,
        "table": route.table,
    }
    if route.blackhole:
        args.update(type=RTN_BLACKHOLE, priority=FAIL_CLOSED_METRIC)
    else:
        args["oif"] = index
    return args


@dataclass
class NetSetup:
    """Applies one `NetPlan` and undoes exactly what it applied. Not thread-safe; one per agent."""

    plan: NetPlan
    sysctl_root: Path = Path("/proc/sys")
    warnings: list[str] = field(default_factory=list)
    _rules: list[dict[str, Any]] = field(default_factory=list)
    _routes: list[dict[str, Any]] = field(default_factory=list)
    _sysctls: list[tuple[Path, str]] = field(default_factory=list)

    def clean_stale(self) -> int:
        """Remove rules a previous run with this TUN name and table left behind; returns how many."""
        return _outside_event_loop(self._clean_stale)

    def apply(self) -> None:
        """Bring the TUN up with its MTU and add the plan; on failure undo what was added and re-raise."""
        _outside_event_loop(self._apply)

    def undo(self) -> None:
        """Remove what `apply` added, newest first; missing items (already gone) are fine."""
        _outside_event_loop(self._undo)

    def _clean_stale(self) -> int:
        removed = 0
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for rule in ipr.get_rules(family=family):
                    priority = rule.get_attr("FRA_PRIORITY")
                    table = rule.get_attr("FRA_TABLE") or rule.get("table")
                    ifname = rule.get_attr("FRA_IIFNAME")
                    ours = (priority == FROM_RULE_PRIORITY and table == self.plan.table) or (
                        priority in (IIF_RULE_PRIORITY, IIF_UNREACHABLE_PRIORITY) and ifname == self.plan.tun
                    )
                    if ours:
                        ipr.rule("del", **_stale_rule_args(rule, family))
                        removed += 1
                for route in ipr.get_routes(family=family, table=self.plan.table):
                    if route.get_attr("RTA_TABLE") == self.plan.table:
                        ipr.route("del", **_stale_route_args(route, family))
                        removed += 1
                # A crashed run's fail-closed blackholes in main, for the prefixes this plan captures.
                captured = {(route.dst.network_address.packed, route.dst.prefixlen) for route in self.plan.routes
                            if route.blackhole and route.table == MAIN_TABLE}
                for route in ipr.get_routes(family=family, table=MAIN_TABLE):
                    dst = route.get_attr("RTA_DST")
                    if (route["type"] == RTN_BLACKHOLE and route.get_attr("RTA_PRIORITY") == FAIL_CLOSED_METRIC
                            and dst is not None
                            and (ipaddress.ip_address(dst).packed, route["dst_len"]) in captured):
                        ipr.route("del", **_stale_route_args(route, family), priority=FAIL_CLOSED_METRIC)
                        removed += 1
        return removed

    def _apply(self) -> None:
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self.plan.tun)
                if not found:
                    raise RuntimeError(f"TUN {self.plan.tun!r} does not exist; open it before applying the plan")
                index = found[0]
                self._no_link_local(ipr, index)
                ipr.link("set", index=index, mtu=self.plan.mtu, state="up")
                for interface in self.plan.addresses:
                    # nodad: a management address must be usable at once, not after IPv6 DAD (~1 s).
                    flags = {"flags": 0x02} if interface.version == 6 else {}
                    ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.max_prefixlen, **flags)
                for route in self.plan.routes:
                    args = _route_args(route, index)
                    ipr.route("add", **args)
                    self._routes.append(args)
                for rule in self.plan.rules:
                    args = _rule_args(rule)
                    ipr.rule("add", **args)
                    self._rules.append(args)
            self._set_sysctls()
        except BaseException:
            self._undo()
            raise

    def _no_link_local(self, ipr: Any, index: int) -> None:
        """No IPv6 link-local address on the TUN (addrgenmode none), set before it comes up.

        A point-to-point TUN needs none (no neighbour discovery), and without one the kernel sends no
        router solicitations or MLD reports into the TUN — packets the core would otherwise have to decide
        and count. IPv6 routes through the TUN work without it.
        """
        spec = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE]]}]]}
        try:
            ipr.link("set", index=index, IFLA_AF_SPEC=spec)
        except NetlinkError as error:
            # IPv6 disabled on this host: nothing to suppress, and IPv6 routes would fail anyway.
            self.warnings.append(f"cannot set addrgenmode none on {self.plan.tun}: {error}")

    def _set_sysctls(self) -> None:
        ipv4 = self.sysctl_root / "net/ipv4"
        if self.plan.loose_rp_filter:
            # The effective rp_filter is max(conf/all, conf/DEV): 0 only helps when `all` is 0, else use loose.
            current_all = _read(ipv4 / "conf/all/rp_filter")
            wanted = "0" if current_all in ("0", None) else "2"
            self._write(ipv4 / f"conf/{self.plan.tun}/rp_filter", wanted)
        paths = {4: ipv4 / "ip_forward", 6: self.sysctl_root / "net/ipv6/conf/all/forwarding"}
        for version in self.plan.forwarding:
            path = paths[version]
            if _read(path) == "0":
                self.warnings.append(
                    f"{path} is 0: this host will not forward what the distributor writes into the TUN; "
                    f"set it to 1 (sysctl -w, or compose `sysctls:`)"
                )

    def _write(self, path: Path, value: str) -> None:
        previous = _read(path)
        if previous == value:
            return
        try:
            path.write_text(value)
        except OSError as error:
            self.warnings.append(
                f"cannot set {path} to {value} ({error.strerror}): /proc/sys is read-only here; "
                f"set it from outside (compose `sysctls:`, or sysctl in the host namespace)"
            )
            return
        if previous is not None:
            self._sysctls.append((path, previous))

    def _undo(self) -> None:
        with IPRoute() as ipr:
            while self._rules:
                args = self._rules.pop()
                try:
                    ipr.rule("del", **args)
                except NetlinkError:
                    pass  # ENOENT: someone removed it already; the goal (not there) holds
            while self._routes:
                args = self._routes.pop()
                try:
                    ipr.route("del", **args)
                except NetlinkError:
                    pass  # the TUN closed first and took its routes with it
        self._restore_sysctls()

    def _restore_sysctls(self) -> None:
        while self._sysctls:
            path, previous = self._sysctls.pop()
            try:
                path.write_text(previous)
            except OSError:
                pass  # the TUN is gone and its conf/ directory with it


def _outside_event_loop(function: Callable[[], T]) -> T:
    """Run `function` in a short-lived thread of its own.

    pyroute2's synchronous IPRoute drives an asyncio loop of its own underneath; called from inside the
    agent's running (uvloop) loop it fails ("event loop is already running"). A fresh thread has no loop,
    and shares the process's (the calling thread's) network namespace. Setup and teardown are rare, so
    blocking the agent's loop for the few milliseconds this takes is fine.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(function())
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=run, name="netsetup")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stale_rule_args(rule: Any, family: int) -> dict[str, Any]:
    args: dict[str, Any] = {"family": family, "priority": rule.get_attr("FRA_PRIORITY"), "action": rule["action"]}
    table = rule.get_attr("FRA_TABLE") or rule.get("table")
    if table:
        args["table"] = table
    if rule.get_attr("FRA_SRC"):
        args["src"] = rule.get_attr("FRA_SRC")
        args["src_len"] = rule["src_len"]
    if rule.get_attr("FRA_IIFNAME"):
        args["iifname"] = rule.get_attr("FRA_IIFNAME")
    return args


def _stale_route_args(route: Any, family: int) -> dict[str, Any]:
    # proto/scope/type must match what the kernel holds, or the delete finds nothing (ESRCH).
    args: dict[str, Any] = {
        "family": family,
        "table": route.get_attr("RTA_TABLE"),
        "dst_len": route["dst_len"],
        "proto": route["proto"],
        "scope": route["scope"],
        "type": route["type"],
    }
    if route.get_attr("RTA_DST"):
        args["dst"] = route.get_attr("RTA_DST")
    if route.get_attr("RTA_OIF"):
        args["oif"] = route.get_attr("RTA_OIF")
    return args
