"""`overlay check --fleet DIR`: the node configs of one fleet agree with each other.

Each case copies the reference lab's config/ (which must pass), breaks one agreement in one file, and
checks that the disagreement names both files, both fields and both lines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from overlay.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    for path in CONFIG_DIR.glob("*.toml"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def edit(path: Path, old: str, new: str, occurrence: int = 1) -> None:
    """Replace the `occurrence`-th `old` in the file."""
    text = path.read_text()
    parts = text.split(old)
    assert len(parts) > occurrence, f"{old!r} not {occurrence} times in {path.name}"
    path.write_text(old.join(parts[:occurrence]) + new + old.join(parts[occurrence:]))


def line_of(path: Path, start: str, occurrence: int = 1) -> int:
    """The number of the `occurrence`-th line of the file that starts with `start`."""
    return [number for number, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(start)][occurrence - 1]


def where(path: Path, start: str, occurrence: int = 1) -> str:
    return f"{path}:{line_of(path, start, occurrence)}"


def test_the_reference_lab_fleet_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--fleet", str(CONFIG_DIR))
    assert (code, err) == (0, "")
    assert out == f"{CONFIG_DIR}: ok (1 distributor and 3 TMs agree: dist1, tm1, tm2, tm3)\n"


def test_one_tm_xlate_changed_is_named_in_both_files(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The negative control: tm2's own xlate address no longer is the one the distributor delivers to it."""
    edit(fleet / "tm2.toml", '"203.0.113.102"', '"203.0.113.109"')
    code, _, err = run(capsys, "check", "--fleet", str(fleet))
    dist, tm2 = fleet / "distributor.toml", fleet / "tm2.toml"
    assert code == 1
    assert err.splitlines() == [
        f"error: {where(dist, 'xlate = ', 2)}: tm[1].xlate[0]: 203.0.113.102/32 contains none of the xlate addresses"
        f" of TM 'tm2' (203.0.113.109, 2001:db8:ee::102) (see {where(tm2, 'xlate = ')}: tm.xlate)",
        f"error: {where(tm2, 'xlate = ')}: tm.xlate[0]: 203.0.113.109 is not in the distributor's tm[1].xlate: replies to it"
        f" would not reach this TM (see {where(dist, 'xlate = ', 2)}: tm[1].xlate)",
    ]


# {description, file, old, new, ("pre": an edit before), here and there: (file, start of the line, which such line,
# field), message fragment}
DISAGREEMENTS = [
    {"description": "a port block narrower than the TM's port range", "file": "distributor.toml",
     "old": '"203.0.113.101/32"', "new": '{ prefix = "203.0.113.101/32", protocol = "tcp", ports = "1024-20000" }',
     "here": ("distributor.toml", "xlate = ", 1, "tm[0].xlate[0]"), "there": ("tm1.toml", "port_range = ", 1, "tm.port_range"),
     "message": "but TM 'tm1' allocates ports 1024-65535"},
    {"description": "a fleet_xlate that misses another TM's xlate address", "file": "tm1.toml",
     "old": 'fleet_xlate = ["203.0.113.96/27"', "new": 'fleet_xlate = ["203.0.113.100/31"',
     "here": ("tm1.toml", "fleet_xlate = ", 1, "tm.fleet_xlate"), "there": ("tm2.toml", "xlate = ", 1, "tm.xlate[0]"),
     "message": "does not cover 203.0.113.102, an xlate address of TM 'tm2'"},
    {"description": "a TM that expects another distributor", "file": "tm3.toml",
     "old": 'underlay = "192.0.2.2:4754"', "new": 'underlay = "192.0.2.3:4754"',
     "here": ("tm3.toml", "underlay = ", 1, "distributor[0].underlay"),
     "there": ("distributor.toml", "address = ", 1, "underlay.address"),
     "message": "192.0.2.3 port 4754 is no distributor of the fleet (dist1 is 192.0.2.2 port 4754)"},
    {"description": "a TM underlay the distributor does not send to", "file": "tm1.toml",
     "old": 'address = "192.0.2.71"', "new": 'address = "192.0.2.79"',
     "here": ("distributor.toml", "underlay = ", 1, "tm[0].underlay"), "there": ("tm1.toml", "address = ", 1, "underlay.address"),
     "message": "192.0.2.71 port 4754, but TM 'tm1' listens on 192.0.2.79 port 4754"},
    {"description": "two fleet ids", "file": "tm1.toml", "old": "port = 4754\n", "new": "port = 4754\ngre_key = 8\n",
     "pre": ("distributor.toml", "mtu = 1500\n", "mtu = 1500\ngre_key = 7\n"),
     "here": ("distributor.toml", "gre_key = ", 1, "underlay.gre_key"), "there": ("tm1.toml", "gre_key = ", 1, "underlay.gre_key"),
     "message": "fleet id 7, but TM 'tm1' has 8"},
    {"description": "management addresses that differ", "file": "tm2.toml",
     "old": 'management = ["203.0.113.202"]', "new": 'management = ["203.0.113.212"]',
     "here": ("distributor.toml", "management = ", 2, "tm[1].management"),
     "there": ("tm2.toml", "management = ", 1, "tm.management"),
     "message": "203.0.113.202, but TM 'tm2' has 203.0.113.212"},
]


