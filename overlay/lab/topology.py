"""The reference lab (docs/reference-lab.md) as data: namespaces, veth links and the `ip` commands of each.

Nothing here touches the system; `overlay.lab.netns` executes a `Plan`. Keeping the address plan in one
place lets the builder, the traffic generator and the tests agree on it without repeating literals.

Layout. A "switch" namespace holds three bridges (outside, inside, underlay B) so no bridge or veth ever
lives in the host's namespace. Underlay A is a point-to-point veth between the distributor and the router.
server2 sits behind the "pmtu" router, whose route to server2 carries `mtu 1280`: both ends keep links of
1500 (so TCP's MSS does not hide the bottleneck) and the router answers "fragmentation needed" / "packet
too big" from the inside network, which the distributor host captures into its TUN like any reply. The
pmtu router proxies ARP/NDP so server2 keeps the plan's address and its default route via 203.0.113.1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_PREFIX = "ovl-"

# Outside network: clients and the "internet".
OUTSIDE_V4 = "198.51.100.0/24"
OUTSIDE_V6 = "2001:db8:1::/64"
DISTRIBUTOR_OUTSIDE_V4 = "198.51.100.1"
DISTRIBUTOR_OUTSIDE_V6 = "2001:db8:1::1"
CLIENT_V4 = "198.51.100.10"
CLIENT_V6 = "2001:db8:1::10"
REMOTE_V4 = "198.51.100.20"
REMOTE_V6 = "2001:db8:1::20"
CLIENT_SOURCES_V4: tuple[str, ...] = tuple(f"198.51.100.{host}" for host in range(100, 200))
CLIENT_SOURCES_V6: tuple[str, ...] = tuple(f"2001:db8:1::{host:x}" for host in range(0x100, 0x200))

# Underlay: A between distributor and router, B between router and the TMs ("another cloud").
ROUTER_UNDERLAY_A = "192.0.2.1"
DISTRIBUTOR_UNDERLAY = "192.0.2.2"
ROUTER_UNDERLAY_B = "192.0.2.65"
TM_UNDERLAY = {"tm1": "192.0.2.71", "tm2": "192.0.2.72", "tm3": "192.0.2.73"}

# Inside network: the servers.
DISTRIBUTOR_INSIDE_V4 = "203.0.113.1"
DISTRIBUTOR_INSIDE_V6 = "2001:db8:2::1"
PMTU_ROUTER_V4 = "203.0.113.2"
PMTU_ROUTER_V6 = "2001:db8:2::2"
SERVERS_V4 = {"server1": "203.0.113.10", "server2": "203.0.113.11"}
SERVERS_V6 = {"server1": "2001:db8:2::10", "server2": "2001:db8:2::11"}
PLAIN_V4 = "203.0.113.50"
PLAIN_V6 = "2001:db8:2::50"
PMTU_BOTTLENECK = 1280  # IPv6's minimum MTU, so one value serves both families

# Served by the TMs.
VIP_V4 = "203.0.113.80"
VIP_V6 = "2001:db8:80::80"
XLATE_V4 = {"tm1": "203.0.113.101", "tm2": "203.0.113.102", "tm3": "203.0.113.103"}
XLATE_V6 = {"tm1": "2001:db8:ee::101", "tm2": "2001:db8:ee::102", "tm3": "2001:db8:ee::103"}
MANAGEMENT_V4 = {"tm1": "203.0.113.201", "tm2": "203.0.113.202", "tm3": "203.0.113.203"}

TMS: tuple[str, ...] = ("tm1", "tm2", "tm3")
STATUS_PORT = 8080
HTTP_PORT = 80

# Sysctls every namespace gets before its interfaces exist, so new interfaces inherit them through
# `default`: no DAD (addresses usable at once), rp_filter off (the distributor host sees client sources
# arriving from its TUN, ENVIRONMENT.md), no IPv6 autoconfiguration noise.
_BASE_SYSCTLS = (
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_ra=0",
    "net.ipv6.conf.default.accept_ra=0",
)
_FORWARDING_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.forwarding=1",
)


@dataclass
class NamespacePlan:
    """One namespace: its sysctls and the `ip -batch` lines run inside it once all veths exist."""

    role: str
    name: str
    sysctls: list[str] = field(default_factory=lambda: list(_BASE_SYSCTLS))
    setup: list[str] = field(default_factory=list)  # before veths are created (the switch's bridges)
    commands: list[str] = field(default_factory=list)


@dataclass
class Plan:
    prefix: str
    namespaces: dict[str, NamespacePlan]
    links: list[str]  # `ip -batch` lines run in the caller's namespace; every end lands in a lab namespace

    def name(self, role: str) -> str:
        return self.namespaces[role].name

    def interface_names(self) -> set[str]:
        """Every interface the plan creates (veth ends and bridges), whichever namespace holds it."""
        names = {match for line in self.links for match in re.findall(r"(?:link add|peer name) (\S+)", line)}
        for ns in self.namespaces.values():
            names.update(re.findall(r"link add (\S+) type bridge", "\n".join(ns.setup)))
        return names


ROLES: tuple[str, ...] = (
    "switch", "client", "remote", "dist", "router", *TMS, "server1", "pmtu", "server2", "plain",
)
# Roles whose namespace routes between interfaces.
_ROUTERS = frozenset({"dist", "router", "pmtu"})


def build_plan(prefix: str = DEFAULT_PREFIX) -> Plan:
    """The whole reference lab for namespaces named `prefix + role`."""
    namespaces = {role: NamespacePlan(role, prefix + role) for role in ROLES}
    for role in _ROUTERS:
        namespaces[role].sysctls.extend(_FORWARDING_SYSCTLS)
    # The switch only bridges: no IPv6 on its ports, no addresses at all.
    namespaces["switch"].sysctls.extend(
        ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    )
    links: list[str] = []
    plan = Plan(prefix, namespaces, links)

    switch = namespaces["switch"]
    for bridge in ("outside", "inside", "underlay"):
        switch.setup.append(f"link add {bridge} type bridge stp_state 0 forward_delay 0 mcast_snooping 0")
        switch.setup.append(f"link set {bridge} up")

    def veth(role_a: str, if_a: str, role_b: str, if_b: str) -> None:
        links.append(
            f"link add {if_a} netns {namespaces[role_a].name} type veth"
            f" peer name {if_b} netns {namespaces[role_b].name}"
        )
        for role, ifname in ((role_a, if_a), (role_b, if_b)):
            namespaces[role].commands.append(f"link set {ifname} up")

    def switch_port(role: str, ifname: str, bridge: str) -> None:
        port = f"{bridge[0]}-{role}"
        veth(role, ifname, "switch", port)
        switch.commands.append(f"link set {port} master {bridge}")

    def addresses(role: str, ifname: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = " nodad" if ":" in cidr else ""
            namespaces[role].commands.append(f"address add {cidr} dev {ifname}{extra}")

    def routes(role: str, *lines: str) -> None:
        namespaces[role].commands.extend(f"route add {line}" for line in lines)

    # Outside network.
    for role in ("client", "remote", "dist"):
        switch_port(role, "outside", "outside")
    addresses("client", "outside", f"{CLIENT_V4}/24", f"{CLIENT_V6}/64")
    addresses("client", "outside", *(f"{a}/24" for a in CLIENT_SOURCES_V4))
    addresses("client", "outside", *(f"{a}/64" for a in CLIENT_SOURCES_V6))
    addresses("remote", "outside", f"{REMOTE_V4}/24", f"{REMOTE_V6}/64")
    addresses("dist", "outside", f"{DISTRIBUTOR_OUTSIDE_V4}/24", f"{DISTRIBUTOR_OUTSIDE_V6}/64")
    for role in ("client", "remote"):
        routes(role, f"default via {DISTRIBUTOR_OUTSIDE_V4}", f"default via {DISTRIBUTOR_OUTSIDE_V6}")

    # Underlay A (point to point) and B (bridged).
    veth("dist", "underlay", "router", "ula")
    addresses("dist", "underlay", f"{DISTRIBUTOR_UNDERLAY}/26")
    addresses("router", "ula", f"{ROUTER_UNDERLAY_A}/26")
    routes("dist", f"192.0.2.64/26 via {ROUTER_UNDERLAY_A}")
    switch_port("router", "ulb", "underlay")
    addresses("router", "ulb", f"{ROUTER_UNDERLAY_B}/26")
    for tm in TMS:
        switch_port(tm, "underlay", "underlay")
        addresses(tm, "underlay", f"{TM_UNDERLAY[tm]}/26")
        routes(tm, f"default via {ROUTER_UNDERLAY_B}")

    # Inside network.
    switch_port("dist", "inside", "inside")
    addresses("dist", "inside", f"{DISTRIBUTOR_INSIDE_V4}/26", f"{DISTRIBUTOR_INSIDE_V6}/64")
    for role, v4, v6 in (
        ("server1", SERVERS_V4["server1"], SERVERS_V6["server1"]),
        ("plain", PLAIN_V4, PLAIN_V6),
    ):
        switch_port(role, "inside", "inside")
        addresses(role, "inside", f"{v4}/26", f"{v6}/64")
        routes(role, f"default via {DISTRIBUTOR_INSIDE_V4}", f"default via {DISTRIBUTOR_INSIDE_V6}")

    # server2 behind the pmtu router (proxy ARP/NDP keeps server2 on the inside prefix).
    switch_port("pmtu", "inside", "inside")
    veth("pmtu", "server2", "server2", "inside")
    pmtu = namespaces["pmtu"]
    pmtu.sysctls.extend(
        [
            "net.ipv4.conf.all.proxy_arp=1",
            "net.ipv4.conf.default.proxy_arp=1",
            "net.ipv6.conf.all.proxy_ndp=1",
            "net.ipv6.conf.default.proxy_ndp=1",
        ]
    )
    addresses("pmtu", "inside", f"{PMTU_ROUTER_V4}/26", f"{PMTU_ROUTER_V6}/64")
    server2_v4, server2_v6 = SERVERS_V4["server2"], SERVERS_V6["server2"]
    routes(
        "pmtu",
        f"{server2_v4}/32 dev server2 mtu {PMTU_BOTTLENECK}",
        f"{server2_v6}/128 dev server2 mtu {PMTU_BOTTLENECK}",
        f"default via {DISTRIBUTOR_INSIDE_V4}",
        f"default via {DISTRIBUTOR_INSIDE_V6}",
    )
    # Proxy NDP answers only for listed addresses: server2 on the inside, everything server2 asks for on
    # its own link (it believes the whole /64 is on-link).
    pmtu.commands.append(f"neigh add proxy {server2_v6} dev inside")
    for neighbour in (DISTRIBUTOR_INSIDE_V6, SERVERS_V6["server1"], PLAIN_V6):
        pmtu.commands.append(f"neigh add proxy {neighbour} dev server2")
    addresses("server2", "inside", f"{server2_v4}/26", f"{server2_v6}/64")
    routes("server2", f"default via {DISTRIBUTOR_INSIDE_V4}", f"default via {DISTRIBUTOR_INSIDE_V6}")
    return plan

