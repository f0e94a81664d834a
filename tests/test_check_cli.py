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
