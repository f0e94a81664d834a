"""`overlay check`: what an operator sees for files that are no config at all, and the JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# {description, file bytes, the one line `check` must print}
NOT_A_CONFIG = [
    ("Latin-1 text", b'[node]\nname = "d\xe9p\xf4t"\n', "bad.toml:2: not UTF-8 text (byte 0xe9 at offset 16)"),
    ("random bytes", bytes(range(255, -1, -1)) * 8, "bad.toml:1: not UTF-8 text (byte 0xff at offset 0)"),
    ("an ELF header", b"\x7fELF\x02\x01\x01\x00" + bytes(56), "bad.toml:1: a NUL byte at offset 7: a binary file, not text"),
    ("arrays 10,000 deep", b"a = " + b"[" * 10000 + b"]" * 10000 + b"\n", "bad.toml:1: nested deeper than 32 levels"),
    ("a table header of 10,000 names", b"[" + b".".join([b"t"] * 10000) + b"]\n",
     "bad.toml:1: " + ".".join(["t"] * 33) + ": nested deeper than 32 levels"),
]


@pytest.mark.parametrize(("data", "expected"), [pytest.param(*c[1:], id=c[0]) for c in NOT_A_CONFIG])
def test_a_file_that_is_no_config_is_one_short_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     data: bytes, expected: str) -> None:
    (tmp_path / "bad.toml").write_bytes(data)
    code, out, err = run(capsys, "check", str(tmp_path / "bad.toml"))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {tmp_path}/{expected}") and err.count("\n") == 1 and len(err) < 400, err[-400:]


def test_json_on_success_has_ok_and_no_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--json", str(CONFIG_DIR / "tm1.toml"))
    summary = json.loads(out)
    assert code == 0 and err == ""
    assert (summary["ok"], summary["errors"], summary["file"], summary["role"], summary["name"]) == (
        True, [], str(CONFIG_DIR / "tm1.toml"), "tm", "tm1")


@pytest.mark.parametrize(("data", "error"), [
    pytest.param(b'[node]\nrole = "distributor"\nname = "d 1"\n', {"line": 3, "field": "node.name",
                 "message": "use letters, digits, '-', '_' and '.' only"}, id="a refused value"),
    pytest.param(b"\xff\n", {"line": 1, "field": None, "message": "not UTF-8 text (byte 0xff at offset 0)"}, id="not UTF-8"),
    pytest.param(b"[node\n", {"line": 1, "field": None, "message": "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 6)"},
                 id="TOML syntax"),
])
def test_json_on_error_is_the_documented_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, error: dict) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    code, out, err = run(capsys, "check", "--json", str(path))
    assert code == 1 and err == ""
    assert json.loads(out) == {"ok": False, "file": str(path), "errors": [{"file": str(path), **error}]}


def test_json_for_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--json", str(tmp_path / "absent.toml"))
    assert code == 1 and json.loads(out)["errors"] == [
        {"file": str(tmp_path / "absent.toml"), "line": None, "field": None, "message": "cannot read config: No such file or directory"}]
