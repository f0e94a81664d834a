"""Fixtures for the lab suite: one lab per module, unique namespace prefixes, and a leak check.

Every module's lab gets its own prefix (`$OVERLAY_LAB_PREFIX` or `ovt-`, plus this run's PID and the
module), so parallel runs and other engineers' namespace tests never collide. The leak check snapshots the
host namespace's links, addresses, routes and rules before the lab comes up and asserts, after it is
down, that they are unchanged, that no namespace with the prefix is left and that every process the lab
started is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.lab import netns
from overlay.lab.lab import Lab, unavailable_reason

LAB_UNAVAILABLE = unavailable_reason()
needs_lab = pytest.mark.skipif(LAB_UNAVAILABLE is not None, reason=f"lab cannot run: {LAB_UNAVAILABLE}")


def host_network_state() -> dict[str, object]:
    """The host namespace as ip(8) sees it, minus counters that change by themselves."""
    state: dict[str, object] = {}
    for key, argv in {
        "links": ["ip", "-j", "link", "show"],
        "addresses": ["ip", "-j", "address", "show"],
        "routes4": ["ip", "-j", "-4", "route", "show", "table", "all"],
        "routes6": ["ip", "-j", "-6", "route", "show", "table", "all"],
        "rules4": ["ip", "-j", "-4", "rule", "show"],
        "rules6": ["ip", "-j", "-6", "rule", "show"],
    }.items():
        data = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout or "[]")
        for entry in data:
            for volatile in ("stats64", "stats", "operstate", "flags", "linkmode", "expires"):
                entry.pop(volatile, None)
            for info in entry.get("addr_info", []):
                info.pop("valid_life_time", None)
                info.pop("preferred_life_time", None)
        state[key] = data
    return state


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_no_leftovers(lab: Lab, before: dict[str, object]) -> None:
    assert netns.list_namespaces(lab.prefix) == [], "namespaces left behind"
    alive = [p for p in lab.processes.started if pid_alive(p.pid)]
    assert alive == [], f"processes left behind: {alive}"
    assert lab.processes.recorded() == {}, "PID records left behind"
    after = host_network_state()
    for key in before:
        assert after[key] == before[key], f"host namespace {key} changed by the lab"


@pytest.fixture(scope="module")
def make_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Lab]]:
    """Factory for this module's lab (prefix unique to the run and module); torn down and leak-checked at the end."""
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    base = os.environ.get("OVERLAY_LAB_PREFIX", "ovt-")
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:6]
    prefix = f"{base}{os.getpid() % 100000}{module}-"
    before = host_network_state()
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
