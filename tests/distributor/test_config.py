"""Distributor config: the reference config loads into the plan docs/reference-lab.md describes, and every
rejection names the field and the line a user must edit.

Each rejection case edits a valid base config; the edited line carries the marker `# <-`, and the test
asserts `ConfigError.line` is that line (so a locator off by one fails) and `ConfigError.field` the path.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from overlay.config import load_node_config, parse_node_config
from overlay.configlib import ConfigError
from tests.distributor.configs import REFERENCE

BASE = """\
[node]
role = "distributor"
name = "dist1"

[underlay]
address = "192.0.2.2"

[tun]
capture = ["203.0.113.64/27", "203.0.113.96/27"]
capture_from = ["203.0.113.0/26"]

[hash]
seed = "0123456789abcdef0123"

[sets]
virtual = ["203.0.113.80/32"]
node = ["203.0.113.10/31"]
nat_able = ["203.0.113.0/26"]
nat_xlate = ["203.0.113.96/27"]

[[tm]]
name = "tm1"
underlay = "192.0.2.71"
management = ["203.0.113.201"]
xlate = ["203.0.113.101/32"]

[[tm]]
name = "tm2"
underlay = "192.0.2.72"
xlate = ["203.0.113.102/32"]

[health]
all_down = "drop"
"""

MARK = "# <-"


def edited(old: str, new: str, occurrence: int = 1) -> str:
    """BASE with the `occurrence`-th `old` replaced by `new`."""
    parts = BASE.split(old)
    assert len(parts) > occurrence, f"{old!r} not in BASE {occurrence} times"
    return old.join(parts[:occurrence]) + new + old.join(parts[occurrence:])


REJECTIONS = [
    # description, config text, field
    ("unknown key in [hash]", edited('seed = "0123456789abcdef0123"', 'seed = "0123456789abcdef0123"\nsed = "x" ' + MARK), "hash.sed"),
    ("unknown key in the second [[tm]]", edited('xlate = ["203.0.113.102/32"]', 'xlate = ["203.0.113.102/32"]\nwieght = 2 ' + MARK), "tm[1].wieght"),
    ("unknown table", BASE + "[helth] " + MARK + "\nrise = 2\n", "helth"),
    ("typo'd [sets], not its consequence (xlate outside nat_xlate)", edited("[sets]", "[sest] " + MARK), "sest"),
    ("typo'd [[tm]], not its consequence (no TM)", edited("[[tm]]", "[[tms]] " + MARK).replace("[[tm]]", "[[tms]]"), "tms"),
    ("typo'd parent of [decision.overrides]", BASE + '[desicion.overrides] ' + MARK + '\n"unknown>unknown" = "drop"\n', "desicion"),
    ("typo'd required key, not 'seed is required'", edited('seed = "0123456789abcdef0123"', 'sed = "0123456789abcdef0123" ' + MARK), "hash.sed"),
    ("typo'd required key of a [[tm]]", edited('underlay = "192.0.2.72"', 'udnerlay = "192.0.2.72" ' + MARK), "tm[1].udnerlay"),
    ("unknown key in an address entry", edited('virtual = ["203.0.113.80/32"]', 'virtual = [{ prefix = "203.0.113.80/32", protocl = "tcp" }] ' + MARK), "sets.virtual[0]"),
    ("unknown key in [decision]", BASE + "[decision] \nfoo = 1 " + MARK + "\n", "decision.foo"),
    ("bad prefix", edited('node = ["203.0.113.10/31"]', 'node = ["203.0.113.10/31", "203.0.113.300/32"] ' + MARK), "sets.node[1]"),
    ("prefix with host bits", edited('nat_able = ["203.0.113.0/26"]', 'nat_able = ["203.0.113.1/26"] ' + MARK), "sets.nat_able[0]"),
    ("bad captured prefix", edited('capture_from = ["203.0.113.0/26"]', 'capture_from = ["203.0.113.0/33"] ' + MARK), "tun.capture_from[0]"),
    ("ports without a protocol", edited('virtual = ["203.0.113.80/32"]', 'virtual = [{ prefix = "203.0.113.80/32", ports = 80 }] ' + MARK), "sets.virtual[0]"),
    ("reversed port range", edited('virtual = ["203.0.113.80/32"]', 'virtual = [{ prefix = "203.0.113.80/32", protocol = "tcp", ports = "90-80" }] ' + MARK), "sets.virtual[0]"),
    ("overlapping prefixes in one set", edited('node = ["203.0.113.10/31"]', 'node = ["203.0.113.10/31", "203.0.113.11/32"] ' + MARK), "sets.node[1]"),
    ("a virtual address that is also a node", edited('virtual = ["203.0.113.80/32"]', 'virtual = ["203.0.113.80/32", "203.0.113.10/32"] ' + MARK), "sets.virtual[1]"),
    ("a NAT-xlate address that is also NAT-able", edited('nat_xlate = ["203.0.113.96/27"]', 'nat_xlate = ["203.0.113.96/27", "203.0.113.60/30"] ' + MARK), "sets.nat_xlate[1]"),
    ("a NAT-xlate address that is also a node", edited('nat_xlate = ["203.0.113.96/27"]', 'nat_xlate = ["203.0.113.0/24"] ' + MARK), "sets.nat_xlate[0]"),
    ("an xlate address owned twice", edited('xlate = ["203.0.113.102/32"]', 'xlate = ["203.0.113.100/30"] ' + MARK), "tm[1].xlate[0]"),
    ("a port block owned twice",
     edited('xlate = ["203.0.113.101/32"]', 'xlate = [{ prefix = "203.0.113.101/32", protocol = "tcp", ports = "1024-40000" }]').replace(
         'xlate = ["203.0.113.102/32"]', 'xlate = [{ prefix = "203.0.113.101/32", protocol = "tcp", ports = "40000-65535" }] ' + MARK), "tm[1].xlate[0]"),
    ("an xlate address outside sets.nat_xlate", edited('xlate = ["203.0.113.102/32"]', 'xlate = ["203.0.113.150/32"] ' + MARK), "tm[1].xlate[0]"),
    ("duplicate TM names", edited('name = "tm2"', 'name = "tm1" ' + MARK), "tm[1].name"),
    ("a TM name with a space", edited('name = "tm2"', 'name = "tm 2" ' + MARK), "tm[1].name"),
    ("all weights zero",
     edited('underlay = "192.0.2.71"', 'underlay = "192.0.2.71"\nweight = 0').replace('underlay = "192.0.2.72"', 'underlay = "192.0.2.72"\nweight = 0').replace("[[tm]]", "[[tm]] " + MARK, 1),
     "tm"),
    ("weight above 1000", edited('underlay = "192.0.2.72"', 'underlay = "192.0.2.72"\nweight = 1001 ' + MARK), "tm[1].weight"),
    ("TM underlay inside a captured prefix", edited('underlay = "192.0.2.72"', 'underlay = "203.0.113.99" ' + MARK), "tm[1].underlay"),
    ("TM underlay is the distributor's", edited('underlay = "192.0.2.72"', 'underlay = "192.0.2.2" ' + MARK), "tm[1].underlay"),
    ("two TMs on one underlay endpoint", edited('underlay = "192.0.2.72"', 'underlay = "192.0.2.71:4754" ' + MARK), "tm[1].underlay"),
    ("an IPv6 TM underlay behind an IPv4 distributor underlay",
     edited('underlay = "192.0.2.72"', 'underlay = "[2001:db8::72]:4754" ' + MARK), "tm[1].underlay"),
    ("an IPv6 edge underlay behind an IPv4 distributor underlay",
     BASE + '[[edge]]\nname = "e1"\nunderlay = "2001:db8::130" ' + MARK + '\nprefixes = ["198.51.100.0/24"]\n', "edge[0].underlay"),
    ("TM underlay with a bad port", edited('underlay = "192.0.2.72"', 'underlay = "192.0.2.72:70000" ' + MARK), "tm[1].underlay"),
    ("management address inside a set", edited('management = ["203.0.113.201"]', 'management = ["203.0.113.80"] ' + MARK), "tm[0].management[0]"),
    ("management address of two TMs", edited('xlate = ["203.0.113.102/32"]', 'xlate = ["203.0.113.102/32"]\nmanagement = ["203.0.113.201"] ' + MARK), "tm[1].management[0]"),
    ("seed too short", edited('seed = "0123456789abcdef0123"', 'seed = "short" ' + MARK), "hash.seed"),
    ("seed not a string", edited('seed = "0123456789abcdef0123"', "seed = 12345678901234567890 " + MARK), "hash.seed"),
    ("seed and seed_file both", edited('seed = "0123456789abcdef0123"', 'seed = "0123456789abcdef0123"\nseed_file = "seed.txt" ' + MARK), "hash.seed_file"),
    ("seed file that does not exist", edited('seed = "0123456789abcdef0123"', 'seed_file = "/nonexistent/overlay-seed" ' + MARK), "hash.seed_file"),
    ("bad hash key", edited('seed = "0123456789abcdef0123"', 'seed = "0123456789abcdef0123"\nkey = "5-tuple" ' + MARK), "hash.key"),
    ("table smaller than 2^16 rows", edited('seed = "0123456789abcdef0123"', 'seed = "0123456789abcdef0123"\nrows_log2 = 15 ' + MARK), "hash.rows_log2"),
    ("override of a cell that does not exist", BASE + '[decision.overrides]\n"unknown>vip" = "route" ' + MARK + "\n", "decision.overrides.unknown>vip"),
    ("override without '>'", BASE + '[decision.overrides]\n"unknown" = "route" ' + MARK + "\n", "decision.overrides.unknown"),
    ("override with an unknown action", BASE + '[decision.overrides]\n"node>unknown" = "hash-both" ' + MARK + "\n", "decision.overrides.node>unknown"),
    ("nan health interval: its own line, not [health]'s", edited('all_down = "drop"', 'all_down = "drop"\ninterval = nan ' + MARK), "health.interval"),
    ("infinite health timeout", edited('all_down = "drop"', 'all_down = "drop"\nrise = 2\ntimeout = inf ' + MARK), "health.timeout"),
    ("bad all-down policy", edited('all_down = "drop"', 'all_down = "panic" ' + MARK), "health.all_down"),
    ("edge without prefixes", BASE + '[[edge]] ' + MARK + '\nname = "e1"\nunderlay = "192.0.2.130"\n', "edge[0].prefixes"),
    ("capture containing the underlay address", edited('capture = ["203.0.113.64/27", "203.0.113.96/27"]', 'capture = ["192.0.2.0/24"] ' + MARK), "tun.capture[0]"),
    ("no packet loop at all", edited('name = "dist1"', 'name = "dist1"\nworkers = 0 ' + MARK), "node.workers"),
    ("workers as words", edited('name = "dist1"', 'name = "dist1"\nworkers = "many" ' + MARK), "node.workers"),
    ("an unknown TUN offload setting", edited('capture = ["203.0.113.64/27", "203.0.113.96/27"]', 'capture = ["203.0.113.64/27", "203.0.113.96/27"]\noffload = "fast" ' + MARK), "tun.offload"),
    ("fleet id above 16 bits", edited('address = "192.0.2.2"', 'address = "192.0.2.2"\ngre_key = 65536 ' + MARK), "underlay.gre_key"),
    ("unknown role", edited('role = "distributor"', 'role = "router" ' + MARK), "node.role"),
    ("TOML syntax error", edited('name = "tm2"', 'name = "tm2 ' + MARK), ""),
]


def marked_line(text: str) -> int:
    lines = [number for number, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def test_base_config_is_valid() -> None:
    config = parse_node_config(BASE, "base.toml")
    assert config.distributor is not None and [tm.name for tm in config.distributor.tms] == ["tm1", "tm2"]


@pytest.mark.parametrize(("text", "field"), [pytest.param(c[1], c[2], id=c[0]) for c in REJECTIONS])
def test_rejection_names_field_and_line(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node_config(text, "dist.toml")
    error = caught.value
    assert (error.field, error.line) == (field, marked_line(text)), str(error)
    assert str(error).startswith(f"dist.toml:{error.line}: ")


@pytest.mark.parametrize(("text", "hint"), [
    (edited("[sets]", "[sest]"), "unknown table [sest] (did you mean [sets]?)"),
    (edited("[[tm]]", "[[tms]]").replace("[[tm]]", "[[tms]]"), "unknown table [[tms]] (did you mean [[tm]]?)"),
    (BASE + '[desicion.overrides]\n"unknown>unknown" = "drop"\n', "unknown table [desicion] (did you mean [decision]?)"),
    (edited('seed = "0123456789abcdef0123"', 'sed = "0123456789abcdef0123"'), "unknown key (did you mean seed?)"),
    (edited('xlate = ["203.0.113.102/32"]', 'xlate = ["203.0.113.102/32"]\nwieght = 2'), "unknown key (did you mean weight?)"),
], ids=["sest", "tms", "desicion", "sed", "wieght"])
def test_a_typo_is_named_with_the_closest_valid_name(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node_config(text, "dist.toml")
    assert caught.value.message == hint


def test_a_table_of_the_other_role_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node_config(BASE + "[[distributor]]\nunderlay = \"192.0.2.2\"\n", "dist.toml")
    assert caught.value.field == "distributor" and "unknown table [[distributor]]" in caught.value.message


def test_missing_hash_table_is_named() -> None:
    text = BASE.replace('[hash]\nseed = "0123456789abcdef0123"\n', "")
    with pytest.raises(ConfigError) as caught:
        parse_node_config(text, "dist.toml")
    assert (caught.value.field, caught.value.message) == ("hash", "is required")


def test_seed_file_is_read_relative_to_the_config(tmp_path) -> None:
    (tmp_path / "seed.txt").write_text("0123456789abcdef0123\n")
    text = BASE.replace('seed = "0123456789abcdef0123"', 'seed_file = "seed.txt"')
    (tmp_path / "dist.toml").write_text(text)
    from_file = load_node_config(tmp_path / "dist.toml").distributor
    inline = parse_node_config(BASE).distributor
    assert from_file is not None and inline is not None and from_file.seed == inline.seed


def test_a_seed_file_that_is_not_text_names_the_field(tmp_path) -> None:
    (tmp_path / "seed.bin").write_bytes(b"\x8f" * 32)
    text = BASE.replace('seed = "0123456789abcdef0123"', 'seed_file = "seed.bin"')
    with pytest.raises(ConfigError) as caught:
        parse_node_config(text, "dist.toml", base=tmp_path)
    assert caught.value.field == "hash.seed_file" and caught.value.line == text.splitlines().index('seed_file = "seed.bin"') + 1
    assert f"{tmp_path / 'seed.bin'}: not UTF-8 text (byte 0x8f at offset 0)" in caught.value.message


def test_reference_config_matches_the_lab_plan() -> None:
    """config/distributor.toml against docs/reference-lab.md: TMs, underlay, xlate and management."""
    config = load_node_config(REFERENCE)
    dist = config.distributor
    assert dist is not None and config.underlay.port == 4754
    assert [(tm.name, str(tm.underlay[0]), tm.underlay[1]) for tm in dist.tms] == [
        ("tm1", "192.0.2.71", 4754), ("tm2", "192.0.2.72", 4754), ("tm3", "192.0.2.73", 4754)]
    assert [[str(a) for a in tm.management] for tm in dist.tms] == [["203.0.113.201"], ["203.0.113.202"], ["203.0.113.203"]]
    assert [[str(e.network) for e in tm.xlate] for tm in dist.tms] == [
        [f"203.0.113.{n}/32", f"2001:db8:ee::{n}/128"] for n in (101, 102, 103)]
    virtual = {str(e.network) for e in dist.sets["virtual"]}
    assert virtual == {"203.0.113.80/32", "2001:db8:80::80/128"}
    # Every address the lab routes into the TUN is captured.
    captured = [ipaddress.ip_network(p) for p in ("203.0.113.80/32", "203.0.113.101/32", "203.0.113.201/32", "2001:db8:80::80/128")]
    assert all(any(net.subnet_of(c) for c in config.tun.capture if c.version == net.version) for net in captured)


def test_complete_example_of_the_config_doc_is_valid() -> None:
    """docs/config.md ends with a complete distributor; it must stay loadable (seed inlined: the doc
    reads it from a file)."""
    doc = (REFERENCE.parents[1] / "docs" / "config.md").read_text()
    example = re.findall(r"## A complete distributor\n\n```toml\n(.*?)```", doc, re.S)[0]
    config = parse_node_config(example.replace('seed_file = "fleet.seed"', 'seed = "0123456789abcdef0123"'))
    assert config.distributor is not None and [tm.weight for tm in config.distributor.tms] == [1, 2]


@pytest.mark.parametrize(("setting", "role", "compiled", "on"), [
    ("auto", "distributor", True, True), ("auto", "edge", True, True), ("auto", "tm", True, False),
    ("auto", "distributor", False, False), ("on", "tm", False, True), ("off", "distributor", True, False),
])
def test_tun_offload_auto_means_bulk_roles_with_the_extension(monkeypatch: pytest.MonkeyPatch, setting: str, role: str,
                                                              compiled: bool, on: bool) -> None:
    from overlay.runtime import tun

    monkeypatch.setattr(tun, "COMPILED", compiled)
    assert tun.wants_offload(setting, role) is on
    assert parse_node_config(BASE, "base.toml").tun.offload == "auto"


def test_workers_are_a_distributors_or_an_edges_with_or_without_authentication_never_a_tms(tmp_path) -> None:
    """`workers`: a distributor's or an edge's packet loops, also with `[auth]` (one set of replay windows
    for all of a node's loops). Refused, naming the field and its line, on a TM (its connection table is
    one process's)."""
    from overlay import auth

    assert parse_node_config(BASE.replace('name = "dist1"', 'name = "dist1"\nworkers = 2'), "dist.toml").workers == 2
    key = tmp_path / "dist.key"
    key.write_text(auth.encode_key(auth.generate_private_key()) + "\n")
    key.chmod(0o600)
    peer = auth.encode_key(auth.public_key_of(auth.generate_private_key()))
    text = BASE.replace('name = "dist1"', 'name = "dist1"\nworkers = 2 ' + MARK)
    for tm in ("tm1", "tm2"):
        text = text.replace(f'name = "{tm}"\n', f'name = "{tm}"\npublic_key = "{peer}"\n')
    text += f'\n[auth]\nmode = "encrypt"\nprivate_key_file = "{key}"\n'
    config = parse_node_config(text, "dist.toml")
    assert (config.workers, config.auth.mode) == (2, "encrypt")
    for role, table in (("tm", '[tm]\nmode = "firewall"\n'), ("edge", '[edge]\nprefixes = ["203.0.113.12/32"]\n')):
        other = f"""[node]\nrole = "{role}"\nname = "n1"\nworkers = 2 # <-\n[underlay]\naddress = "192.0.2.71"\n
[[distributor]]\nunderlay = "192.0.2.2"\n{table}"""
        if role == "edge":
            assert parse_node_config(other, "edge.toml").workers == 2
            continue
        with pytest.raises(ConfigError, match="a TM runs one packet loop") as caught:
            parse_node_config(other, f"{role}.toml")
        assert (caught.value.field, caught.value.line) == ("node.workers", 4), str(caught.value)
