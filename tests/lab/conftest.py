"""Fixtures for the lab suite: one lab per module, unique namespace prefixes, and a leak check.

Every module's lab gets its own prefix (`$OVERLAY_LAB_PREFIX` or `ovt-`, plus this run's PID and the
module), so parallel runs and other engineers' namespace tests never collide. The leak check snapshots
what the lab could leave in the host namespace (links with its interface names, routes and rules using
them or the agents' table) before the lab comes up and asserts, after it is down, that nothing was added,
that no namespace with the prefix is left and that every process the lab started is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.config import load_node_config
from overlay.lab import netns
from overlay.lab.lab import Lab, unavailable_reason
from overlay.runtime.netsetup import DEFAULT_TABLE

LAB_UNAVAILABLE = unavailable_reason()
needs_lab = pytest.mark.skipif(LAB_UNAVAILABLE is not None, reason=f"lab cannot run: {LAB_UNAVAILABLE}")


def lab_interface_names(lab: Lab) -> set[str]:
    """Interfaces the lab creates: its veths and bridges, and the TUNs its agents' configs name."""
    names = lab.plan.interface_names()
    for config in (lab.configs.distributor, *lab.configs.tms.values()):
        if config.exists():
            names.add(load_node_config(config).tun.name)
    return names


def host_lab_traces(names: set[str]) -> dict[str, list]:
    """What the lab could leak into the host namespace: links with the lab's interface names, and routes
    and policy rules using them or the agents' routing table. Only these are compared, because other
    engineers' labs (docker, compose) legitimately change the rest of the host namespace meanwhile."""

    def show(*argv: str) -> list[dict]:
        return json.loads(subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=True).stdout or "[]")

    table = str(DEFAULT_TABLE)
    return {
        "links": sorted(link["ifname"] for link in show("link", "show") if link["ifname"] in names),
        "routes": [
            route for family in ("-4", "-6") for route in show(family, "route", "show", "table", "all")
            if route.get("dev") in names or str(route.get("table")) == table
        ],
        "rules": [
            rule for family in ("-4", "-6") for rule in show(family, "rule", "show")
            if rule.get("iif") in names or str(rule.get("table")) == table
        ],
    }


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_no_leftovers(lab: Lab, before: dict[str, list]) -> None:
    assert netns.list_namespaces(lab.prefix) == [], "namespaces left behind"
    alive = [p for p in lab.processes.started if pid_alive(p.pid)]
    assert alive == [], f"processes left behind: {alive}"
    assert lab.processes.recorded() == {}, "PID records left behind"
    after = host_lab_traces(lab_interface_names(lab))
    for key in before:
        assert after[key] == before[key], f"host namespace: lab {key} left behind"


@pytest.fixture(scope="module")
def make_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Lab]]:
    """Factory for this module's lab (prefix unique to the run and module); torn down and leak-checked at the end."""
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    base = os.environ.get("OVERLAY_LAB_PREFIX", "ovt-")
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:6]
    prefix = f"{base}{os.getpid() % 100000}{module}-"
    before = host_lab_traces(lab_interface_names(Lab(prefix)))
    labs: list[Lab] = []

    def make(**kwargs: object) -> Lab:
        lab = Lab(prefix, state_dir=tmp_path_factory.mktemp(f"lab-{module}"), **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()
    for lab in labs:
        assert_no_leftovers(lab, before)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def show_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[Callable[[Lab], None]]:
    """Register a lab whose agents' log tails are printed (into the failure report) if the test fails."""
    labs: list[Lab] = []
    yield labs.append
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for lab in labs:
            print(lab.agent_logs())
