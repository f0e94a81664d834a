"""Edge node configs: what parses, and what is refused naming the field and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.config import parse_node_config
from overlay.configlib import ConfigError
from tests.authconfig import with_auth, with_edge


def edge_text(tmp_path: Path) -> str:
    with_edge(tmp_path, "198.51.100.222:4754")
    return (tmp_path / "edge1.toml").read_text()


def test_the_edge_config_parses(tmp_path: Path) -> None:
    node = parse_node_config(edge_text(tmp_path), "edge1.toml", tmp_path)
    assert node.role == "edge" and node.edge is not None
    assert [str(p) for p in node.edge.prefixes] == ["203.0.113.12/32", "2001:db8:2::12/128"]
    assert node.distributor_names == ("distributor0",) and node.tun.name == "ovl-edge"
    assert node.tun.mtu == 1500 - 20 - 8 - 8


def test_with_auth_the_edge_and_its_distributor_know_each_others_keys(tmp_path: Path) -> None:
    with_edge(tmp_path, "198.51.100.222:4754")
    with_auth(tmp_path, source=tmp_path)
    edge = parse_node_config((tmp_path / "edge1.toml").read_text(), "edge1.toml", tmp_path)
    dist = parse_node_config((tmp_path / "distributor.toml").read_text(), "distributor.toml", tmp_path)
    assert set(edge.auth.peers) == {"dist1"} and "edge1" in dist.auth.peers
    assert edge.tun.mtu == 1500 - 20 - 8 - 8 - 34


@pytest.mark.parametrize(("old", "new", "message"), [
    ('prefixes = ["203.0.113.12/32", "2001:db8:2::12/128"]', "prefixes = []", "edge.prefixes: an edge serves at least one prefix"),
    ('prefixes = ["203.0.113.12/32", "2001:db8:2::12/128"]', 'prefixes = ["198.51.100.0/24"]', "contains the underlay address"),
    ('name = "ovl-edge"\n', 'name = "ovl-edge"\ncapture_from = ["203.0.113.0/24"]\n', "tun.capture_from: an edge sends from its [edge] prefixes"),
    ("[edge]\n", "[egde]\n", "unknown table [egde]"),
    ("\n[[distributor]]\nunderlay = \"192.0.2.2:4754\"\n", "\n", "a edge needs at least one [[distributor]]"),
])
def test_refusals_name_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = edge_text(tmp_path)
    assert old in text
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_node_config(text.replace(old, new), "edge1.toml", tmp_path)
