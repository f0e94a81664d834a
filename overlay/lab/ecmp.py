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
group 40 (IPv4: nexthops 40+K via distK's outside transit address) and 60 (IPv6: nexthops 60+K); router-in
routes the outside prefixes, the VIP and the xlate prefixes back to its own groups 40 and 60 over the
distributors' inside transit addresses. The ids follow `overlay ecmp`'s scheme (member `index` of group
`id` is nexthop `id + 1 + index`), so the controller can take the groups over (`fleet_store=True`). Both hash on L4 — the packet's addresses, protocol and ports
(`fib_multipath_hash_policy=3` with `fib_multipath_hash_fields=0x0037`; policy 1 would hash the sending
socket's random txhash across veths, see MULTIPATH_HASH) — with `buckets 128 idle_timer 0`: when a distributor is withdrawn only its buckets move, and when it is restored
buckets move back at once (idle_timer 0: every bucket counts as idle). `EcmpPlan.group_update` gives the
`ip nexthop` lines for any set of active distributors (a group cannot be empty: at 0 it is deleted, and
with it the routes through it).

Distributor hosts. The agent sets up its TUN and policy routing itself from its config's `[tun]`; the lab
gives each host only its links and its main-table routes (outside prefixes via router-out, inside via
router-in, underlay B via the router). Failing closed is the product's job, not the lab's: every route the
agent adds into its TUN has a `blackhole` twin (overlay/runtime/netsetup.py), so a SIGKILLed agent's host
drops what it can no longer decide instead of routing the servers' replies un-NATed to the clients (whose
RSTs would reset connections another distributor still carries) — test_lab_ecmp.py's kill test is the
regression test for that.

The fleet in etcd (`fleet_store=True`, issue 11; tests/status/test_lab_fleet_etcd.py). An `etcd` namespace
on underlay A (ETCD_ADDRESS, 192.0.2.50: the distributors reach it directly, no router between) runs one
etcd member (`etcd` in the process table: `kill("etcd")`, `start("etcd")` on the same data directory) and
the `overlay ecmp` controller (`ecmp`), which programs both routers' groups through `ip -n` (`namespace =`
per group in `router.toml`): a distributor leaves the groups when its registration lease (`lease_ttl`)
expires and joins when it registers — no `withdraw`/`restore` by the lab. Every `distK.toml` gets
`[fleet] store = "etcd"` with the lab's endpoint and FLEET_PREFIX; the fleet document (`fleet.toml`: the
reference config's `[[tm]]` tables) is written with `overlay fleet put` before any agent starts.

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
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from overlay.lab import netns, nsnet, topology
from overlay.lab.lab import AGENT_READY_TIMEOUT, AgentConfigs, Lab, LabUnavailable, default_config_dir
from overlay.lab.topology import _BASE_SYSCTLS, _FORWARDING_SYSCTLS, NamespacePlan, Plan

DEFAULT_PREFIX = "ove-"
DEFAULT_DISTRIBUTORS = 2
MAX_DISTRIBUTORS = 8  # the transit /27s hold eight /30s

# The distributor config's [tun] (config/distributor.toml): what the agent captures, hence what the routers
# send to the distributors. tests/lab/test_ecmp_plan.py checks they agree with the config.
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

# Group ids in both routers; member K (1-based) is nexthop group + K: `overlay ecmp`'s `id + 1 + index`.
GROUP_V4, GROUP_V6 = 40, 60
BUCKETS = 128
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

# The fleet in etcd (fleet_store=True): one etcd member on underlay A, the controller beside it.
ETCD_ADDRESS = "192.0.2.50"
ETCD_URL = f"http://{ETCD_ADDRESS}:2379"
ETCD_PEER_URL = f"http://{ETCD_ADDRESS}:2380"
FLEET_PREFIX = "/overlay/ecmp-lab"
FLEET_LEASE_TTL = 1          # seconds: a killed distributor leaves the groups within about this (+ etcd's 0.5 s sweep)
ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


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
        """Its nexthop ids (v4, v6) in both routers: member index-1 of groups GROUP_V4 and GROUP_V6."""
        return GROUP_V4 + self.index, GROUP_V6 + self.index


def distributor_hosts(count: int = DEFAULT_DISTRIBUTORS) -> tuple[DistributorHost, ...]:
    if not 1 <= count <= MAX_DISTRIBUTORS:
        raise ValueError(f"the ECMP lab has 1 to {MAX_DISTRIBUTORS} distributors, not {count}")
    return tuple(DistributorHost(index) for index in range(1, count + 1))


@dataclass
class EcmpPlan(Plan):
    hosts: tuple[DistributorHost, ...] = ()
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


