"""The ECMP lab's plan and configs as data (no root): addresses, interface names, the routers' groups, and
the per-distributor configs derived from the reference ones. The lab itself runs in
tests/status/test_lab_ecmp.py."""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path

import pytest

from overlay.config import load_node_config, parse_node_config
from overlay.ecmp import load_ecmp_config, setup
from overlay.fleetview import parse_fleet_document
from overlay.lab import ecmp, topology

from .test_topology import DOCUMENTATION_RANGES, plan_addresses

CONFIG = Path(__file__).resolve().parents[2] / "config"


def test_plan_uses_only_documentation_addresses_and_lab_namespaces() -> None:
    plan = ecmp.build_plan("a-very-long-prefix-for-a-test-", 8, fleet_store=True)
    addresses = plan_addresses(plan) + [
        word for ns in plan.namespaces.values() for line in ns.commands for word in re.findall(r"(?:via|from) (\S+)", line)
    ]
    assert len(addresses) > 356
    for address in addresses:
        network = ipaddress.ip_network(address, strict=False)
        assert any(network.subnet_of(r) for r in DOCUMENTATION_RANGES if r.version == network.version), address
    for line in plan.links:
        names = re.findall(r"(?:link add|peer name) (\S+)", line)
        namespaces = re.findall(r"netns (\S+)", line)
        assert len(names) == 2 and len(namespaces) == 2, line
        assert all(len(name) <= 15 for name in names), line
        assert all(ns.startswith(plan.prefix) for ns in namespaces), line


def test_every_distributor_has_addresses_of_its_own() -> None:
    hosts = ecmp.distributor_hosts(ecmp.MAX_DISTRIBUTORS)
    assert hosts[0].underlay == topology.DISTRIBUTOR_UNDERLAY
    every = [a for h in hosts for a in (h.underlay, *h.outside, *h.router_out, *h.inside, *h.router_in)]
    assert len(set(every)) == len(every)
    for host in hosts:
        for (mine, router) in ((host.outside, host.router_out), (host.inside, host.router_in)):
            assert ipaddress.ip_interface(f"{mine[0]}/30").network == ipaddress.ip_interface(f"{router[0]}/30").network
            assert ipaddress.ip_interface(f"{mine[1]}/64").network == ipaddress.ip_interface(f"{router[1]}/64").network
    with pytest.raises(ValueError):
        ecmp.distributor_hosts(0)
    with pytest.raises(ValueError):
        ecmp.distributor_hosts(ecmp.MAX_DISTRIBUTORS + 1)


def test_the_routed_prefixes_are_what_the_distributor_config_captures_and_failing_closed_is_the_agents() -> None:
    tun = load_node_config(CONFIG / "distributor.toml").tun
    assert {str(p) for p in tun.capture} == {*ecmp.CAPTURE_V4, *ecmp.CAPTURE_V6}
    assert {str(p) for p in tun.capture_from} == {ecmp.INSIDE_V4, ecmp.INSIDE_V6}
    # No blackhole of the lab's own: the agent adds them (overlay/runtime/netsetup.py), the lab proves it.
    plan = ecmp.build_plan("t-", 2)
    assert not any("blackhole" in line for ns in plan.namespaces.values() for line in ns.commands)


def test_routers_spread_over_a_resilient_group_of_every_distributor() -> None:
    plan = ecmp.build_plan("t-", 3)
    for router in ecmp.ROUTERS:
        commands = plan.namespaces[router].commands
        assert "nexthop add id 40 group 41/42/43 type resilient buckets 128 idle_timer 0" in commands
        assert "nexthop add id 60 group 61/62/63 type resilient buckets 128 idle_timer 0" in commands
        # Every nexthop and group exists before a route uses it, every address before a nexthop.
        first_route = min(i for i, line in enumerate(commands) if "nhid" in line)
        assert all(i < first_route for i, line in enumerate(commands) if line.startswith("nexthop"))
        assert max(i for i, line in enumerate(commands) if line.startswith("address")) < first_route
        sysctls = plan.namespaces[router].sysctls
        for family in ("ipv4", "ipv6"):  # L4: addresses, protocol and ports of the packet itself
            assert {f"net.{family}.fib_multipath_hash_policy=3", f"net.{family}.fib_multipath_hash_fields=0x0037"} <= set(sysctls)
    sysctls = ecmp.build_plan("t-", 2, multipath_hash="skb").namespaces["router-in"].sysctls
    assert "net.ipv4.fib_multipath_hash_policy=1" in sysctls and "net.ipv6.fib_multipath_hash_policy=1" in sysctls
    assert f"route add {topology.VIP_V4}/27 nhid 40".replace(".80/27", ".64/27") in plan.namespaces["router-out"].commands


def test_group_updates_withdraw_restore_and_never_leave_an_empty_group() -> None:
    plan = ecmp.build_plan("t-", 2)
    withdraw = plan.group_update(["dist1"], ["dist1", "dist2"])
    assert withdraw["router-out"] == [
        "nexthop replace id 40 group 41 type resilient buckets 128 idle_timer 0",
        "nexthop replace id 60 group 61 type resilient buckets 128 idle_timer 0",
    ]
    assert withdraw["router-in"] == withdraw["router-out"]
    assert plan.group_update(["dist2", "dist1"], ["dist1"])["router-in"][0] == \
        "nexthop replace id 40 group 41/42 type resilient buckets 128 idle_timer 0"
    assert plan.group_update([], ["dist1"])["router-out"] == ["nexthop del id 40", "nexthop del id 60"]
    back = plan.group_update(["dist2"], [])["router-out"]
    assert back[:2] == ["nexthop add id 40 group 42 type resilient buckets 128 idle_timer 0",
                        "nexthop add id 60 group 62 type resilient buckets 128 idle_timer 0"]
    assert back[2:] == plan.group_routes["router-out"] and len(back) == 2 + 7
    with pytest.raises(KeyError):
        plan.group_update(["dist9"], ["dist1"])


