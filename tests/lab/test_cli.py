"""`overlay lab` / `overlay demo` refuse early, with the reason and a non-zero exit, where the lab cannot run."""

from __future__ import annotations

import pytest

from overlay import cli
from overlay.lab import lab as lab_module

CANNOT_RUN = [
    {"description": "not root", "euid": 1000, "tun": True, "message": "needs root", "code": 2},
    {"description": "no /dev/net/tun", "euid": 0, "tun": False, "message": "/dev/net/tun is missing", "code": 2},
]


@pytest.mark.parametrize("case", CANNOT_RUN, ids=[c["description"] for c in CANNOT_RUN])
@pytest.mark.parametrize("argv", [["demo"], ["lab", "up"], ["lab", "down"], ["lab", "run"]])
def test_refuses_with_the_reason(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 case: dict, argv: list[str]) -> None:
    monkeypatch.setattr(lab_module.os, "geteuid", lambda: case["euid"])
    real_exists = lab_module.os.path.exists
    monkeypatch.setattr(
        lab_module.os.path, "exists", lambda path: case["tun"] if path == "/dev/net/tun" else real_exists(path)
    )
    assert cli.main(argv) == case["code"]
    assert case["message"] in capsys.readouterr().err


def test_lab_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lab"])
    assert exit_info.value.code == 2


def test_prefix_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAY_LAB_PREFIX", "abc-")
    assert lab_module.Lab().plan.name("dist") == "abc-dist"
    assert lab_module.Lab("xyz-").plan.name("dist") == "xyz-dist"