def roles(count: int = DEFAULT_DISTRIBUTORS, *, fleet_store: bool = False) -> tuple[str, ...]:
    # Distributor hosts before the routers: their veth ends are up (carrier) when the routers add nexthops.
    return ("switch", "client", "remote", *(h.name for h in distributor_hosts(count)), "router-out", "router-in",
            "router", *topology.TMS, "server1", "server2", "plain", *(("etcd",) if fleet_store else ()))


def build_plan(prefix: str = DEFAULT_PREFIX, distributors: int = DEFAULT_DISTRIBUTORS, *,
               multipath_hash: str = "5-tuple", fleet_store: bool = False) -> EcmpPlan:
    """The whole ECMP lab for namespaces named `prefix + role`; `multipath_hash` one of MULTIPATH_HASH;
    `fleet_store`: with the `etcd` namespace on underlay A."""
    hosts = distributor_hosts(distributors)
    namespaces = {role: NamespacePlan(role, prefix + role, sysctls=list(_BASE_SYSCTLS))
                  for role in roles(distributors, fleet_store=fleet_store)}
    for role in (*ROUTERS, "router", *(h.name for h in hosts)):
        namespaces[role].sysctls.extend(_FORWARDING_SYSCTLS)
    for router in ROUTERS:
        namespaces[router].sysctls.extend(MULTIPATH_HASH[multipath_hash])
    namespaces["switch"].sysctls.extend(["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    links: list[str] = []
    plan = EcmpPlan(prefix, namespaces, links, hosts=hosts, group_routes={})
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
        for router, (v4, v6) in (("router-out", host.outside), ("router-in", host.inside)):
            routing[router].append(f"nexthop add id {host.nexthops[0]} via {v4} dev {name}")
            routing[router].append(f"nexthop add id {host.nexthops[1]} via {v6} dev {name}")

    # The fleet store: etcd on the distributors' own network.
    if fleet_store:
        switch_port("etcd", "underlay", "underlay-a")
        address("etcd", "underlay", f"{ETCD_ADDRESS}/26")

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


def distributor_config_text(reference: str, host: DistributorHost, fleet: str | None = None) -> str:
    """The reference distributor config for `host`: its own node name and underlay address, all else shared
    (the hash key and seed, the TMs, `[tun]`: each host has its own namespace, so the TUN name repeats);
    `fleet`, a `[fleet]` table (fleet_section), appended."""
    text = _set_key(reference, "[node]", "name", f'"{host.name}"')
    text = _set_key(text, "[underlay]", "address", f'"{host.underlay}"')
    if fleet is not None:
        if _sections(text, "[fleet]"):
            raise ValueError("the reference distributor config has a [fleet] already")
        text = text.rstrip("\n") + "\n\n" + fleet
    return text


def fleet_section(prefix: str = FLEET_PREFIX, lease_ttl: int = FLEET_LEASE_TTL) -> str:
    """A distributor's `[fleet]` table: the fleet in the lab's etcd, under `prefix`."""
    return (f'[fleet]\nstore = "etcd"\nendpoints = ["{ETCD_URL}"]\nprefix = "{prefix}"\n'
            f"lease_ttl = {lease_ttl}\n")


def fleet_document_text(reference: str) -> str:
    """The fleet document for etcd: the reference config's `[[tm]]` tables, nothing else."""
    spans = _sections(reference, "[[tm]]")
    if not spans:
        raise ValueError("the distributor config has no [[tm]]")
    return "".join(reference[start:end].rstrip("\n") + "\n\n" for start, end in spans)


def controller_config_text(plan: EcmpPlan, prefix: str = FLEET_PREFIX) -> str:
    """`overlay ecmp`'s config for the lab: both families' groups of both routers (by `ip -n`), members in
    the hosts' order, so member K is nexthop GROUP + K — the ids build_plan gives them."""
    lines = [f'[fleet]\nendpoints = ["{ETCD_URL}"]\nprefix = "{prefix}"\n']
    for router, side in (("router-out", "outside"), ("router-in", "inside")):
        for group, family in ((GROUP_V4, 0), (GROUP_V6, 1)):
            members = ", ".join(f'{h.name} = {{ via = "{getattr(h, side)[family]}", dev = "{h.name}" }}'
                                for h in plan.hosts)
            lines.append(f'[[group]]\nid = {group}\nnamespace = "{plan.name(router)}"\nbuckets = {BUCKETS}\n'
                         f"members = {{ {members} }}\n")
    return "\n".join(lines)


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
    fleet_document: Path | None = None   # fleet_store: what `overlay fleet put` writes
    controller: Path | None = None       # fleet_store: `overlay ecmp --config`


def write_configs(source: Path, target: Path, hosts: Sequence[DistributorHost], *,
                  fleet_store: EcmpPlan | None = None) -> EcmpConfigs:
    """Copy `source` (a config directory like config/) to `target` and write `distK.toml` and the TM configs
    into the copy: paths relative to a config keep their meaning. `fleet_store` (the lab's plan): every
    distributor with `[fleet] store = "etcd"`, plus `fleet.toml` (the document) and `router.toml` (the
    controller's config)."""
    reference = source / "distributor.toml"
    missing = [p for p in (reference, *(source / f"{tm}.toml" for tm in topology.TMS)) if not p.exists()]
    if missing:
        raise LabUnavailable("agent configs missing: " + ", ".join(map(str, missing)))
    if target.resolve() != source.resolve():
        shutil.copytree(source, target, dirs_exist_ok=True)
    distributors = {}
    fleet = fleet_section() if fleet_store is not None else None
    for host in hosts:
        path = target / f"{host.name}.toml"
        path.write_text(distributor_config_text(reference.read_text(), host, fleet))
        distributors[host.name] = path
    tms = {}
    for tm in topology.TMS:
        path = target / f"{tm}.toml"
        path.write_text(tm_config_text((source / f"{tm}.toml").read_text(), hosts))
        tms[tm] = path
    configs = EcmpConfigs(target, distributors, tms)
    if fleet_store is not None:
        configs.fleet_document = target / "fleet.toml"
        configs.fleet_document.write_text(fleet_document_text(reference.read_text()))
        configs.controller = target / "router.toml"
        configs.controller.write_text(controller_config_text(fleet_store))
    return configs


# -- the lab ---------------------------------------------------------------------------------------------------

def etcd_unavailable_reason(binary: str | None = None) -> str | None:
    """Why the etcd variant cannot run here (no etcd binary), or None."""
    binary = binary or ETCD_BINARY
    if not os.access(binary, os.X_OK):
        return f"no etcd binary at {binary}: apt-get install etcd-server"
    return None


class EcmpLab(Lab):
    """The ECMP lab with real agents. `with EcmpLab(...) as lab:` is `up()`, then `down()` and a check that
    nothing is left (no namespace with the prefix, no process it started). `fleet_store=True`: the fleet in
    the lab's etcd and the groups kept by `overlay ecmp` (module docstring)."""

    def __init__(self, prefix: str | None = None, *, distributors: int = DEFAULT_DISTRIBUTORS,
                 config_dir: Path | None = None, state_dir: Path | None = None, multipath_hash: str = "5-tuple",
                 fleet_store: bool = False, etcd_binary: str | None = None):
        super().__init__(prefix or DEFAULT_PREFIX, config_dir=config_dir or default_config_dir(), state_dir=state_dir)
        self.source_config_dir = self.config_dir
        self.fleet_store = fleet_store
        self.etcd_binary = etcd_binary or ETCD_BINARY
        self.plan: EcmpPlan = build_plan(self.prefix, distributors, multipath_hash=multipath_hash,
                                         fleet_store=fleet_store)
        self.distributors = self.plan.distributors
        # The agents run from a copy, written by up(): config_dir is the copy (Lab runs agents from its parent).
        self.config_dir = self.state_dir / "config"
        self.distributor_configs = {name: self.config_dir / f"{name}.toml" for name in self.distributors}
        self.configs = AgentConfigs(self.distributor_configs[self.distributors[0]],
                                    {tm: self.config_dir / f"{tm}.toml" for tm in topology.TMS})
        self.fleet_document = self.config_dir / "fleet.toml"
        self.controller_config = self.config_dir / "router.toml"
        self.etcd_data = self.state_dir / "etcd"
        self.active: list[str] = list(self.distributors)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def up(self, *, agents: bool = True, timeout: float = AGENT_READY_TIMEOUT,
           before_agents: Callable[[Lab], None] | None = None) -> None:
        """Build the lab, start the servers and (unless `agents=False`) every TM and distributor; wait until
        every distributor sees every TM up. `before_agents(lab)` as `Lab.up`. With the fleet store, etcd
        starts (fresh) and the fleet document is put before the agents, and the controller (before the
        distributors) follows their registrations: up() returns once it has put every one in the groups."""
        if self.fleet_store:
            reason = etcd_unavailable_reason(self.etcd_binary)
            if reason:
                raise LabUnavailable(reason)
        write_configs(self.source_config_dir, self.config_dir, self.plan.hosts,
                      fleet_store=self.plan if self.fleet_store else None)
        self.active = list(self.distributors)

        def network(lab: Lab) -> None:
            if before_agents is not None:
                before_agents(lab)
            if self.fleet_store:
                shutil.rmtree(self.etcd_data, ignore_errors=True)   # a fresh store: no earlier run's keys
                self._start_etcd(timeout)
                self.fleet_command("put", str(self.fleet_document))

        super().up(agents=False, timeout=timeout, before_agents=network)
        if not agents:
            return
        if self.fleet_store:
            self._start_controller(timeout)
        for tm in topology.TMS:
            self._start_agent(tm, "tm", self.configs.tms[tm])
        for name in self.distributors:
            self._start_agent(name, "distributor", self.distributor_configs[name])
        for role in (*topology.TMS, *self.distributors):
            self.wait_ready(role, timeout)
        if self.fleet_store:
            # The controller read no registration (none existed), then one by one: all in, by its hand.
            self.wait_groups(self.distributors, timeout)
            self._wait(lambda: self.controller_applied() == set(self.distributors), timeout,
                       "the controller to apply every registration")

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
        """Until the agent answers /healthz; a distributor also until its health checks see every TM up and,
        with the fleet store, until it has the store's view (`fleet.state` "ok", the document applied)."""
        if role == "etcd":
            self._wait(self.etcd_healthy, timeout, "etcd to answer /health", role)
            return
        if role == "ecmp":
            self._wait(self.controller_connected, timeout, "the controller to connect to etcd", role)
            return
        url = f"http://127.0.0.1:{topology.STATUS_PORT}/healthz"
        self._wait_ready(role, url, timeout)
        if role in self.distributors:
            self._wait_ready(role, url, timeout,
                             accept=lambda body: set(json.loads(body).get("up", ())) >= set(topology.TMS))
            if self.fleet_store:
                self._wait(lambda: self.fleet_state(role) == "ok", timeout, f"{role} to join the fleet store", role)

    def pid(self, role: str) -> int:
        """The PID of a running lab process (from the process table's records)."""
        return self.processes.recorded()[role]

    def kill(self, role: str, timeout: float = 5.0) -> int:
        """SIGKILL a lab process (an agent, `etcd`, the controller `ecmp`) by its recorded PID — a crash: no
        clean-up of its own — and reap it; returns the PID."""
        pid = self.pid(role)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.processes.exited(role) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.processes.exited(role) is None:
            raise netns.LabError(f"{role} (PID {pid}) still running {timeout}s after SIGKILL")
        return pid

    def start(self, role: str, timeout: float = AGENT_READY_TIMEOUT) -> int:
        """(Re)start a TM or distributor agent from its config, or `etcd` (on its data directory) or the
        controller `ecmp`, and wait until it is ready; returns its PID."""
        if role in self.processes.recorded():
            raise netns.LabError(f"{role} is running (PID {self.pid(role)})")
        if role in self.distributors:
            self._start_agent(role, "distributor", self.distributor_configs[role])
        elif role in topology.TMS:
            self._start_agent(role, "tm", self.configs.tms[role])
        elif role == "etcd" and self.fleet_store:
            self._start_etcd(timeout)
        elif role == "ecmp" and self.fleet_store:
            self._start_controller(timeout)
        else:
            raise KeyError(f"{role} is not a process of this lab")
        self.wait_ready(role, timeout)
        return self.pid(role)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, role: str | None = None) -> float:
        """Poll `ready` until true (seconds waited); LabError after `timeout`, with `role`'s log tail."""
        started = time.monotonic()
        while not ready():
            if role is not None and self.processes.exited(role) is not None:
                raise netns.LabError(f"{role} exited with {self.processes.exited(role)}:\n{self.processes.log_tail(role)}")
            if time.monotonic() - started > timeout:
                tail = f":\n{self.processes.log_tail(role)}" if role else ""
                raise netns.LabError(f"waited {timeout:.0f}s for {what}{tail}")
            time.sleep(0.05)
        return time.monotonic() - started

    # -- the fleet store: etcd, `overlay fleet`, the controller -----------------------------------------

    def _start_etcd(self, timeout: float) -> None:
        self.etcd_data.mkdir(parents=True, exist_ok=True)
        self.processes.start("etcd", self.ns("etcd"), [
            self.etcd_binary, "--name", "lab", "--data-dir", str(self.etcd_data / "data"),
            "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
            "--listen-peer-urls", ETCD_PEER_URL, "--initial-advertise-peer-urls", ETCD_PEER_URL,
            "--initial-cluster", f"lab={ETCD_PEER_URL}", "--initial-cluster-state", "new",
            # One member: elect it at once. Also what lets a lease of 1 s be 1 s: etcd's shortest lease is
            # 1.5 election timeouts, rounded up to whole seconds (2 s with the default 1 s timeout).
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-level", "warn",
        ])
        self.wait_ready("etcd", timeout)

    def etcd_healthy(self) -> bool:
        try:
            status, body = nsnet.http_request(self.ns("etcd"), ETCD_URL + "/health", timeout=1.0)
            return status == 200 and json.loads(body).get("health") == "true"
        except (OSError, ValueError):
            return False

    def fleet_command(self, *argv: str, config: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`overlay fleet --config DIST.toml ARGV…` (dist1's config unless `config` names a distributor), run
        in the etcd namespace; a non-zero exit raises LabError unless `check=False`."""
        path = self.distributor_configs[config or self.distributors[0]]
        result = self.exec("etcd", [sys.executable, "-m", "overlay", "fleet", "--config", str(path), *argv], timeout=30)
        if check and result.returncode != 0:
            raise netns.LabError(f"overlay fleet {' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def fleet_get(self, config: str | None = None) -> dict[str, Any]:
        """The fleet as the store holds it (`overlay fleet get`)."""
        data: dict[str, Any] = json.loads(self.fleet_command("get", config=config).stdout)
        return data

    def fleet_state(self, role: str) -> str | None:
        """A distributor's `fleet.state` in /status ("ok", "unavailable", "connecting"), None if it does not answer."""
        try:
            state = self.status(role).get("fleet", {}).get("state")
        except (OSError, ValueError):
            return None
        return state if isinstance(state, str) else None

    def _start_controller(self, timeout: float) -> None:
        self.processes.start("ecmp", self.ns("etcd"),
                             [sys.executable, "-m", "overlay", "ecmp", "--config", str(self.controller_config)],
                             cwd=self.config_dir.parent)
        self.wait_ready("ecmp", timeout)

    def controller_connected(self) -> bool:
        """The controller holds a connection to etcd (its first request, the registrations' read, is on it)."""
        pid = self.processes.recorded().get("ecmp")
        if pid is None:
            return False
        result = self.exec("etcd", ["ss", "-tnpH", "state", "established", "dst", ETCD_URL.split("//")[1]], timeout=10)
        return f"pid={pid}," in result.stdout

    def controller_applied(self) -> set[str]:
        """The members the controller last put in the groups (the last `ecmp.group` lines of its log), if it
        put the same in every group; else the empty set."""
        last: dict[str, str] = {}
        for line in self.processes.log_tail("ecmp", lines=1000).splitlines():
            text = re.sub(r"\x1b\[[0-9;]*m", "", line)   # the console renderer's colours
            if "ecmp.group" not in text:
                continue
            group, namespace = re.search(r"\bgroup=(\d+)", text), re.search(r"\bnamespace=(\S+)", text)
            members = re.search(r"\bmembers=\[([^\]]*)\]", text)
            if group and namespace and members:
                last[f"{namespace.group(1)}/{group.group(1)}"] = members.group(1)
        if len(last) != 2 * len(ROUTERS) or len(set(last.values())) != 1:
            return set()
        return set(re.findall(r"[\w.-]+", next(iter(last.values()))))

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

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Each router's groups as their members now: {"router-out/40": ("dist1", "dist2"), …}."""
        names = {nexthop: host.name for host in self.plan.hosts for nexthop in host.nexthops}
        members: dict[str, tuple[str, ...]] = {}
        for router in ROUTERS:
            for group in (GROUP_V4, GROUP_V6):
                shown = netns.run(["ip", "-n", self.ns(router), "nexthop", "show", "id", str(group)], check=False).stdout
                found = re.search(r"group ([\d/]+)", shown)
                ids = [int(n) for n in found.group(1).split("/")] if found else []
                members[f"{router}/{group}"] = tuple(names.get(n, str(n)) for n in ids)
        return members

    def wait_groups(self, members: Iterable[str], timeout: float = 10.0) -> float:
        """Until every group of both routers holds exactly `members`; returns the seconds waited."""
        wanted = tuple(name for name in self.distributors if name in set(members))
        return self._wait(lambda: set(self.groups().values()) == {wanted}, timeout, f"the groups to be {wanted}")

    # -- probes ------------------------------------------------------------------------------------------

    def agent_logs(self) -> str:
        sections = []
        extra = ("etcd", "ecmp") if self.fleet_store else ()
        for role in (*topology.TMS, *self.distributors, *extra, *SERVER_ROLES):
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
