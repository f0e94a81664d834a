"""Which config changes a SIGHUP may apply live, and which only a restart can (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.config import parse_node_config
from overlay.runtime.agent import restart_only_changes
from tests.runtime.agents import DISTRIBUTOR_TOML

BASE = DISTRIBUTOR_TOML.format(admin="", interval=0.2, http="false")

# {description, edit of the config text, fields that make the reload refuse}
EDITS = [
    {"description": "health tuning applies live", "old": "rise = 1", "new": "rise = 3", "blocked": []},
    {"description": "a TM's weight applies live", "old": 'name = "tm1"', "new": 'name = "tm1"\nweight = 3',
     "blocked": []},
    {"description": "another TUN needs a restart", "old": 'name = "rtxovl0"', "new": 'name = "rtxovl9"',
     "blocked": ["tun"]},
    {"description": "new capture prefixes need a restart (routes)", "old": '"2001:db8:ee::/64"]',
     "new": '"2001:db8:ee::/64", "198.51.100.128/25"]', "blocked": ["tun"]},
    {"description": "another underlay address needs a restart (sockets)", "old": 'address = "192.0.2.2"',
     "new": 'address = "192.0.2.5"', "blocked": ["underlay"]},
    {"description": "another status listener needs a restart", "old": '"127.0.0.1:8080"', "new": '"127.0.0.1:8081"',
     "blocked": ["status"]},
    {"description": "another node name needs a restart", "old": 'name = "rtx-dist"', "new": 'name = "rtx-dist2"',
     "blocked": ["name"]},
]


@pytest.mark.parametrize("case", EDITS, ids=[case["description"] for case in EDITS])
def test_restart_only_changes(case: dict) -> None:
    assert case["old"] in BASE
    old = parse_node_config(BASE, "d.toml", base=Path("."))
    new = parse_node_config(BASE.replace(case["old"], case["new"], 1), "d.toml", base=Path("."))
    assert restart_only_changes(old, new) == case["blocked"]


# {description, what replaces the config file, text the reload error must carry}
UNLOADABLE = [
    {"description": "bytes that are not UTF-8", "content": b"\xff\xfe[\x00n\x00", "expected": "d.toml:1: not UTF-8 text"},
    {"description": "an ELF binary", "content": b"\x7fELF\x02\x01\x01\x00" + bytes(8), "expected": "d.toml:1: a NUL byte"},
    {"description": "arrays nested 10,000 deep", "content": b"a = " + b"[" * 10000 + b"]" * 10000,
     "expected": "d.toml:1: nested deeper than"},
]


@pytest.mark.parametrize("case", UNLOADABLE, ids=[case["description"] for case in UNLOADABLE])
def test_a_reload_of_a_file_that_is_no_toml_text_keeps_the_running_config(case: dict, tmp_path: Path) -> None:
    from overlay.runtime.distributor_agent import DistributorAgent

    path = tmp_path / "d.toml"
    path.write_text(BASE)
    agent = DistributorAgent(parse_node_config(BASE, str(path), base=tmp_path))
    running = agent.config
    path.write_bytes(case["content"])
    result = agent.reload()
    assert result["ok"] is False and result["error"].startswith(f"{tmp_path}/{case['expected']}"), result["error"][:300]
    assert agent.config is running and agent.reloads["failed"] == 1
