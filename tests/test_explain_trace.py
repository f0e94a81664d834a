"""What `overlay explain` prints (issue 12): IPv6 endpoints in brackets, so the port cannot be read as part
of the address, and the owner refinement of a hash-src cell spelled out instead of a bare `reason: owner`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from overlay.cli import main
from overlay.flowspec import build_packet

CONFIG = Path(__file__).resolve().parents[1] / "config" / "distributor.toml"
SPEC6 = "udp [2001:db8:1::100]:5353 > [2001:db8:80::80]:53"


def explain(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> str:
    code = main(["explain", "--config", str(config), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture
def v6_underlay(tmp_path: Path) -> Path:
    """The reference config with the distributor and its TMs on an IPv6 underlay."""
    text = CONFIG.read_text().replace('address = "192.0.2.2"', 'address = "2001:db8:ff::2"')
    text = re.sub(r'underlay = "192\.0\.2\.(7\d):4754"', r'underlay = "[2001:db8:ff::\1]:4754"', text)
    path = tmp_path / "distributor6.toml"
    path.write_text(text)
    return path


def test_ipv6_endpoints_print_in_brackets(capsys: pytest.CaptureFixture[str], v6_underlay: Path) -> None:
    text = explain(capsys, v6_underlay, SPEC6)
    assert "IPv6 UDP [2001:db8:1::100]:5353 > [2001:db8:80::80]:53 (48 bytes)" in text
    assert re.search(r"verdict +tm tm\d via \[2001:db8:ff::7\d\]:4754 ", text), text
    trace = json.loads(explain(capsys, v6_underlay, "--json", SPEC6))
    assert re.fullmatch(r"\[2001:db8:ff::7\d\]:4754", trace["dest"])
    assert "[2001:db8:1::100]:5353 > [2001:db8:80::80]:53" in trace["packet"]


def test_the_printed_packet_is_a_flow_spec_again(capsys: pytest.CaptureFixture[str]) -> None:
    """What explain prints after the protocol is what a flow spec takes: copy, paste, same packet."""
    trace = json.loads(explain(capsys, CONFIG, "--json", SPEC6))
    endpoints = trace["packet"].removeprefix("IPv6 UDP ").rsplit(" (", 1)[0]
    assert build_packet(f"udp {endpoints}") == build_packet(SPEC6)


def test_a_peer_over_an_ipv6_underlay_prints_in_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    trace = json.loads(explain(capsys, CONFIG, "--json", "--from-peer", "[2001:db8:ff::9]:4754", SPEC6))
    assert trace["from_peer"] == "[2001:db8:ff::9]:4754"


def test_ipv4_endpoints_stay_as_they_were(capsys: pytest.CaptureFixture[str]) -> None:
    trace = json.loads(explain(capsys, CONFIG, "--json", "tcp 198.51.100.123:40000 > 203.0.113.80:80"))
    assert trace["packet"] == "IPv4 TCP 198.51.100.123:40000 > 203.0.113.80:80 (40 bytes)"
    assert re.fullmatch(r"192\.0\.2\.7\d:4754", trace["dest"])


OWNED = "tcp 198.51.100.20:80 > 203.0.113.103:20000 flags SA"  # a reply to tm3's source-NATed connection
UNOWNED = "tcp 198.51.100.20:80 > 203.0.113.99:20000"  # inside the xlate prefix, but no TM owns it


def test_the_owner_refinement_is_in_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    trace = json.loads(explain(capsys, CONFIG, "--json", OWNED))
    assert (trace["cell_action"], trace["reason"], trace["tm"]) == ("hash-src", "owner", "tm3")
    refinement = trace["refinement"]
    assert refinement["rule"] == "owner" and refinement["applied"] is True
    assert (refinement["from"], refinement["to"], refinement["owner"]) == ("hash-src", "to-dest", "tm3")
    assert "203.0.113.103" in refinement["why"] and "owner" in refinement["why"]
    text = explain(capsys, CONFIG, OWNED)
    lines = text.splitlines()
    cell = next(i for i, line in enumerate(lines) if line.startswith("cell "))
    assert lines[cell + 1].startswith("refinement   hash-src -> to-dest: tm3 owns 203.0.113.103")
    assert "owner refinement" in lines[cell + 1]


def test_no_owner_means_the_cell_stands_and_the_trace_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    trace = json.loads(explain(capsys, CONFIG, "--json", UNOWNED))
    assert trace["reason"] == "hash-src"
    refinement = trace["refinement"]
    assert refinement["applied"] is False and refinement["owner"] is None
    assert refinement["from"] == refinement["to"] == "hash-src"
    assert "no TM owns 203.0.113.99" in refinement["why"]
    assert "no TM owns 203.0.113.99" in explain(capsys, CONFIG, UNOWNED)


def test_cells_the_refinement_does_not_touch_carry_no_refinement(capsys: pytest.CaptureFixture[str]) -> None:
    trace = json.loads(explain(capsys, CONFIG, "--json", "tcp 198.51.100.123:40000 > 203.0.113.80:80"))
    assert "refinement" not in trace
    # node > xlate is to-dest by the table itself: an owner, but no refinement
    trace = json.loads(explain(capsys, CONFIG, "--json", "tcp 203.0.113.10:80 > 203.0.113.101:20000"))
    assert trace["cell_action"] == "to-dest" and trace["reason"] == "owner" and "refinement" not in trace