@pytest.mark.parametrize("case", DISAGREEMENTS, ids=[case["description"] for case in DISAGREEMENTS])
def test_a_disagreement_names_both_files_fields_and_lines(fleet: Path, capsys: pytest.CaptureFixture[str], case: dict) -> None:
    if "pre" in case:
        edit(fleet / case["pre"][0], case["pre"][1], case["pre"][2])
    edit(fleet / case["file"], case["old"], case["new"])
    code, out, err = run(capsys, "check", "--fleet", str(fleet), "--json")
    assert code == 1 and err == ""
    errors = json.loads(out)["errors"]
    here_file, here_start, here_occurrence, here_field = case["here"]
    there_file, there_start, there_occurrence, there_field = case["there"]
    here_line, there_line = line_of(fleet / here_file, here_start, here_occurrence), line_of(fleet / there_file, there_start, there_occurrence)
    matching = [e for e in errors if (e["file"], e["field"]) == (str(fleet / here_file), here_field)
                and e["other"]["file"] == str(fleet / there_file)]
    assert len(matching) == 1, errors
    error = matching[0]
    assert error["line"] == here_line and case["message"] in error["message"], error
    assert error["other"] == {"file": str(fleet / there_file), "line": there_line, "field": there_field}


def test_a_tm_without_a_config_and_an_invalid_file_are_reported(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fleet / "tm3.toml").unlink()
    (fleet / "notes.toml").write_text("[node]\nrole = \"tm\"\nnmae = \"x\"\n")
    code, _, err = run(capsys, "check", "--fleet", str(fleet))
    assert code == 1
    assert f"error: {fleet / 'notes.toml'}:3: node.nmae: unknown key (did you mean name?)" in err.splitlines()
    assert f"error: {where(fleet / 'distributor.toml', 'name = ', 5)}: tm[2].name: no TM config named 'tm3' in {fleet}" in err.splitlines()


def test_an_empty_directory_is_not_a_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", "--fleet", str(tmp_path))
    assert code == 1 and f"{tmp_path}: no *.toml node configs" in err


def test_a_config_file_and_a_fleet_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(CONFIG_DIR / "tm1.toml"), "--fleet", str(CONFIG_DIR))
    assert code == 2 and "give a CONFIG file or --fleet DIR" in err


def test_two_distributors_with_different_seeds(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = fleet / "distributor2.toml"
    shutil.copy(fleet / "distributor.toml", second)
    edit(second, 'name = "dist1"', 'name = "dist2"')
    edit(second, 'seed = "reference-lab-seed-4d1f0c9a7b3e2d18"', 'seed = "another-seed-0123456789"')
    code, out, _ = run(capsys, "check", "--fleet", str(fleet), "--json")
    errors = [e for e in json.loads(out)["errors"] if e["field"] == "hash"]
    assert code == 1 and errors == [{
        "file": str(second), "line": line_of(second, "[hash]"), "field": "hash",
        "message": "another seed than distributor 'dist1'",
        "other": {"file": str(fleet / "distributor.toml"), "line": line_of(fleet / "distributor.toml", "[hash]"), "field": "hash"}}]
