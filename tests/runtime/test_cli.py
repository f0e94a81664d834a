"""`overlay distributor` / `overlay tm`: argument handling that must fail early and clearly (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.cli import build_parser, main
from tests.runtime.agents import DISTRIBUTOR_TOML


def test_distributor_needs_a_config() -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["distributor"])
    assert exit_.value.code == 2


def test_tm_without_config_or_action_explains_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tm"]) == 2
    assert "--config FILE" in capsys.readouterr().err


def test_tm_actions_parse_with_defaults() -> None:
    args = build_parser().parse_args(["tm", "drain", "tm2"])
    assert (args.tm_action, args.name, args.url, args.token_file) == ("drain", "tm2", "http://127.0.0.1:8080", None)


def test_unknown_tm_action_is_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tm", "explode", "tm2"])


def test_log_format_is_checked() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tm", "--config", "x.toml", "--log-format", "xml"])


# {description, file content (None: missing), text the operator must read}
CONFIG_FAILURES = [
    {"description": "missing file", "content": None, "expected": "cannot read config"},
    {"description": "TOML syntax error", "content": "[node\n", "expected": "node.toml"},
    {"description": "a distributor config given to `overlay tm`", "content": DISTRIBUTOR_TOML.format(admin="", interval=1, http="false"),
     "expected": "is a distributor config"},
]


@pytest.mark.parametrize("case", CONFIG_FAILURES, ids=[case["description"] for case in CONFIG_FAILURES])
def test_config_failures_exit_2_with_one_line(case: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    if case["content"] is not None:
        path.write_text(case["content"])
    assert main(["tm", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert case["expected"] in err and "Traceback" not in err


# {description, file bytes, text the operator must read}: files that are no TOML text at all
NOT_TOML = [
    {"description": "a file that is not UTF-8", "content": b"[node]\nrole = \"tm\xff\"\n", "expected": "node.toml:2: not UTF-8 text"},
    {"description": "an ELF binary", "content": b"\x7fELF\x02\x01\x01\x00" + bytes(8), "expected": "node.toml:1: a NUL byte"},
    {"description": "arrays nested 10,000 deep", "content": b"a = " + b"[" * 10000 + b"]" * 10000 + b"\n",
     "expected": "node.toml:1: nested deeper than"},
]


@pytest.mark.parametrize("role", ["tm", "distributor"])
@pytest.mark.parametrize("case", NOT_TOML, ids=[case["description"] for case in NOT_TOML])
def test_a_file_that_is_no_toml_text_exits_2_with_one_short_line(
        case: dict, role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(case["content"])
    assert main([role, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert case["expected"] in err and err.count("\n") == 1 and len(err) < 400, err[-400:]
