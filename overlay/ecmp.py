"""ECMP in front of several distributors: keep a router's resilient nexthop groups to exactly the
distributors that are alive, as their etcd registrations say (`overlay ecmp`, docs/operations.md).

Why a Linux resilient nexthop group driven by leases (and not BGP): the distributors are identical and
stateless, so a router needs only "which of them are alive"; the fleet store already knows that — every
distributor holds its registration under a lease it renews every third of `lease_ttl`, and a killed one
drops out when the lease expires. A resilient group (`type resilient`) then moves only the dead member's
hash buckets to the others; every other flow stays on its distributor. No second control plane to run and
secure. Where the router is not yours (a cloud load balancer, a physical router), announce the virtual
and xlate prefixes by BGP from each distributor instead; the property that makes either work is the same:
every distributor decides alike.

The controller config (`overlay ecmp --config router.toml`):

    [fleet]
    endpoints = ["http://192.0.2.80:2379"]
    prefix = "/overlay/lab"

    [[group]]
    id = 100                      # the nexthop group the router's routes use (`ip route ... nhid 100`)
    namespace = "ovl-router-out"  # optional: program another network namespace (a lab); default: ours
    buckets = 128
    members = { dist1 = { via = "198.51.100.2", dev = "d1" }, dist2 = { via = "198.51.100.3", dev = "d2" } }

Member nexthops get ids `id + 1 + index` (in the members' order). Ids are a network namespace's own, so
groups in different namespaces (one controller for two routers) may use the same ones. An empty set of
live members never empties a group (the kernel refuses it, and sending to the last known members beats
sending nowhere): the group is left as it was, and that is logged. Sans-I/O: `plan` returns the `ip` commands.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overlay.configlib import ConfigError, Section, load_toml
from overlay.fleetview import FleetStoreConfig, parse_fleet_section


@dataclass(frozen=True)
class Member:
    name: str
    via: str
    dev: str


@dataclass(frozen=True)
class Group:
    id: int
    members: tuple[Member, ...]
    buckets: int = 128
    namespace: str | None = None

    def member_id(self, index: int) -> int:
        return self.id + 1 + index


@dataclass(frozen=True)
class EcmpConfig:
    fleet: FleetStoreConfig
    groups: tuple[Group, ...]


def load_ecmp_config(path: str) -> EcmpConfig:
    root = load_toml(path)
    root.refuse_unknown(("fleet", "group"))
    fleet = parse_fleet_section(root.section("fleet", required=True))
    groups: list[Group] = []
    used: dict[tuple[str | None, int], str] = {}   # nexthop ids are per network namespace
    for section in root.sections("group", required=True):
        group = _parse_group(section)
        for nexthop in (group.id, *(group.member_id(i) for i in range(len(group.members)))):
            if (group.namespace, nexthop) in used:
                raise section.error("id", f"nexthop id {nexthop} is also {used[group.namespace, nexthop]}'s")
            used[group.namespace, nexthop] = f"group {group.id}"
        groups.append(group)
    return EcmpConfig(fleet, tuple(groups))


def _parse_group(section: Section) -> Group:
    group_id = section.int("id", minimum=1, maximum=1 << 30)
    buckets = section.int("buckets", 128, minimum=2, maximum=65535)
    namespace = section.str("namespace", None)
    members_section = section.section("members", required=True)
    members: list[Member] = []
    for name in members_section.keys():
        member = members_section.section(name)
        via = member.str("via")
        try:
            ipaddress.ip_address(via)
        except ValueError:
            raise member.error("via", "must be an IP address (the distributor's address on this router's link)") from None
        members.append(Member(name, via, member.str("dev")))
        member.done()
    if not members:
        raise section.error("members", "a group needs at least one member")
    families = {ipaddress.ip_address(member.via).version for member in members}
    if len(families) > 1:
        raise section.error("members", "one group, one family: make a group per family")
    section.done()
    return Group(group_id, tuple(members), buckets, namespace)


def _ip(group: Group, *argv: str) -> list[str]:
    return ["ip", *(("-n", group.namespace) if group.namespace else ()), *argv]


def setup(group: Group) -> list[list[str]]:
    """Every member's nexthop and the group with all of them (idempotent: `replace`)."""
    commands = [_ip(group, "nexthop", "replace", "id", str(group.member_id(i)), "via", m.via, "dev", m.dev)
                for i, m in enumerate(group.members)]
    return commands + plan(group, {m.name for m in group.members})


def plan(group: Group, live: set[str]) -> list[list[str]]:
    """The command that makes `group` hold exactly the live members; none when no member is live."""
    ids = [str(group.member_id(i)) for i, member in enumerate(group.members) if member.name in live]
    if not ids:
        return []
    return [_ip(group, "nexthop", "replace", "id", str(group.id), "group", "/".join(ids), "type", "resilient",
                "buckets", str(group.buckets), "idle_timer", "0")]


__all__ = ["ConfigError", "EcmpConfig", "Group", "Member", "load_ecmp_config", "plan", "setup"]
