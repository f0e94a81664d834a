"""The [tm] table: the lab configs load; bad values are refused naming the field and its line."""

from __future__ import annotations

import pytest

from overlay.configlib import ConfigError, parse_toml
from overlay.tm.config import DEFAULT_TIMEOUTS, parse_tm_section

from .conftest import lab_config
from .packets import A


@pytest.mark.parametrize("number", [1, 2, 3])
def test_reference_lab_configs_load(number: int) -> None:
    config = lab_config(number)
    assert config.mode == "nat"
    assert config.management == (A(f"203.0.113.20{number}"),)
    assert config.xlate == (A(f"203.0.113.10{number}"), A(f"2001:db8:ee::10{number}"))
    assert [(str(s.virtual), s.port, [str(x.address) for x in s.servers]) for s in config.services] == [
        ("203.0.113.80", 80, ["203.0.113.10", "203.0.113.11"]),
        ("2001:db8:80::80", 80, ["2001:db8:2::10", "2001:db8:2::11"]),
    ]


def test_defaults_and_server_forms() -> None:
    config = parse_tm_section(parse_toml("""
[tm]
[[tm.service]]
name = "dns"
virtual = "203.0.113.80"
port = 53
protocol = "udp"
policy = "source-hash"
servers = ["203.0.113.10", { endpoint = "203.0.113.11:5353", weight = 3 }]
""").section("tm"))
    assert config.port_range == (1024, 65535)
    assert config.conntrack.max_entries == 65536 and config.conntrack.timeouts == DEFAULT_TIMEOUTS
    servers = config.services[0].servers
    assert [(str(s.address), s.port, s.weight) for s in servers] == [("203.0.113.10", 53, 1), ("203.0.113.11", 5353, 3)]


BAD = [
    ("unknown key", '[tm]\nmode = "nat"\nxlat = ["203.0.113.101"]\n', "tm.xlat", 3),
    ("unknown mode", '[tm]\nmode = "router"\n', "tm.mode", 2),
    ("bad address", '[tm]\nmanagement = ["203.0.113.300"]\n', "tm.management[0]", 2),
    ("port range backwards", '[tm]\nport_range = "2000-1000"\n', "tm.port_range", 2),
    ("two IPv4 xlate addresses", '[tm]\nxlate = ["203.0.113.101", "203.0.113.102"]\n', "tm.xlate", 2),
    ("unknown timeout", '[tm]\n[tm.conntrack.timeouts]\ntcp_establised = 10\n',
     "tm.conntrack.timeouts.tcp_establised", 3),
    ("nan timeout", '[tm]\n[tm.conntrack.timeouts]\ntcp_close = 5\nudp_replied = nan\n', "tm.conntrack.timeouts.udp_replied", 4),
    ("infinite timeout", '[tm]\n[tm.conntrack.timeouts]\nicmp = inf\n', "tm.conntrack.timeouts.icmp", 3),
    ("zero max entries", '[tm]\n[tm.conntrack]\nmax_entries = 0\n', "tm.conntrack.max_entries", 3),
    ("service without servers",
     '[tm]\n[[tm.service]]\nname = "web"\nvirtual = "203.0.113.80"\nport = 80\nservers = []\n',
     "tm.service[0].servers", 6),
    ("IPv6 server behind an IPv4 VIP",
     '[tm]\n[[tm.service]]\nname = "web"\nvirtual = "203.0.113.80"\nport = 80\nservers = ["[2001:db8:2::10]:80"]\n',
     "tm.service[0].servers[0]", 6),
    ("VIP that is the management address",
     '[tm]\nmanagement = ["203.0.113.80"]\n[[tm.service]]\nname = "web"\nvirtual = "203.0.113.80"\nport = 80\n'
     'servers = ["203.0.113.10"]\n', "tm.service[0].virtual", 5),
    ("same service twice",
     '[tm]\n[[tm.service]]\nname = "a"\nvirtual = "203.0.113.80"\nport = 80\nservers = ["203.0.113.10"]\n'
     '[[tm.service]]\nname = "b"\nvirtual = "203.0.113.80"\nport = 80\nservers = ["203.0.113.10"]\n',
     "tm.service[1].port", 10),
    ("negative weight",
     '[tm]\n[[tm.service]]\nname = "web"\nvirtual = "203.0.113.80"\nport = 80\n'
     'servers = [{ endpoint = "203.0.113.10:80", weight = -1 }]\n', "tm.service[0].servers[0]", 6),
    ("rules in NAT mode", '[tm]\n[[tm.firewall.rule]]\nprotocol = "tcp"\n', "tm.firewall.rule[0]", 2),
    ("NAT addresses in firewall mode", '[tm]\nmode = "firewall"\nxlate = ["203.0.113.101"]\n', "tm.xlate", 3),
    ("ports on an ICMP rule", '[tm]\nmode = "firewall"\n[[tm.firewall.rule]]\nprotocol = "icmp"\nports = [80]\n',
     "tm.firewall.rule[0].ports", 5),
]


@pytest.mark.parametrize("description, text, field, line", BAD, ids=[case[0] for case in BAD])
def test_bad_config_names_field_and_line(description: str, text: str, field: str, line: int) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_tm_section(parse_toml(text, "tm.toml").section("tm"))
    assert (raised.value.field, raised.value.line) == (field, line), str(raised.value)


def test_every_state_has_a_default_timeout() -> None:
    from overlay.tm.states import STATE_NAMES
    assert tuple(DEFAULT_TIMEOUTS) == STATE_NAMES
