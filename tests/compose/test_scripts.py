"""The compose lab's container scripts (config/docker/), without Docker: what they compute and refuse.

`node-setup` turns NODE_ADDRESSES into `ip` commands and must reject a bad spec with a message, never a
traceback (a container that dies with a traceback hides why). `healthcheck --fleet` decides when the
client may start.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from overlay.lab import topology

SCRIPTS = Path(__file__).resolve().parents[2] / "config" / "docker"
REPO_CONFIG = SCRIPTS.parent


def load_script(name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


node_setup = load_script("node-setup")
healthcheck = load_script("healthcheck")

CLIENT_INTERFACES = {
    ipaddress.ip_network(topology.OUTSIDE_V4): "eth0",
    ipaddress.ip_network(topology.OUTSIDE_V6): "eth0",
}

ADDRESS_CASES = [
    {
        "description": "negative: reversed range",
        "spec": "198.51.100.199-198.51.100.100/24",
        "expected": "not a range inside 198.51.100.0/24",
    },
    {
        "description": "negative: range leaves its prefix",
        "spec": "198.51.100.250-198.51.101.5/24",
        "expected": "not a range inside 198.51.100.0/24",
    },
    {
        "description": "negative: mixed families",
        "spec": "198.51.100.100-2001:db8:1::1ff/24",
        "expected": "not a range inside",
    },
    {
        "description": "negative: no prefix length",
        "spec": "198.51.100.100-198.51.100.199",
        "expected": "has no prefix length",
    },
    {
        "description": "negative: not an address",
        "spec": "client-addresses/24",
        "expected": "does not appear to be an IPv4 or IPv6 address",
    },
    {
        "description": "negative: no interface of the container is on the prefix",
        "spec": "203.0.113.20-203.0.113.21/26",
        "expected": "no interface of this container is on 203.0.113.0/26",
    },
    {
        "description": "the plan's IPv4 client addresses",
        "spec": "198.51.100.100-198.51.100.199/24",
        "expected": [f"address replace {a}/24 dev eth0" for a in topology.CLIENT_SOURCES_V4],
    },
    {
        "description": "the plan's IPv6 client addresses, usable at once (nodad)",
        "spec": "2001:db8:1::100-2001:db8:1::1ff/64",
        "expected": [f"address replace {a}/64 dev eth0 nodad" for a in topology.CLIENT_SOURCES_V6],
    },
    {
        "description": "a single address",
        "spec": "198.51.100.7/24",
        "expected": ["address replace 198.51.100.7/24 dev eth0"],
    },
]


@pytest.mark.parametrize("case", ADDRESS_CASES, ids=[case["description"] for case in ADDRESS_CASES])
def test_address_ranges(case: dict) -> None:
    if isinstance(case["expected"], str):
        with pytest.raises(ValueError, match=re.escape(case["expected"])):
            node_setup.address_commands(case["spec"], CLIENT_INTERFACES)
    else:
        assert node_setup.address_commands(case["spec"], CLIENT_INTERFACES) == case["expected"]


def run_node_setup(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "node-setup"), *argv],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )


ENTRYPOINT_CASES = [
    {
        "description": "negative: a bad NODE_ADDRESSES stops the container before its command, no traceback",
        "env": {"NODE_ADDRESSES": "198.51.100.9-198.51.100.1/24"},
        "argv": ["echo", "ran"],
        "expected": (2, "node-setup: NODE_ADDRESSES: '198.51.100.9-198.51.100.1/24'"),
    },
    {
        "description": "negative: a command that does not exist",
        "env": {},
        "argv": ["no-such-command-in-the-lab"],
        "expected": (127, "node-setup: cannot run no-such-command-in-the-lab"),
    },
    {
        "description": "negative: no command at all",
        "env": {},
        "argv": [],
        "expected": (2, "node-setup: no command to run"),
    },
    {
        "description": "nothing to set up: the command runs as is",
        "env": {"NODE_ROUTES": "", "NODE_ADDRESSES": ""},
        "argv": ["echo", "ran"],
        "expected": (0, ""),
    },
]


@pytest.mark.parametrize("case", ENTRYPOINT_CASES, ids=[case["description"] for case in ENTRYPOINT_CASES])
def test_entrypoint(case: dict) -> None:
    done = run_node_setup(case["env"], *case["argv"])
    code, message = case["expected"]
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    if code == 0:
        assert done.stdout == "ran\n"


FLEET_CASES = [
    {"description": "negative: 503 body without an up list", "healthz": {"reason": "starting"},
     "expected": {"tm1", "tm2", "tm3"}},
    {"description": "negative: one TM still down", "healthz": {"up": ["tm1", "tm2"]}, "expected": {"tm3"}},
    {"description": "every TM up", "healthz": {"up": ["tm1", "tm2", "tm3"]}, "expected": set()},
    {"description": "a TM the config does not list changes nothing", "healthz": {"up": ["tm1", "tm2", "tm3", "tm9"]},
     "expected": set()},
]


@pytest.mark.parametrize("case", FLEET_CASES, ids=[case["description"] for case in FLEET_CASES])
def test_distributor_ready_only_with_the_whole_fleet(case: dict) -> None:
    fleet = healthcheck.fleet_of(str(REPO_CONFIG / "distributor.toml"))
    assert fleet == set(topology.TMS), "the reference distributor config lists the lab's TMs"
    assert healthcheck.not_up(fleet, case["healthz"]) == case["expected"]
