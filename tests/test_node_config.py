"""overlay/config.py for a TM node: the common tables and [[distributor]], refusals naming field and line.

(The distributor's tables are tests/distributor/test_config.py; the [tm] table tests/tm/test_config.py.)
"""

from __future__ import annotations

import pytest

from overlay.config import parse_node_config
from overlay.configlib import ConfigError
from tests.runtime.agents import TM_TOML

MARK = "# <-"


def edited(old: str, new: str) -> str:
    assert TM_TOML.count(old) == 1, old
    return TM_TOML.replace(old, new)


# description, config text (the line to blame marked), field, message fragment
REJECTIONS = [
    ("a typo'd [tm] table", edited("[tm]\n", "[tmm] " + MARK + "\n").replace("[[tm.service]]", "[[tmm.service]]"),
     "tmm", "unknown table [tmm] (did you mean [tm]?)"),
    ("a distributor's table in a TM config", TM_TOML + "[sets] " + MARK + '\nvirtual = ["203.0.113.80/32"]\n',
     "sets", "unknown table [sets]"),
    ("an IPv6 distributor underlay behind an IPv4 TM underlay",
     edited('underlay = "192.0.2.2"', 'underlay = "[2001:db8::2]:4754" ' + MARK), "distributor[0].underlay",
     "2001:db8::2 is IPv6, but underlay.address 192.0.2.3 is IPv4"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [pytest.param(*c[1:], id=c[0]) for c in REJECTIONS])
def test_rejection_names_field_and_line(text: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node_config(text, "tm.toml")
    line = next(number for number, raw in enumerate(text.splitlines(), 1) if MARK in raw)
    assert (caught.value.field, caught.value.line) == (field, line), str(caught.value)
    assert fragment in caught.value.message


def test_the_base_config_is_valid() -> None:
    assert parse_node_config(TM_TOML, "tm.toml").tm is not None
