"""`overlay ecmp`: a router's resilient nexthop groups follow the distributors' etcd registrations
(issue 11). The plan is checked as data; then, with root, the real controller against a real etcd and a
real resilient group in a namespace of our own: a registration whose lease ends leaves the group, a new
one joins it, the last one never empties it, and an etcd outage changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from overlay import ecmp_cli
from overlay.configlib import ConfigError
from overlay.ecmp import Group, Member, load_ecmp_config, plan, setup
from overlay.etcd import EtcdClient
from tests.etcdserver import EtcdServer, etcd_server_fixture  # noqa: F401 (the etcd_server fixture)

GROUP = Group(100, (Member("dist1", "198.51.100.2", "r1"), Member("dist2", "198.51.100.3", "r2")), 64, "ns")


def test_the_group_holds_exactly_the_live_members() -> None:
    assert plan(GROUP, {"dist2"}) == [["ip", "-n", "ns", "nexthop", "replace", "id", "100", "group", "102",
                                       "type", "resilient", "buckets", "64", "idle_timer", "0"]]
    assert plan(GROUP, {"dist1", "dist2", "stranger"})[0][8] == "101/102"
    assert plan(GROUP, set()) == [], "never emptied: the kernel refuses it, and the last members beat none"
    assert [command[6:10] for command in setup(GROUP)[:2]] == [["101", "via", "198.51.100.2", "dev"], ["102", "via", "198.51.100.3", "dev"]]


def test_groups_in_two_namespaces_may_share_ids_and_each_follows_the_registrations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One controller for two routers (a lab's router-out and router-in) with the same id scheme in each:
    nexthop ids are per namespace, so the config is accepted, and each group is kept on its own."""
    path = tmp_path / "router.toml"
    path.write_text(config_text("http://127.0.0.1:2379", "ns", '[[group]]\nid = 100\nnamespace = "other"\n'
                                'members = { dist1 = { via = "198.51.100.2", dev = "r0" }, '
                                'dist2 = { via = "198.51.100.3", dev = "r0" } }\n'))
    config = load_ecmp_config(str(path))
    assert [(g.namespace, g.id) for g in config.groups] == [("ns", 100), ("other", 100)]
    executed: list[list[str]] = []
    monkeypatch.setattr(ecmp_cli, "_execute", lambda command: executed.append(command) or True)
    controller = ecmp_cli.Controller(config)
    controller.applied = {("ns", 100): frozenset({"dist1", "dist2"}), ("other", 100): frozenset({"dist1", "dist2"})}
    controller.apply({"dist1"})
    assert [(c[2], c[8]) for c in executed] == [("ns", "101"), ("other", "101")], "both routers lose dist2"
    executed.clear()
    controller.apply({"dist1"})
    assert executed == [], "nothing changed: no command"


def config_text(url: str, namespace: str, extra: str = "") -> str:
    return f"""
[fleet]
endpoints = ["{url}"]
prefix = "/overlay/ecmp-test"

[[group]]
id = 100
namespace = "{namespace}"
buckets = 32
members = {{ dist1 = {{ via = "198.51.100.2", dev = "r0" }}, dist2 = {{ via = "198.51.100.3", dev = "r0" }} }}
{extra}"""


@pytest.mark.parametrize(("extra", "field"), [
    ('[[group]]\nid = 101\nnamespace = "ns"\nmembers = { d = { via = "198.51.100.9", dev = "x" } }\n', "group[1].id"),
    ('[[group]]\nid = 200\nmembers = { d = { via = "not-an-address", dev = "x" } }\n', "group[1].members.d.via"),
    ('[[group]]\nid = 200\nmembers = { a = { via = "198.51.100.9", dev = "x" }, b = { via = "2001:db8::9", dev = "x" } }\n',
     "group[1].members"),
])
def test_a_bad_controller_config_names_the_field(tmp_path: Path, extra: str, field: str) -> None:
    path = tmp_path / "router.toml"
    path.write_text(config_text("http://127.0.0.1:2379", "ns", extra))
    with pytest.raises(ConfigError) as error:
        load_ecmp_config(str(path))
    assert error.value.field == field and error.value.line is not None


def group_members(namespace: str) -> str:
    result = subprocess.run(["ip", "-n", namespace, "nexthop", "show", "id", "100"], capture_output=True, text=True)
    return result.stdout.split("group ", 1)[1].split()[0] if "group " in result.stdout else ""


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.lab
def test_the_controller_follows_the_registrations(etcd_server: EtcdServer, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace and its nexthops")
    namespace = f"ovl-ecmp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    controller = None
    try:
        for command in (["link", "add", "r0", "type", "veth", "peer", "name", "r1"], ["link", "set", "r0", "up"],
                        ["link", "set", "r1", "up"],
                        ["address", "add", "198.51.100.1/24", "dev", "r0"],
                        ["route", "add", "203.0.113.80/32", "via", "198.51.100.2"]):
            subprocess.run(["ip", "-n", namespace, *command], check=True)
        path = tmp_path / "router.toml"
        path.write_text(config_text(etcd_server.url, namespace))

        async def register(name: str, ttl: int) -> int:
            async with EtcdClient([etcd_server.url]) as etcd:
                lease = await etcd.lease_grant(ttl)
                await etcd.put(f"/overlay/ecmp-test/distributors/{name}", "{}", lease)
                return lease

        async def revoke(lease: int) -> None:
            async with EtcdClient([etcd_server.url]) as etcd:
                await etcd.lease_revoke(lease)

        lease1 = asyncio.run(register("dist1", 30))
        controller = subprocess.Popen([sys.executable, "-m", "overlay", "ecmp", "--config", str(path)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: group_members(namespace) == "101"), "only the registered distributor"
        lease2 = asyncio.run(register("dist2", 1))
        assert wait_for(lambda: group_members(namespace) == "101/102"), "a new registration joins"
        assert wait_for(lambda: group_members(namespace) == "101"), "its lease of 1 s ran out: it left"
        asyncio.run(revoke(lease1))
        time.sleep(0.5)
        assert group_members(namespace) == "101", "the last member never leaves an empty group"
        asyncio.run(register("dist2", 30))
        assert wait_for(lambda: group_members(namespace) == "102")
        etcd_server.kill()
        time.sleep(1.5)
        assert group_members(namespace) == "102" and controller.poll() is None, "an outage changes nothing"
        del lease2
    finally:
        if controller is not None:
            controller.terminate()
            output = controller.communicate(timeout=10)[0]
            print(output[-2000:])
        subprocess.run(["ip", "netns", "del", namespace], check=False)