def test_distributor_configs_differ_only_in_name_and_underlay_address(tmp_path: Path) -> None:
    hosts = ecmp.distributor_hosts(3)
    configs = ecmp.write_configs(CONFIG, tmp_path / "config", hosts)
    reference = load_node_config(CONFIG / "distributor.toml")
    assert reference.distributor is not None
    for host in hosts:
        node = load_node_config(configs.distributors[host.name])
        assert node.name == host.name and str(node.underlay.address) == host.underlay
        assert node.distributor is not None
        assert node.distributor.tms == reference.distributor.tms
        assert (node.distributor.seed, node.distributor.hash_key) == (reference.distributor.seed, reference.distributor.hash_key)
        assert node.tun == reference.tun
        changed = [line for line in difflib.ndiff((CONFIG / "distributor.toml").read_text().splitlines(),
                                                   configs.distributors[host.name].read_text().splitlines())
                   if line.startswith(("+", "-"))]
        assert len(changed) <= 4, changed  # name and address, each - and +
    for tm in topology.TMS:
        node = load_node_config(configs.tms[tm])
        assert node.distributor_names == tuple(h.name for h in hosts)
        assert [(str(a), p) for a, p in node.distributors] == [(h.underlay, 4754) for h in hosts]
        assert node.tm == load_node_config(CONFIG / f"{tm}.toml").tm
    assert (tmp_path / "config" / "systemd").is_dir(), "the rest of the directory is copied along"


def test_tm_configs_with_per_distributor_keys_are_refused() -> None:
    text = (CONFIG / "tm1.toml").read_text().replace('underlay = "192.0.2.2:4754"\n',
                                                     'underlay = "192.0.2.2:4754"\npublic_key = "x"\n')
    with pytest.raises(ValueError, match="public_key"):
        ecmp.tm_config_text(text, ecmp.distributor_hosts(2))


def test_the_fleet_store_variant_has_etcd_on_underlay_a_and_configs_for_etcd(tmp_path: Path) -> None:
    plan = ecmp.build_plan("t-", 3, fleet_store=True)
    assert "etcd" in plan.namespaces and "etcd" not in ecmp.build_plan("t-", 3).namespaces
    assert f"address add {ecmp.ETCD_ADDRESS}/26 dev underlay" in plan.namespaces["etcd"].commands
    assert ipaddress.ip_address(ecmp.ETCD_ADDRESS) in ipaddress.ip_network("192.0.2.0/26")
    taken = {topology.ROUTER_UNDERLAY_A, *(h.underlay for h in ecmp.distributor_hosts(ecmp.MAX_DISTRIBUTORS))}
    assert ecmp.ETCD_ADDRESS not in taken
    configs = ecmp.write_configs(CONFIG, tmp_path / "config", plan.hosts, fleet_store=plan)
    for host in plan.hosts:
        node = load_node_config(configs.distributors[host.name])
        assert node.distributor is not None
        fleet = node.distributor.fleet
        assert (fleet.store, fleet.endpoints, fleet.prefix, fleet.lease_ttl) == \
            ("etcd", (ecmp.ETCD_URL,), ecmp.FLEET_PREFIX, ecmp.FLEET_LEASE_TTL)
    # The document: exactly the reference [[tm]] tables, accepted by the reload parser.
    assert configs.fleet_document is not None and configs.controller is not None
    document = parse_fleet_document(configs.fleet_document.read_text(), "fleet.toml")
    node = parse_node_config(configs.distributors["dist1"].read_text(), "dist1.toml", configs.directory, document)
    reference = load_node_config(CONFIG / "distributor.toml").distributor
    assert node.distributor is not None and reference is not None and node.distributor.tms == reference.tms
    # The controller programs both routers with the lab's own ids: member K of group G is nexthop G + K.
    controller = load_ecmp_config(str(configs.controller))
    assert controller.fleet.prefix == ecmp.FLEET_PREFIX and controller.fleet.endpoints == (ecmp.ETCD_URL,)
    assert sorted((g.namespace, g.id) for g in controller.groups) == sorted(
        (plan.name(r), g) for r in ecmp.ROUTERS for g in (ecmp.GROUP_V4, ecmp.GROUP_V6))
    for group in controller.groups:
        router = "router-out" if group.namespace == plan.name("router-out") else "router-in"
        family = 0 if group.id == ecmp.GROUP_V4 else 1
        lab_nexthops = [line for line in plan.namespaces[router].commands if line.startswith("nexthop add id") and " via " in line]
        for command in setup(group)[:-1]:   # the members, as the controller (re)creates them
            assert " ".join(command[3:]).replace("replace", "add", 1) in lab_nexthops, command
        assert [m.name for m in group.members] == list(plan.distributors)
        assert [group.member_id(i) for i in range(len(group.members))] == [h.nexthops[family] for h in plan.hosts]
        assert plan_group_line(plan, router, group.id) == " ".join(setup(group)[-1][3:]).replace("replace", "add", 1)


def plan_group_line(plan: ecmp.EcmpPlan, router: str, group: int) -> str:
    return next(line for line in plan.namespaces[router].commands if line.startswith(f"nexthop add id {group} group"))
