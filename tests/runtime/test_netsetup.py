"""netsetup: plans from configs (pure), and in a namespace: apply adds exactly them, undo removes exactly them."""

from __future__ import annotations

import ipaddress
import os
import time
from types import SimpleNamespace

import pytest

from overlay.runtime.netsetup import (
    DEFAULT_TABLE,
    FAIL_CLOSED_METRIC,
    FROM_RULE_PRIORITY,
    IIF_RULE_PRIORITY,
    IIF_UNREACHABLE_PRIORITY,
    MAIN_TABLE,
    NetSetup,
    Route,
    Rule,
    distributor_plan,
    edge_plan,
    tm_plan,
)
from tests.runtime.lab import in_ns, inside, namespaces, net_state, require_lab

net = ipaddress.ip_network


def tun_section(name: str = "rtxd0", mtu: int = 1400, capture=(), capture_from=()) -> SimpleNamespace:
    return SimpleNamespace(name=name, mtu=mtu, capture=[net(p) for p in capture],
                           capture_from=[net(p) for p in capture_from])


DISTRIBUTOR_PLANS = [
    {
        "description": "reference distributor: VIPs and xlate captured, inside network policy-routed, v4+v6",
        "tun": tun_section(capture=["203.0.113.80/32", "203.0.113.96/27", "2001:db8:80::80/128"],
                           capture_from=["203.0.113.0/26", "2001:db8:2::/64"]),
        "routes": {Route(net("203.0.113.80/32"), MAIN_TABLE), Route(net("203.0.113.96/27"), MAIN_TABLE),
                   Route(net("2001:db8:80::80/128"), MAIN_TABLE),
                   Route(net("0.0.0.0/0"), DEFAULT_TABLE), Route(net("::/0"), DEFAULT_TABLE),
                   # fail closed: each has a blackhole twin that takes over when the TUN dies with its agent
                   Route(net("203.0.113.80/32"), MAIN_TABLE, blackhole=True),
                   Route(net("203.0.113.96/27"), MAIN_TABLE, blackhole=True),
                   Route(net("2001:db8:80::80/128"), MAIN_TABLE, blackhole=True),
                   Route(net("0.0.0.0/0"), DEFAULT_TABLE, blackhole=True), Route(net("::/0"), DEFAULT_TABLE, blackhole=True)},
        "rules": {Rule(IIF_RULE_PRIORITY, MAIN_TABLE, 4, iif="rtxd0"), Rule(IIF_RULE_PRIORITY, MAIN_TABLE, 6, iif="rtxd0"),
                  Rule(IIF_UNREACHABLE_PRIORITY, 0, 4, iif="rtxd0", unreachable=True),
                  Rule(IIF_UNREACHABLE_PRIORITY, 0, 6, iif="rtxd0", unreachable=True),
                  Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 4, src=net("203.0.113.0/26")),
                  Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 6, src=net("2001:db8:2::/64"))},
    },
    {
        "description": "capture only: no policy routing at all, no table of our own",
        "tun": tun_section(capture=["198.51.100.0/24"]),
        "routes": {Route(net("198.51.100.0/24"), MAIN_TABLE), Route(net("198.51.100.0/24"), MAIN_TABLE, blackhole=True)},
        "rules": set(),
    },
    {
        "description": "IPv4-only capture_from adds no IPv6 rules or routes",
        "tun": tun_section(capture_from=["203.0.113.0/26"]),
        "routes": {Route(net("0.0.0.0/0"), DEFAULT_TABLE), Route(net("0.0.0.0/0"), DEFAULT_TABLE, blackhole=True)},
        "rules": {Rule(IIF_RULE_PRIORITY, MAIN_TABLE, 4, iif="rtxd0"),
                  Rule(IIF_UNREACHABLE_PRIORITY, 0, 4, iif="rtxd0", unreachable=True),
                  Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 4, src=net("203.0.113.0/26"))},
    },
]


@pytest.mark.parametrize("case", DISTRIBUTOR_PLANS, ids=[case["description"] for case in DISTRIBUTOR_PLANS])
def test_distributor_plan(case: dict) -> None:
    plan = distributor_plan(case["tun"])
    assert set(plan.routes) == case["routes"]
    assert set(plan.rules) == case["rules"]
    assert plan.addresses == () and plan.loose_rp_filter
    assert plan.mtu == 1400 and plan.tun == "rtxd0"


