"""Namespace helpers for the runtime's lab tests: unique `rtx-` namespaces, always removed in `finally`.

Tests may shell out to ip(8) to build and inspect a lab (the runtime itself must not): what ip(8) prints is
an independent view of what the agent did through netlink.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

PREFIX = "rtx-"


def lab_available() -> str | None:
    """None when lab tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs ip(8) from iproute2"
    return None


def require_lab() -> None:
    reason = lab_available()
    if reason:
        pytest.skip(reason)


def sh(*argv: str, check: bool = True, timeout: float = 10) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 10) -> str:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, str]]:
    """Create one fresh namespace per role (lo up), yield {role: name}, delete them all afterwards."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"{PREFIX}{tag}-{role}"[:32] for role in roles}
    created: list[str] = []
    try:
        for name in names.values():
            sh("ip", "netns", "add", name)
            created.append(name)
            in_ns(name, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for name in created:
            # Killing what still runs inside first lets `netns del` free the namespace at once.
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the enclosed code with this thread in namespace `ns` (sockets, TUNs, netlink, /proc/sys/net)."""
    from pyroute2 import netns

    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def veth(a_ns: str, a_name: str, a_addr: str, b_ns: str, b_name: str, b_addr: str) -> None:
    """A veth pair between two namespaces with one address (CIDR) on each end, both up."""
    sh("ip", "link", "add", a_name, "netns", a_ns, "type", "veth", "peer", "name", b_name, "netns", b_ns)
    for ns, name, addr in ((a_ns, a_name, a_addr), (b_ns, b_name, b_addr)):
        family = "-6" if ":" in addr else "-4"
        extra = ("nodad",) if family == "-6" else ()
        in_ns(ns, "ip", family, "addr", "add", addr, "dev", name, *extra)
        in_ns(ns, "ip", "link", "set", name, "up")


def net_state(ns: str) -> dict[str, list]:
    """Links, addresses, routes (all tables) and rules of a namespace, as ip(8) reports them in JSON."""
    state: dict[str, list] = {}
    for key, argv in {
        "links": ("ip", "-j", "link", "show"),
        "rules4": ("ip", "-j", "-4", "rule", "show"),
        "rules6": ("ip", "-j", "-6", "rule", "show"),
        "routes4": ("ip", "-j", "-4", "route", "show", "table", "all"),
        "routes6": ("ip", "-j", "-6", "route", "show", "table", "all"),
    }.items():
        state[key] = json.loads(in_ns(ns, *argv) or "[]")
    # IPv6 link-local and multicast routes appear by themselves some time after a link comes up (the kernel's
    # autoconfiguration): they say nothing about what a setup added, and would make comparisons racy.
    state["routes6"] = [route for route in state["routes6"]
                        if not route["dst"].startswith(("fe80:", "ff00::/8"))]
    for link in state["links"]:
        # Counters and timers change by themselves; only what a setup could add or remove matters.
        for volatile in ("stats64", "stats", "operstate", "flags", "linkmode"):
            link.pop(volatile, None)
    return state
