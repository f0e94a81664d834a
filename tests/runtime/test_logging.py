"""structlog setup: JSON on request, console by default, levels filtered before any rendering."""

from __future__ import annotations

import json

import pytest
import structlog

from overlay.runtime.logging import configure_logging


@pytest.fixture(autouse=True)
def fresh_structlog():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_json_lines_carry_event_level_timestamp_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    structlog.get_logger("t").warning("tm.down", tm="tm1")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "tm.down" and line["level"] == "warning" and line["tm"] == "tm1"
    assert line["timestamp"].endswith("Z")


def test_level_filters_below_it(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "warning")
    log = structlog.get_logger("t")
    log.info("agent.started")
    log.error("config.reload_failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["config.reload_failed"]


def test_console_is_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "info")
    structlog.get_logger("t").info("agent.started", role="tm")
    err = capsys.readouterr().err
    assert "agent.started" in err and "role" in err and "tm" in err
    with pytest.raises(ValueError):
        json.loads(err)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="console or json"):
        configure_logging("xml")
