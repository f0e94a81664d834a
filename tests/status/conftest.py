"""A fake distributor (status provider + admin controller) shaped like docs/operations.md describes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ADMIN_TOKEN = "s3cret-token-for-tests-only"

# Packets each TM receives per status() call: shares of 50 %, 30 %, 20 %.
TRAFFIC_STEP = {"tm1": 500, "tm2": 300, "tm3": 200}


class FakeDistributor:
    """Every status() call advances the per-TM counters, so the sampler sees steady traffic."""

    role = "distributor"
    name = "dist1"

    def __init__(self) -> None:
        self.calls = 0
        self.states = {"tm1": "enabled", "tm2": "draining", "tm3": "enabled"}
        self.up = {"tm1": True, "tm2": True, "tm3": False}
        self.ready = True
        self.generation = 1
        self.reload_error: str | None = None

    def status(self) -> dict[str, Any]:
        self.calls += 1
        return {
            "role": self.role,
            "name": self.name,
            "version": "0.1.0",
            "uptime_s": 3723.5,
            "config": {"generation": self.generation, "hash": "sha256:9f2c4e1d0b7a", "source": "config/dist1.toml", "last_reload_error": self.reload_error},
            "tms": {
                tm: {
                    "underlay": f"192.0.2.{70 + int(tm[-1])}:4754",
                    "weight": 1,
                    "table_share": {"tm1": 0.5, "tm2": 0.5, "tm3": 0.0}[tm],
                    "packets": step * self.calls,
                    "admin": self.states[tm],
                    "up": self.up[tm],
                    "serving": self.up[tm] and self.states[tm] == "enabled",
                    "reachable": self.up[tm],
                }
                for tm, step in TRAFFIC_STEP.items()
            },
            "health": {
                "config": {"interval": 1.0, "timeout": 1.0, "rise": 2, "fall": 3, "http": False, "all_down": "drop"},
                "all_down": not any(self.up.values()),
                "serving": [tm for tm, up in self.up.items() if up],
                "tms": {
                    tm: {"up": self.up[tm], "probes_sent": 100, "replies": 97 if self.up[tm] else 60, "timeouts": 3 if self.up[tm] else 40, "http_failures": 0, "transitions": 0 if self.up[tm] else 1, "rtt_seconds": 0.0012 if self.up[tm] else None}
                    for tm in TRAFFIC_STEP
                },
                "rejected": {"foreign_sender": 2},
            },
            "cells": {"unknown>virtual": 1200 * self.calls, "node>unknown": 900 * self.calls, "unknown>unknown": 4},
            "reasons": {"hash-src": 1200 * self.calls, "hash-dst": 900 * self.calls, "route": 4, "malformed:gre": 3},
            "drops": {"truncated": 3, "no_tm_up": 0, "ttl_exceeded": self.calls},
            # Per-entity duplicates ("tm.*", "cell.*") as the real core reports them: never exposed flat.
            "counters": {"rx.packets": 1000 * self.calls, "tx.packets": 990 * self.calls, "tun.rx_errors": 0, "tm.tm1": 500 * self.calls, "cell.unknown>virtual": 1200 * self.calls},
            "gauges": {"udp.sockets": 2},
        }

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"tms_up": sum(self.up.values()), "reason": None if self.ready else "no TM up"}

    # AdminController
    def set_tm_state(self, name: str, state: str) -> dict[str, Any]:
        if name not in self.states:
            raise KeyError(name)
        previous, self.states[name] = self.states[name], state
        return {"previous": previous}

    def reload(self) -> dict[str, Any]:
        if self.reload_error:
            return {"ok": False, "error": self.reload_error, "generation": self.generation}
        self.generation += 1
        return {"ok": True, "error": None, "generation": self.generation}


class FakeTm:
    role = "tm"
    name = "tm1"

    def __init__(self) -> None:
        self.calls = 0

    def status(self) -> dict[str, Any]:
        self.calls += 1
        return {
            "role": self.role,
            "name": self.name,
            "version": "0.1.0",
            "uptime_s": 12.0,
            "config": {"generation": 1, "hash": "sha256:aa"},
            "peers": {"dist1": {"packets": 10 * self.calls}},
            "mode": "nat",
            "connections": {"total": 42, "by_state": {"established": 40, "syn_sent": 2}},
            "table": {"size": 42, "limit": 65536, "fullness": 0.0006},
            "ports": {"range": [1024, 65535], "by_address": {"203.0.113.101": {"tcp": {"in_use": 3, "capacity": 64512, "exhausted": 1}}}},
            "services": [
                {
                    "name": "web", "virtual": "203.0.113.80", "port": 80, "protocol": "tcp", "policy": "least-connections",
                    "servers": [
                        {"address": "203.0.113.10", "port": 80, "weight": 1, "connections": 21},
                        {"address": "203.0.113.11", "port": 80, "weight": 1, "connections": 19},
                    ],
                }
            ],
            "drops": {"no_state": 7},
            "counters": {"conntrack.created": 50, "conntrack.expired": 8},
        }

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        return True, {}


@pytest.fixture
def distributor() -> FakeDistributor:
    return FakeDistributor()


@pytest.fixture
def tm() -> FakeTm:
    return FakeTm()


def lab_config_with_admin_token(root: Path, token: str) -> Path:
    """A copy of the reference configs under `root/config` whose distributor reads its admin token from
    `root/admin.token` (0600) — what an operator sets up before using the admin API."""
    repo = Path(__file__).resolve().parents[2]
    config_dir = root / "config"
    shutil.copytree(repo / "config", config_dir)
    token_file = root / "admin.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    distributor_config = config_dir / "distributor.toml"
    text = distributor_config.read_text()
    assert "[status]\n" in text
    distributor_config.write_text(text.replace("[status]\n", f'[status]\nadmin_token_file = "{token_file}"\n', 1))
    return config_dir


def lab_prefix(tag: str) -> str:
    """A namespace prefix unique to this run and module ($OVERLAY_LAB_PREFIX or `ovt-`, the PID, a tag)."""
    return f"{os.environ.get('OVERLAY_LAB_PREFIX', 'ovt-')}{os.getpid() % 100000}{tag}-"


@contextmanager
def lab_running(lab: Any, **up: Any) -> Iterator[Any]:
    """`lab.up(**up)`, the lab while the block runs, then down — also on failure, with the agents' logs
    printed — and nothing left: no namespace with its prefix."""
    from overlay.lab import netns

    try:
        lab.up(**up)
        yield lab
    except BaseException:
        print(lab.agent_logs())
        raise
    finally:
        lab.down()
        assert netns.list_namespaces(lab.prefix) == [], "namespaces left behind"
