"""The ECMP lab: the reference lab with N identical distributors behind two routers that spread traffic over
them with Linux resilient nexthop groups (issue 11).

Distributors are stateless: the same config (same `[hash]` key and seed, same `[[tm]]`s) makes the same
decision on every one of them, so a connection may move between distributors — and its forward and
reverse packets may take different ones — without breaking. This lab is where that is proven with real
agents and real TCP (tests/status/test_lab_ecmp.py).

Layout (N = 2; every distributor host `distK` is laid out like the reference lab's `dist`)::

    client, remote ──(outside bridge)── router-out ══ resilient group ══ dist1 … distN
                                                                          │ underlay A bridge
                                                      router ─(underlay B bridge)─ tm1 tm2 tm3
    server1, server2, plain ──(inside bridge)── router-in ══ resilient group ══ dist1 … distN

Address plan. The reference lab's plan (docs/reference-lab.md, `overlay.lab.topology`) keeps its meaning;
what the distributor host owned there now belongs to the router on that side, and the distributors get
addresses of their own:

| where | prefix | who |
|---|---|---|
| outside (bridge) | 198.51.100.0/24, 2001:db8:1::/64 | router-out `.1`/`::1` (the reference lab's distributor address: the clients' gateway); client `.10`/`::10` + `.100–.199`/`::100–::1ff`; remote `.20`/`::20` |
| outside transit K (veth router-out ↔ distK) | 192.0.2.128/27 in /30s: 192.0.2.(128+4(K-1))/30; 2001:db8:f1:K::/64 | router-out `.+1`/`::1`, distK `.+2`/`::2` |
| inside transit K (veth router-in ↔ distK) | 192.0.2.160/27 in /30s: 192.0.2.(160+4(K-1))/30; 2001:db8:f2:K::/64 | router-in `.+1`/`::1`, distK `.+2`/`::2` |
| underlay A (bridge) | 192.0.2.0/26 | router `.1`; distK `192.0.2.(1+K)` (dist1 = 192.0.2.2, the reference distributor's) |
| underlay B (bridge) | 192.0.2.64/26 | router `.65`, tm1 `.71`, tm2 `.72`, tm3 `.73` (as in the reference lab) |
| inside (bridge) | 203.0.113.0/26, 2001:db8:2::/64 | router-in `.1`/`::1` (the servers' gateway); server1 `.10`/`::10`, server2 `.11`/`::11` (no pmtu router here), plain `.50`/`::50` |
| VIP, NAT-xlate, TM management | as the reference lab | routed by router-out (and router-in, but management) to the group |

Routers. router-out routes the inside prefix, the VIP, the xlate and the management prefixes to resilient
group 4 (IPv4: nexthops 40+K via distK's outside transit address) and 6 (IPv6: nexthops 60+K); router-in
routes the outside prefixes, the VIP and the xlate prefixes back to its own groups 4 and 6 over the
distributors' inside transit addresses. Both hash on L4 — the packet's addresses, protocol and ports
(`fib_multipath_hash_policy=3` with `fib_multipath_hash_fields=0x0037`; policy 1 would hash the sending
socket's random txhash across veths, see MULTIPATH_HASH) — with `buckets 128 idle_timer 0`: when a distributor is withdrawn only its buckets move, and when it is restored
buckets move back at once (idle_timer 0: every bucket counts as idle). `EcmpPlan.group_update` gives the
`ip nexthop` lines for any set of active distributors (a group cannot be empty: at 0 it is deleted, and
with it the routes through it).

Distributor hosts. The agent sets up its TUN and policy routing itself from its config's `[tun]`; the lab
gives each host its links, its main-table routes (outside prefixes via router-out, inside via router-in,
underlay B via the router) and two fail-closed measures (`fail_closed=True`, the default), so that a
crashed agent's host drops what it can no longer decide instead of routing it past the overlay:

- `blackhole` routes for the `[tun] capture` prefixes in the main table, with a metric no agent route has:
  while the agent runs its `dev TUN` routes win; once its TUN is gone, packets to the VIP are dropped
  silently (not answered with ICMP unreachable, which aborts a connecting client at once);
- a `blackhole` policy rule just after the agent's `from capture_from lookup TABLE` rule: when the TUN (and
  so TABLE's default route) is gone, the servers' packets are dropped, not routed un-NATed to the client,
  whose RST would then reset the server's end of a connection that another distributor still carries.

Configs: `distributor_config_text` / `tm_config_text` derive the N distributor configs and the TM configs
from the reference ones (config/): same everything, only `[node] name` and `[underlay] address` differ per
distributor, and every TM lists every distributor (`[[distributor]] name, underlay`). `write_configs` copies
the config directory and writes them into the copy. Plan and config text are built without I/O;
`EcmpLab` (a `Lab`, reusing its process table, probes and teardown) executes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from overlay.lab import netns, topology
from overlay.lab.lab import AGENT_READY_TIMEOUT, AgentConfigs, Lab, LabUnavailable, default_config_dir
from overlay.lab.topology import _BASE_SYSCTLS, _FORWARDING_SYSCTLS, NamespacePlan, Plan
from overlay.runtime.netsetup import FROM_RULE_PRIORITY

DEFAULT_PREFIX = "ove-"
DEFAULT_DISTRIBUTORS = 2
MAX_DISTRIBUTORS = 8  # the transit /27s hold eight /30s

# The distributor config's [tun] (config/distributor.toml): what the agent captures, hence what a host
# whose agent died must drop (fail closed). tests/lab/test_ecmp_plan.py checks they agree with the config.
INSIDE_V4 = "203.0.113.0/26"
INSIDE_V6 = "2001:db8:2::/64"
CAPTURE_V4: tuple[str, ...] = ("203.0.113.64/27", "203.0.113.96/27", "203.0.113.192/27")  # VIP, xlate, management
CAPTURE_V6: tuple[str, ...] = ("2001:db8:80::/64", "2001:db8:ee::/64")                  # VIP, xlate
VIP_PREFIX_V4, XLATE_PREFIX_V4, MANAGEMENT_PREFIX_V4 = CAPTURE_V4
VIP_PREFIX_V6, XLATE_PREFIX_V6 = CAPTURE_V6
UNDERLAY_B = "192.0.2.64/26"

# What each router sends to its group: router-out everything behind the distributors, router-in the
# outside network and the addresses only the overlay serves.
ROUTER_OUT_V4: tuple[str, ...] = (INSIDE_V4, VIP_PREFIX_V4, XLATE_PREFIX_V4, MANAGEMENT_PREFIX_V4)
ROUTER_OUT_V6: tuple[str, ...] = (INSIDE_V6, VIP_PREFIX_V6, XLATE_PREFIX_V6)
ROUTER_IN_V4: tuple[str, ...] = (topology.OUTSIDE_V4, VIP_PREFIX_V4, XLATE_PREFIX_V4)
ROUTER_IN_V6: tuple[str, ...] = (topology.OUTSIDE_V6, VIP_PREFIX_V6, XLATE_PREFIX_V6)

GROUP_V4, GROUP_V6 = 4, 6
BUCKETS = 128
FAIL_CLOSED_METRIC = 4_000_000_000      # above any metric the agents' routes get (IPv6 default: 1024)
FAIL_CLOSED_RULE_PRIORITY = FROM_RULE_PRIORITY + 1
ROUTERS: tuple[str, ...] = ("router-out", "router-in")
# How the routers hash a flow onto a group member. "5-tuple": policy 3 (custom fields) over source and
# destination address, protocol, source and destination port (0x0037; for IPv6 without the flow label):
# what a router hashing the packet computes. "skb": policy 1 (L4), which on a forwarded packet first takes
# the skb's L4 hash if it has one — across veths that is the *sending socket's* txhash, random per
# connection and drawn anew by TCP on every retransmission timeout, so a flow changes path when it
# retransmits (a lost SYN or a dead distributor is then escaped by chance, not by the withdrawal).
MULTIPATH_HASH: dict[str, tuple[str, ...]] = {
    "5-tuple": ("net.ipv4.fib_multipath_hash_policy=3", "net.ipv4.fib_multipath_hash_fields=0x0037",
                "net.ipv6.fib_multipath_hash_policy=3", "net.ipv6.fib_multipath_hash_fields=0x0037"),
    "skb": ("net.ipv4.fib_multipath_hash_policy=1", "net.ipv6.fib_multipath_hash_policy=1"),
}
SERVER_ROLES: tuple[str, ...] = ("server1", "server2", "plain", "remote")  # Lab.up starts these


@dataclass(frozen=True)
class DistributorHost:
    """Distributor number `index` (1-based): its name and addresses."""

    index: int

    @property
    def name(self) -> str:
        return f"dist{self.index}"

    @property
    def underlay(self) -> str:
        return f"192.0.2.{1 + self.index}"

    def _transit(self, base: int, v6_net: str, router_side: bool) -> tuple[str, str]:
        host = base + 4 * (self.index - 1) + (1 if router_side else 2)
        return f"192.0.2.{host}", f"2001:db8:{v6_net}:{self.index:x}::{1 if router_side else 2}"

    @property
    def outside(self) -> tuple[str, str]:
        """This host's end of its link to router-out (v4, v6)."""
        return self._transit(128, "f1", False)

    @property
    def router_out(self) -> tuple[str, str]:
        """router-out's end of that link: this host's route to the outside network."""
        return self._transit(128, "f1", True)

    @property
    def inside(self) -> tuple[str, str]:
        return self._transit(160, "f2", False)

    @property
    def router_in(self) -> tuple[str, str]:
        return self._transit(160, "f2", True)

    @property
    def nexthops(self) -> tuple[int, int]:
        """Its nexthop ids (v4, v6) in both routers."""
        return 40 + self.index, 60 + self.index


