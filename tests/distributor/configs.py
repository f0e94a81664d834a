"""Distributor config texts for the tests, and a helper that turns one into a core.

`CELLS` gives every role combination of FIG. 9 an address of its own (docs/reference-lab.md ranges):

| address            | roles                                                     |
|--------------------|-----------------------------------------------------------|
| 198.51.100.10, .20 | unknown (client, remote server)                           |
| 203.0.113.10/31    | node                                                      |
| 203.0.113.17       | nat-able                                                  |
| 203.0.113.20/31    | node + nat-able                                           |
| 203.0.113.80       | virtual                                                   |
| 203.0.113.90       | virtual on tcp/80, xlate on tcp/1024-65535 (owned by tm2) |
| 203.0.113.92       | virtual + xlate, owned by tm3                             |
| 203.0.113.93       | virtual + xlate, no owner                                 |
| 203.0.113.101..103 | xlate of tm1..tm3; .104 xlate without owner               |
| 203.0.113.201..203 | management of tm1..tm3                                    |
"""

from __future__ import annotations

from pathlib import Path

from overlay.config import parse_node_config
from overlay.distributor.core import Distributor

REFERENCE = Path(__file__).resolve().parents[2] / "config" / "distributor.toml"

CELLS = """\
[node]
role = "distributor"
name = "dist-test"

[underlay]
address = "192.0.2.2"
mtu = 1500

[tun]
capture = ["203.0.113.64/27", "203.0.113.96/27", "203.0.113.192/27"]
capture_from = ["203.0.113.0/26"]

[hash]
seed = "test-seed-0123456789abcdef"

[sets]
virtual = ["203.0.113.80/32", { prefix = "203.0.113.90/32", protocol = "tcp", ports = 80 }, "203.0.113.92/31", "2001:db8:80::80/128"]
node = ["203.0.113.10/31", "203.0.113.20/31", "2001:db8:2::10/127"]
nat_able = ["203.0.113.16/29", "2001:db8:2::/64"]
nat_xlate = ["203.0.113.96/27", { prefix = "203.0.113.90/32", protocol = "tcp", ports = "1024-65535" }, "203.0.113.92/31", "2001:db8:ee::/64"]

[[tm]]
name = "tm1"
underlay = "192.0.2.71:4754"
management = ["203.0.113.201"]
xlate = ["203.0.113.101/32", "2001:db8:ee::101/128"]

[[tm]]
name = "tm2"
underlay = "192.0.2.72:4754"
management = ["203.0.113.202"]
xlate = ["203.0.113.102/32", { prefix = "203.0.113.90/32", protocol = "tcp", ports = "1024-65535" }]

[[tm]]
name = "tm3"
underlay = "192.0.2.73:4754"
management = ["203.0.113.203"]
xlate = ["203.0.113.103/32", "203.0.113.92/32"]
"""


def distributor(text: str = CELLS) -> Distributor:
    config = parse_node_config(text, "test.toml")
    assert config.distributor is not None
    return Distributor(config.distributor)


def with_tables(text: str, tables: str) -> str:
    """`text` with extra TOML tables appended (overrides, health, edges)."""
    return text + "\n" + tables


def reference_text() -> str:
    return REFERENCE.read_text()
