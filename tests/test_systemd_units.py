"""The systemd units shipped in config/systemd/ (docs/clouds.md) run commands the CLI really has."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from overlay.cli import build_parser

UNITS = sorted((Path(__file__).resolve().parents[1] / "config" / "systemd").glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.mark.parametrize("path", UNITS, ids=[path.name for path in UNITS])
def test_every_overlay_command_of_a_unit_parses(path: Path) -> None:
    service = unit(path)["Service"]
    commands = [service["ExecStart"], *service.get("ExecStartPre", "").splitlines()]
    role = path.name.removeprefix("overlay-").split("@")[0]
    for command in filter(None, commands):
        argv = shlex.split(command.replace("%i", "node1"))
        assert argv[0] == "/opt/overlay/bin/overlay"
        args = build_parser().parse_args(argv[1:])
        assert callable(args.func)
    assert shlex.split(service["ExecStart"])[1] == role
    assert "HUP" in service["ExecReload"] and service["KillSignal"] == "SIGTERM"


def test_every_role_has_a_unit() -> None:
    assert [path.name for path in UNITS] == ["overlay-distributor@.service", "overlay-edge@.service", "overlay-tm@.service"]