def distributor_hosts(count: int = DEFAULT_DISTRIBUTORS) -> tuple[DistributorHost, ...]:
    if not 1 <= count <= MAX_DISTRIBUTORS:
        raise ValueError(f"the ECMP lab has 1 to {MAX_DISTRIBUTORS} distributors, not {count}")
    return tuple(DistributorHost(index) for index in range(1, count + 1))


@dataclass
class EcmpPlan(Plan):
    hosts: tuple[DistributorHost, ...] = ()
    # `ip -6 -batch` lines per role (policy rules need the family: `ip -batch` lines cannot say `-6`).
    commands6: dict[str, list[str]] = field(default_factory=dict)
    # Per router, the `route add … nhid G` lines through its groups (re-added when a group comes back from 0).
    group_routes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def distributors(self) -> tuple[str, ...]:
        return tuple(host.name for host in self.hosts)

    def host(self, name: str) -> DistributorHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no distributor {name!r} in this lab ({', '.join(self.distributors)})")

    def group_update(self, active: Iterable[str], previous: Iterable[str]) -> dict[str, list[str]]:
        """Per router, the `ip -batch` lines that take its groups from the `previous` active distributors to
        `active`: `nexthop replace` with the remaining members; from none, the groups and their routes are
        added; to none, the groups are deleted (and their routes with them)."""
        active, previous = set(active), set(previous)
        for name in active | previous:
            self.host(name)  # KeyError for a name not in the lab
        now = [self.host(name) for name in self.distributors if name in active]
        before = [name for name in self.distributors if name in previous]
        lines: dict[str, list[str]] = {}
        for router in ROUTERS:
            if not now:
                lines[router] = [f"nexthop del id {GROUP_V4}", f"nexthop del id {GROUP_V6}"] if before else []
                continue
            verb = "replace" if before else "add"
            lines[router] = [_group_line(verb, GROUP_V4, [h.nexthops[0] for h in now]),
                             _group_line(verb, GROUP_V6, [h.nexthops[1] for h in now])]
            if not before:
                lines[router] += self.group_routes[router]
        return lines