def test_distributor_warns_about_forwarding_only_for_the_versions_it_captures() -> None:
    assert distributor_plan(tun_section(capture=["203.0.113.80/32"])).forwarding == (4,)
    both = distributor_plan(tun_section(capture=["203.0.113.80/32"], capture_from=["2001:db8:2::/64"]))
    assert both.forwarding == (4, 6)


def test_iif_rule_wins_over_the_from_rules() -> None:
    """Output of the distributor written into the TUN must be routed by `main`, never back into the TUN."""
    assert IIF_RULE_PRIORITY < IIF_UNREACHABLE_PRIORITY < FROM_RULE_PRIORITY < 32766


def test_tm_plan_puts_management_addresses_on_the_tun_and_routes_their_replies_into_it() -> None:
    plan = tm_plan(tun_section(name="rtxt0"), [ipaddress.ip_address("203.0.113.201"),
                                               ipaddress.ip_address("2001:db8:ee::201")])
    assert [str(a) for a in plan.addresses] == ["203.0.113.201/32", "2001:db8:ee::201/128"]
    assert set(plan.rules) == {Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 4, src=net("203.0.113.201/32")),
                               Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 6, src=net("2001:db8:ee::201/128"))}
    assert set(plan.routes) == {Route(net("0.0.0.0/0"), DEFAULT_TABLE), Route(net("::/0"), DEFAULT_TABLE)}
    assert plan.forwarding == ()


def test_tm_plan_without_management_adds_nothing() -> None:
    plan = tm_plan(tun_section(name="rtxt0"), [])
    assert plan.addresses == () and plan.routes == () and plan.rules == ()


def test_edge_plan_puts_its_host_addresses_on_the_tun_and_sends_what_they_send_into_it() -> None:
    plan = edge_plan(tun_section(name="rtxe0", capture=["203.0.113.80/32"]),
                     [net("203.0.113.12/32"), net("2001:db8:2::12/128"), net("203.0.113.32/28")])
    assert [str(a) for a in plan.addresses] == ["203.0.113.12/32", "2001:db8:2::12/128"], "host prefixes only"
    assert set(plan.rules) == {Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 4, src=net("203.0.113.12/32")),
                               Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 6, src=net("2001:db8:2::12/128")),
                               Rule(FROM_RULE_PRIORITY, DEFAULT_TABLE, 4, src=net("203.0.113.32/28"))}
    assert set(plan.routes) == {Route(net("0.0.0.0/0"), DEFAULT_TABLE), Route(net("::/0"), DEFAULT_TABLE),
                                Route(net("203.0.113.80/32"), MAIN_TABLE)}
    assert plan.forwarding == (4,), "a site behind the edge (a /28) is forwarded for"


REFERENCE_TUN = tun_section(capture=["203.0.113.80/32", "2001:db8:80::80/128"],
                            capture_from=["203.0.113.0/26", "2001:db8:2::/64"])


def rule_key(rule: dict) -> tuple:
    src = f"{rule['src']}/{rule['srclen']}" if "srclen" in rule else rule.get("src")
    return rule["priority"], src, rule.get("iif"), rule.get("table", rule.get("action"))


