"""Fixtures: the reference lab's tm1 config (read from config/tm1.toml) and a TM core built from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from overlay.configlib import load_toml
from overlay.tm.config import ServerConfig, ServiceConfig, TMConfig, parse_tm_section
from overlay.tm.core import TrafficManager

from .packets import A

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def lab_config(number: int = 1) -> TMConfig:
    return parse_tm_section(load_toml(CONFIG_DIR / f"tm{number}.toml").section("tm"))


def lab_config_with_dns(number: int = 1) -> TMConfig:
    """The lab config plus a UDP service (DNS on the virtual addresses) for UDP load-balancing cases."""
    config = lab_config(number)
    dns = (
        ServiceConfig("dns", A("203.0.113.80"), 53, "udp",
                      (ServerConfig(A("203.0.113.10"), 53), ServerConfig(A("203.0.113.11"), 5353))),
        ServiceConfig("dns6", A("2001:db8:80::80"), 53, "udp",
                      (ServerConfig(A("2001:db8:2::10"), 53), ServerConfig(A("2001:db8:2::11"), 53))),
    )
    return dataclasses.replace(config, services=config.services + dns)


@pytest.fixture
def tm() -> TrafficManager:
    return TrafficManager(lab_config_with_dns())