def _group_line(verb: str, group: int, members: Sequence[int]) -> str:
    return f"nexthop {verb} id {group} group {'/'.join(map(str, members))} type resilient buckets {BUCKETS} idle_timer 0"


def roles(count: int = DEFAULT_DISTRIBUTORS) -> tuple[str, ...]:
    # Distributor hosts before the routers: their veth ends are up (carrier) when the routers add nexthops.
    return ("switch", "client", "remote", *(h.name for h in distributor_hosts(count)), "router-out", "router-in",
            "router", *topology.TMS, "server1", "server2", "plain")


def build_plan(prefix: str = DEFAULT_PREFIX, distributors: int = DEFAULT_DISTRIBUTORS, *,
               fail_closed: bool = True, multipath_hash: str = "5-tuple") -> EcmpPlan:
    """The whole ECMP lab for namespaces named `prefix + role`; `multipath_hash` one of MULTIPATH_HASH."""
    hosts = distributor_hosts(distributors)
    namespaces = {role: NamespacePlan(role, prefix + role, sysctls=list(_BASE_SYSCTLS))
                  for role in roles(distributors)}
    for role in (*ROUTERS, "router", *(h.name for h in hosts)):
        namespaces[role].sysctls.extend(_FORWARDING_SYSCTLS)
    for router in ROUTERS:
        namespaces[router].sysctls.extend(MULTIPATH_HASH[multipath_hash])
    namespaces["switch"].sysctls.extend(["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    links: list[str] = []
    plan = EcmpPlan(prefix, namespaces, links, hosts=hosts, commands6={}, group_routes={})
    # Three passes per namespace, so every address exists before a route or nexthop uses it.
    addresses: dict[str, list[str]] = {role: [] for role in namespaces}
    routing: dict[str, list[str]] = {role: [] for role in namespaces}

    switch = namespaces["switch"]
    bridges = {"outside": "o", "inside": "i", "underlay": "u", "underlay-a": "a"}  # bridge -> port name prefix
    for bridge in bridges:
        switch.setup.append(f"link add {bridge} type bridge stp_state 0 forward_delay 0 mcast_snooping 0")
        switch.setup.append(f"link set {bridge} up")

    def veth(role_a: str, if_a: str, role_b: str, if_b: str) -> None:
        links.append(f"link add {if_a} netns {namespaces[role_a].name} type veth"
                     f" peer name {if_b} netns {namespaces[role_b].name}")
        for role, ifname in ((role_a, if_a), (role_b, if_b)):
            namespaces[role].commands.append(f"link set {ifname} up")

    def switch_port(role: str, ifname: str, bridge: str) -> None:
        port = f"{bridges[bridge]}-{role}"
        veth(role, ifname, "switch", port)
        switch.commands.append(f"link set {port} master {bridge}")

    def address(role: str, ifname: str, *cidrs: str) -> None:
        addresses[role].extend(f"address add {c} dev {ifname}{' nodad' if ':' in c else ''}" for c in cidrs)

    def route(role: str, *lines: str) -> None:
        routing[role].extend(f"route add {line}" for line in lines)

    # Outside: the clients and the remote server, their gateway router-out.
    for role in ("client", "remote", "router-out"):
        switch_port(role, "outside", "outside")
    address("client", "outside", f"{topology.CLIENT_V4}/24", f"{topology.CLIENT_V6}/64")
    address("client", "outside", *(f"{a}/24" for a in topology.CLIENT_SOURCES_V4))
    address("client", "outside", *(f"{a}/64" for a in topology.CLIENT_SOURCES_V6))
    address("remote", "outside", f"{topology.REMOTE_V4}/24", f"{topology.REMOTE_V6}/64")
    address("router-out", "outside", f"{topology.DISTRIBUTOR_OUTSIDE_V4}/24", f"{topology.DISTRIBUTOR_OUTSIDE_V6}/64")
    for role in ("client", "remote"):
        route(role, f"default via {topology.DISTRIBUTOR_OUTSIDE_V4}", f"default via {topology.DISTRIBUTOR_OUTSIDE_V6}")

    # Inside: the servers and the plain host, their gateway router-in.
    for role in ("router-in", "server1", "server2", "plain"):
        switch_port(role, "inside", "inside")
    address("router-in", "inside", f"{topology.DISTRIBUTOR_INSIDE_V4}/26", f"{topology.DISTRIBUTOR_INSIDE_V6}/64")
    for role, v4, v6 in (
        *((s, topology.SERVERS_V4[s], topology.SERVERS_V6[s]) for s in ("server1", "server2")),
        ("plain", topology.PLAIN_V4, topology.PLAIN_V6),
    ):
        address(role, "inside", f"{v4}/26", f"{v6}/64")
        route(role, f"default via {topology.DISTRIBUTOR_INSIDE_V4}", f"default via {topology.DISTRIBUTOR_INSIDE_V6}")

    # Underlay A (the distributors and the router) and B (the router and the TMs), as bridges.
    switch_port("router", "ula", "underlay-a")
    address("router", "ula", f"{topology.ROUTER_UNDERLAY_A}/26")
    switch_port("router", "ulb", "underlay")
    address("router", "ulb", f"{topology.ROUTER_UNDERLAY_B}/26")
    for tm in topology.TMS:
        switch_port(tm, "underlay", "underlay")
        address(tm, "underlay", f"{topology.TM_UNDERLAY[tm]}/26")
        route(tm, f"default via {topology.ROUTER_UNDERLAY_B}")

    # The distributor hosts: underlay A, a link to each router, the routes between them.
    for host in hosts:
        name = host.name
        switch_port(name, "underlay", "underlay-a")
        address(name, "underlay", f"{host.underlay}/26")
        veth(name, "outside", "router-out", name)
        veth(name, "inside", "router-in", name)
        for role, ifname, (v4, v6) in ((name, "outside", host.outside), ("router-out", name, host.router_out),
                                       (name, "inside", host.inside), ("router-in", name, host.router_in)):
            address(role, ifname, f"{v4}/30", f"{v6}/64")
        route(name, f"{UNDERLAY_B} via {topology.ROUTER_UNDERLAY_A}",
              f"{topology.OUTSIDE_V4} via {host.router_out[0]}", f"{topology.OUTSIDE_V6} via {host.router_out[1]}",
              f"{INSIDE_V4} via {host.router_in[0]}", f"{INSIDE_V6} via {host.router_in[1]}")
        if fail_closed:
            route(name, *(f"blackhole {p} metric {FAIL_CLOSED_METRIC}" for p in (*CAPTURE_V4, *CAPTURE_V6)))
            routing[name].append(f"rule add priority {FAIL_CLOSED_RULE_PRIORITY} from {INSIDE_V4} blackhole")
            plan.commands6[name] = [f"rule add priority {FAIL_CLOSED_RULE_PRIORITY} from {INSIDE_V6} blackhole"]
        for router, (v4, v6) in (("router-out", host.outside), ("router-in", host.inside)):
            routing[router].append(f"nexthop add id {host.nexthops[0]} via {v4} dev {name}")
            routing[router].append(f"nexthop add id {host.nexthops[1]} via {v6} dev {name}")

    # The groups over every distributor, and what each router sends through them.
    plan.group_routes = {
        "router-out": [*(f"route add {p} nhid {GROUP_V4}" for p in ROUTER_OUT_V4),
                       *(f"route add {p} nhid {GROUP_V6}" for p in ROUTER_OUT_V6)],
        "router-in": [*(f"route add {p} nhid {GROUP_V4}" for p in ROUTER_IN_V4),
                      *(f"route add {p} nhid {GROUP_V6}" for p in ROUTER_IN_V6)],
    }
    for router, lines in plan.group_update(plan.distributors, ()).items():
        routing[router].extend(lines)

    for role, ns in namespaces.items():
        ns.commands.extend(addresses[role] + routing[role])
    return plan


# -- configs: the reference ones, per distributor ------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[", re.MULTILINE)


def _sections(text: str, header: str) -> list[tuple[int, int]]:
    """(start, end) of every section whose header line is exactly `header` (`[node]`, `[[distributor]]`)."""
    spans = []
    for match in re.finditer(rf"^{re.escape(header)}[ \t]*(#.*)?\n", text, re.MULTILINE):
        following = _HEADER.search(text, match.end())
        spans.append((match.start(), following.start() if following else len(text)))
    return spans


def _set_key(text: str, header: str, key: str, value: str) -> str:
    """`key = value` (value already TOML) in the one section `header`; the key must be there."""
    spans = _sections(text, header)
    if len(spans) != 1:
        raise ValueError(f"expected one {header} section, found {len(spans)}")
    start, end = spans[0]
    body, count = re.subn(rf"^{re.escape(key)}\s*=.*$", f"{key} = {value}", text[start:end], count=1, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{header} has no {key!r}")
    return text[:start] + body + text[end:]


def distributor_config_text(reference: str, host: DistributorHost) -> str:
    """The reference distributor config for `host`: its own node name and underlay address, all else shared
    (the hash key and seed, the TMs, `[tun]`: each host has its own namespace, so the TUN name repeats)."""
    text = _set_key(reference, "[node]", "name", f'"{host.name}"')
    return _set_key(text, "[underlay]", "address", f'"{host.underlay}"')


def tm_config_text(reference: str, hosts: Sequence[DistributorHost]) -> str:
    """A reference TM config whose `[[distributor]]` tables list every distributor of the lab (by name, at the
    reference one's port). Only plain tables (`underlay`, `name`) are rewritten: per-distributor keys would
    need per-distributor values."""
    spans = _sections(reference, "[[distributor]]")
    if not spans:
        raise ValueError("the TM config has no [[distributor]]")
    port = None
    for start, end in spans:
        keys = re.findall(r"^(\w+)\s*=", reference[start:end], re.MULTILINE)
        if not set(keys) <= {"underlay", "name"}:
            raise ValueError(f"[[distributor]] with keys {sorted(set(keys) - {'underlay', 'name'})}: not supported here")
        found = re.search(r'^underlay\s*=\s*"[^"]*:(\d+)"', reference[start:end], re.MULTILINE)
        port = port or (found.group(1) if found else None)
    blocks = "".join(f'[[distributor]]\nname = "{h.name}"\nunderlay = "{h.underlay}:{port or 4754}"\n' for h in hosts)
    text = reference[: spans[0][0]] + blocks + reference[spans[0][1]:]
    for start, end in reversed(spans[1:]):  # the reference's other tables, if any, are replaced too
        shift = len(blocks) - (spans[0][1] - spans[0][0])
        text = text[: start + shift] + text[end + shift:]
    return text


@dataclass
class EcmpConfigs:
    directory: Path
    distributors: dict[str, Path]
    tms: dict[str, Path]


def write_configs(source: Path, target: Path, hosts: Sequence[DistributorHost]) -> EcmpConfigs:
    """Copy `source` (a config directory like config/) to `target` and write `distK.toml` and the TM configs
    into the copy: paths relative to a config keep their meaning."""
    reference = source / "distributor.toml"
    missing = [p for p in (reference, *(source / f"{tm}.toml" for tm in topology.TMS)) if not p.exists()]
    if missing:
        raise LabUnavailable("agent configs missing: " + ", ".join(map(str, missing)))
    if target.resolve() != source.resolve():
        shutil.copytree(source, target, dirs_exist_ok=True)
    distributors = {}
    for host in hosts:
        path = target / f"{host.name}.toml"
        path.write_text(distributor_config_text(reference.read_text(), host))
        distributors[host.name] = path
    tms = {}
    for tm in topology.TMS:
        path = target / f"{tm}.toml"
        path.write_text(tm_config_text((source / f"{tm}.toml").read_text(), hosts))
        tms[tm] = path
    return EcmpConfigs(target, distributors, tms)


# -- the lab ---------------------------------------------------------------------------------------------------

class EcmpLab(Lab):
    """The ECMP lab with real agents. `with EcmpLab(...) as lab:` is `up()`, then `down()` and a check that
    nothing is left (no namespace with the prefix, no process it started)."""

    def __init__(self, prefix: str | None = None, *, distributors: int = DEFAULT_DISTRIBUTORS,
                 config_dir: Path | None = None, state_dir: Path | None = None, fail_closed: bool = True,
                 multipath_hash: str = "5-tuple"):
        super().__init__(prefix or DEFAULT_PREFIX, config_dir=config_dir or default_config_dir(), state_dir=state_dir)
        self.source_config_dir = self.config_dir
        self.plan: EcmpPlan = build_plan(self.prefix, distributors, fail_closed=fail_closed,
                                             multipath_hash=multipath_hash)
        self.distributors = self.plan.distributors
        # The agents run from a copy, written by up(): config_dir is the copy (Lab runs agents from its parent).
        self.config_dir = self.state_dir / "config"
        self.distributor_configs = {name: self.config_dir / f"{name}.toml" for name in self.distributors}
        self.configs = AgentConfigs(self.distributor_configs[self.distributors[0]],
                                    {tm: self.config_dir / f"{tm}.toml" for tm in topology.TMS})
        self.active: list[str] = list(self.distributors)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def up(self, *, agents: bool = True, timeout: float = AGENT_READY_TIMEOUT,
           before_agents: Callable[[Lab], None] | None = None) -> None:
        """Build the lab, start the servers and (unless `agents=False`) every TM and distributor; wait until
        every distributor sees every TM up. `before_agents(lab)` as `Lab.up`."""
        write_configs(self.source_config_dir, self.config_dir, self.plan.hosts)
        self.active = list(self.distributors)

        def network(lab: Lab) -> None:
            for role, lines in self.plan.commands6.items():
                netns.run(["ip", "-6", "-n", self.ns(role), "-batch", "-"], stdin="\n".join(lines) + "\n")
            if before_agents is not None:
                before_agents(lab)

        super().up(agents=False, timeout=timeout, before_agents=network)
        if not agents:
            return
        for tm in topology.TMS:
            self._start_agent(tm, "tm", self.configs.tms[tm])
        for name in self.distributors:
            self._start_agent(name, "distributor", self.distributor_configs[name])
        for role in (*topology.TMS, *self.distributors):
            self.wait_ready(role, timeout)

    def __enter__(self) -> EcmpLab:
        try:
            self.up()
        except BaseException:
            print(self.agent_logs())
            self.down()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            print(self.agent_logs())
        self.down()
        leftover = netns.list_namespaces(self.prefix)
        alive = [p for p in self.processes.started if _alive(p.pid)]
        if leftover or alive:
            raise netns.LabError(f"left behind: namespaces {leftover}, processes {alive}")

    # -- agents ------------------------------------------------------------------------------------------

    def wait_ready(self, role: str, timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Until the agent answers /healthz; a distributor also until its health checks see every TM up."""
        url = f"http://127.0.0.1:{topology.STATUS_PORT}/healthz"
        self._wait_ready(role, url, timeout)
        if role in self.distributors:
            self._wait_ready(role, url, timeout,
                             accept=lambda body: set(json.loads(body).get("up", ())) >= set(topology.TMS))

    def pid(self, role: str) -> int:
        """The PID of a running lab process (from the process table's records)."""
        return self.processes.recorded()[role]

    def kill(self, role: str, timeout: float = 5.0) -> int:
        """SIGKILL the agent by its recorded PID (a crash: no clean-up of its own) and reap it; returns the PID."""
        pid = self.pid(role)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.processes.exited(role) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.processes.exited(role) is None:
            raise netns.LabError(f"{role} (PID {pid}) still running {timeout}s after SIGKILL")
        return pid

    def start(self, role: str, timeout: float = AGENT_READY_TIMEOUT) -> int:
        """(Re)start a TM or distributor agent from its config and wait until it is ready; returns its PID."""
        if role in self.processes.recorded():
            raise netns.LabError(f"{role} is running (PID {self.pid(role)})")
        if role in self.distributors:
            self._start_agent(role, "distributor", self.distributor_configs[role])
        elif role in topology.TMS:
            self._start_agent(role, "tm", self.configs.tms[role])
        else:
            raise KeyError(f"{role} is not an agent of this lab")
        self.wait_ready(role, timeout)
        return self.pid(role)

    # -- the routers' groups -----------------------------------------------------------------------------

    def withdraw(self, distributor: str) -> None:
        """Take `distributor` out of both routers' groups (what a BGP withdrawal or an expired lease does)."""
        self.plan.host(distributor)
        self._set_active([name for name in self.active if name != distributor])

    def restore(self, distributor: str) -> None:
        """Put `distributor` back into both routers' groups."""
        self.plan.host(distributor)
        self._set_active([*self.active, distributor])

    def _set_active(self, active: list[str]) -> None:
        for router, lines in self.plan.group_update(active, self.active).items():
            netns.ip_batch(lines, self.ns(router))
        self.active = [name for name in self.distributors if name in active]

    def buckets(self, router: str = "router-out", group: int = GROUP_V4) -> dict[str, int]:
        """How many of a group's buckets each distributor holds now (from `ip nexthop bucket`)."""
        by_id = {host.nexthops[0 if group == GROUP_V4 else 1]: host.name for host in self.plan.hosts}
        result = netns.run(["ip", "-n", self.ns(router), "nexthop", "bucket", "show", "id", str(group)])
        counts: dict[str, int] = {}
        for nhid in re.findall(r"nhid (\d+)", result.stdout):
            name = by_id.get(int(nhid), nhid)
            counts[name] = counts.get(name, 0) + 1
        return counts

    # -- probes ------------------------------------------------------------------------------------------

    def agent_logs(self) -> str:
        sections = []
        for role in (*topology.TMS, *self.distributors, *SERVER_ROLES):
            tail = self.processes.log_tail(role)
            if tail:
                sections.append(f"--- {role} ({self.processes.log_dir / (role + '.log')}) ---\n{tail}")
        return "\n".join(sections)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main() -> int:  # pragma: no cover - a manual check: `sudo python -m overlay.lab.ecmp`
    """Bring the lab up, run a little traffic, print each distributor's share, take it down."""
    with EcmpLab(os.environ.get("OVERLAY_LAB_PREFIX", DEFAULT_PREFIX)) as lab:
        report = lab.traffic(count=400, duration=20)
        print(report.summary())
        for name in lab.distributors:
            print(name, lab.status(name)["counters"].get("tun_rx_packets"))
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