def spare_link(ns: str, name: str) -> None:
    """An unrelated device (this kernel has no dummy driver: one end of a veth pair inside the namespace)."""
    in_ns(ns, "ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    in_ns(ns, "ip", "link", "set", f"{name}p", "up")


@pytest.mark.lab
def test_apply_adds_exactly_the_plan_and_undo_removes_exactly_it() -> None:
    require_lab()
    from overlay.runtime.tun import TunDevice

    with namespaces("net") as ns:
        # A route lookup for a forwarded packet (`route get ... iif`) needs forwarding on. A new namespace
        # inherits it from the host's (devconf_inherit_init_net=0), which is on only while dockerd runs.
        in_ns(ns["net"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        spare_link(ns["net"], "rtxdummy")  # an unrelated device must survive
        in_ns(ns["net"], "ip", "rule", "add", "from", "192.0.2.0/24", "lookup", "100", "priority", "100")
        before = net_state(ns["net"])
        with inside(ns["net"]):
            device = TunDevice("rtxd0")
        try:
            setup = NetSetup(distributor_plan(REFERENCE_TUN))
            with inside(ns["net"]):
                setup.apply()
            during = net_state(ns["net"])
            rules4 = {rule_key(r) for r in during["rules4"]}
            assert (IIF_RULE_PRIORITY, "all", "rtxd0", "main") in rules4
            assert (FROM_RULE_PRIORITY, "203.0.113.0/26", None, str(DEFAULT_TABLE)) in rules4
            rules6 = {rule_key(r) for r in during["rules6"]}
            assert (FROM_RULE_PRIORITY, "2001:db8:2::/64", None, str(DEFAULT_TABLE)) in rules6
            routes = {(r["dst"], r.get("dev"), r.get("table", "main")) for r in during["routes4"] + during["routes6"]}
            assert {("203.0.113.80", "rtxd0", "main"), ("2001:db8:80::80", "rtxd0", "main"),
                    ("default", "rtxd0", str(DEFAULT_TABLE))} <= routes
            tun_link = next(link for link in during["links"] if link["ifname"] == "rtxd0")
            assert tun_link["mtu"] == 1400
            # No link-local address on the TUN, hence no router solicitations or MLD reports into it.
            assert in_ns(ns["net"], "ip", "-6", "addr", "show", "dev", "rtxd0").strip() == ""
            time.sleep(1.5)  # the kernel sends MLD reports and solicitations within about a second of "up"
            with pytest.raises(BlockingIOError):
                os.read(device.fd, 2048)
            # The kernel itself says where things go: from the inside into the TUN, the TUN's output via main.
            assert "dev rtxd0" in in_ns(ns["net"], "ip", "route", "get", "198.51.100.10", "from", "203.0.113.10",
                                        "iif", "rtxdummy")
            # Without a route in main, a packet from the TUN is unreachable instead of looping back into it.
            looped = in_ns(ns["net"], "ip", "route", "get", "192.0.2.9", "from", "203.0.113.10", "iif", "rtxd0",
                           check=False)
            assert "rtxd0" not in looped.split("cache")[0]
            with inside(ns["net"]):
                setup.undo()
            undone = net_state(ns["net"])
            # Rules are gone at once; routes of the TUN's own (fe80::/64, multicast) stay while it is open.
            for key in ("rules4", "rules6"):
                assert undone[key] == before[key], key
            ours = [r for r in undone["routes4"] + undone["routes6"]
                    if r.get("table") == str(DEFAULT_TABLE) or r["dst"] in ("203.0.113.80", "2001:db8:80::80")]
            assert ours == []
        finally:
            device.close()
        assert net_state(ns["net"]) == before


@pytest.mark.lab
def test_clean_stale_removes_leftovers_of_a_crashed_run_only() -> None:
    require_lab()
    from overlay.runtime.tun import TunDevice

    with namespaces("net") as ns:
        spare_link(ns["net"], "rtxdummy")
        in_ns(ns["net"], "ip", "link", "set", "rtxdummy", "up")
        in_ns(ns["net"], "ip", "rule", "add", "from", "192.0.2.0/24", "lookup", "100", "priority", "100")
        before = net_state(ns["net"])
        # A crashed run: its TUN died with it, its rules and table-4754 routes (via another device) did not.
        with inside(ns["net"]):
            device = TunDevice("rtxd0")
            crashed = NetSetup(distributor_plan(REFERENCE_TUN))
            crashed.apply()
        device.close()
        # Fail closed: with the TUN gone, the host drops what it would otherwise forward itself — a VIP's
        # packets, and the servers' replies with their NAT not undone (negative control: the stray route).
        # (`ip route get` answers EINVAL for a blackhole; the tables say which route is left.)
        in_ns(ns["net"], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for shown, destination in ((in_ns(ns["net"], "ip", "route", "show", "203.0.113.80/32"), "203.0.113.80"),
                                   (in_ns(ns["net"], "ip", "route", "show", "table", str(DEFAULT_TABLE)), "default")):
            words = shown.split()
            assert words[:2] == ["blackhole", destination] and words[-2:] == ["metric", str(FAIL_CLOSED_METRIC)], shown
        for lookup in (["203.0.113.80", "from", "198.51.100.10"], ["198.51.100.10", "from", "203.0.113.10"]):
            with pytest.raises(RuntimeError, match="Invalid argument"):
                in_ns(ns["net"], "ip", "route", "get", *lookup, "iif", "rtxdummy")
        in_ns(ns["net"], "ip", "route", "add", "default", "dev", "rtxdummy", "table", str(DEFAULT_TABLE))
        assert net_state(ns["net"])["rules4"] != before["rules4"]
        with inside(ns["net"]):
            removed = NetSetup(distributor_plan(REFERENCE_TUN)).clean_stale()
        # iif, unreachable and from rules (v4, v6); the stray table route; the table's two blackholes and
        # one per captured prefix in main.
        assert removed == 3 * 2 + 1 + 2 + len(REFERENCE_TUN.capture)
        after = net_state(ns["net"])
        for key in ("rules4", "rules6", "routes4", "routes6"):
            assert after[key] == before[key], key


@pytest.mark.lab
def test_tm_setup_answers_from_the_management_address_into_the_tun() -> None:
    require_lab()
    from overlay.runtime.tun import TunDevice

    with namespaces("tm") as ns:
        spare_link(ns["tm"], "rtxup")
        in_ns(ns["tm"], "ip", "addr", "add", "192.0.2.71/26", "dev", "rtxup")
        in_ns(ns["tm"], "ip", "link", "set", "rtxup", "up")
        in_ns(ns["tm"], "ip", "route", "add", "default", "via", "192.0.2.65")
        with inside(ns["tm"]):
            device = TunDevice("rtxt0")
        try:
            setup = NetSetup(tm_plan(tun_section(name="rtxt0"), [ipaddress.ip_address("203.0.113.201")]))
            with inside(ns["tm"]):
                setup.apply()
            assert "203.0.113.201/32" in in_ns(ns["tm"], "ip", "-4", "addr", "show", "dev", "rtxt0")
            assert "dev rtxt0" in in_ns(ns["tm"], "ip", "route", "get", "198.51.100.10", "from", "203.0.113.201")
            assert "dev rtxup" in in_ns(ns["tm"], "ip", "route", "get", "198.51.100.10")
            with inside(ns["tm"]):
                setup.undo()
            assert "dev rtxup" in in_ns(ns["tm"], "ip", "route", "get", "198.51.100.10", "from", "192.0.2.71")
            assert str(FROM_RULE_PRIORITY) not in in_ns(ns["tm"], "ip", "rule")
        finally:
            device.close()


def fake_proc_sys(root, *, all_rp_filter: str, tun: str = "rtxd0", forwarding: tuple[str, str] = ("1", "1")):
    """A /proc/sys look-alike: what `NetSetup` reads and writes, in a temporary directory."""
    files = {
        "net/ipv4/conf/all/rp_filter": all_rp_filter,
        f"net/ipv4/conf/{tun}/rp_filter": "1",
        "net/ipv4/ip_forward": forwarding[0],
        "net/ipv6/conf/all/forwarding": forwarding[1],
    }
    for name, value in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return root


# {description, conf/all/rp_filter, forwarding v4/v6, expected TUN rp_filter, expected warnings (substrings)}
SYSCTL_CASES = [
    {"description": "all=0: the TUN gets 0", "all": "0", "forwarding": ("1", "1"), "tun": "0", "warnings": []},
    {"description": "all=1 (strict): 0 would not help, the TUN gets loose 2", "all": "1", "forwarding": ("1", "1"),
     "tun": "2", "warnings": []},
    {"description": "forwarding off for a captured version is warned about", "all": "0", "forwarding": ("0", "1"),
     "tun": "0", "warnings": ["ipv4/ip_forward is 0"]},
    {"description": "IPv6 forwarding off while IPv6 is captured", "all": "0", "forwarding": ("1", "0"),
     "tun": "0", "warnings": ["ipv6/conf/all/forwarding is 0"]},
]


@pytest.mark.parametrize("case", SYSCTL_CASES, ids=[case["description"] for case in SYSCTL_CASES])
def test_sysctls_are_set_and_restored(case: dict, tmp_path) -> None:
    root = fake_proc_sys(tmp_path, all_rp_filter=case["all"], forwarding=case["forwarding"])
    setup = NetSetup(distributor_plan(REFERENCE_TUN), sysctl_root=root)
    setup._set_sysctls()
    assert (root / "net/ipv4/conf/rtxd0/rp_filter").read_text().strip() == case["tun"]
    assert len(setup.warnings) == len(case["warnings"])
    for expected, warning in zip(case["warnings"], setup.warnings):
        assert expected in warning
    # Forwarding is host policy: warned about, never changed.
    assert (root / "net/ipv4/ip_forward").read_text().strip() == case["forwarding"][0]
    setup._restore_sysctls()
    assert (root / "net/ipv4/conf/rtxd0/rp_filter").read_text().strip() == "1"


def test_read_only_sysctl_is_a_warning_not_a_failure(tmp_path) -> None:
    root = fake_proc_sys(tmp_path, all_rp_filter="0")
    target = root / "net/ipv4/conf/rtxd0/rp_filter"
    target.unlink()
    target.mkdir()  # writing it fails like a read-only /proc/sys does (an OSError)
    setup = NetSetup(distributor_plan(REFERENCE_TUN), sysctl_root=root)
    setup._set_sysctls()
    assert any("cannot set" in warning and "sysctls" in warning for warning in setup.warnings)
