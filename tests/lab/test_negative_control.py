"""Negative control: the same lab with a deliberately asymmetric distributor must break connections.

The distributor config is the reference one with the reply cells of FIG. 9 overridden to hash the
*source* (the server) instead of the destination (the client): a reply then lands on the TM chosen by
the server's address, which has no state for the connection and drops it as invalid. If this test
passed with zero failures, the end-to-end suite could not tell a symmetric distributor from a broken one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from overlay.lab import topology
from overlay.lab.lab import Lab, default_config_dir
from overlay.lab.report import invalid_drops

from .conftest import needs_lab

pytestmark = [pytest.mark.lab, needs_lab]

ASYMMETRIC_OVERRIDES = """
# Negative control (tests/lab/test_negative_control.py): replies hash the server, not the client.
[decision.overrides]
"node>unknown" = "hash-src"
"nat-able>unknown" = "hash-src"
"nat-able+node>unknown" = "hash-src"
"""


def asymmetric_config(directory: Path) -> Path:
    reference = (default_config_dir() / "distributor.toml").read_text()
    assert "[decision.overrides]" not in reference, "the reference config overrides cells itself; merge by hand"
    path = directory / "distributor-asymmetric.toml"
    path.write_text(reference + ASYMMETRIC_OVERRIDES)
    return path


@pytest.fixture(scope="module")
def asymmetric_lab(make_lab: Callable[..., Lab], tmp_path_factory: pytest.TempPathFactory) -> Lab:
    lab = make_lab(distributor_config=asymmetric_config(tmp_path_factory.mktemp("config")))
    try:
        lab.up()
    except Exception:
        print(lab.agent_logs())
        raise
    return lab


def test_asymmetric_distributor_breaks_connections(asymmetric_lab: Lab, show_logs_on_failure) -> None:
    show_logs_on_failure(asymmetric_lab)
    report = asymmetric_lab.traffic(v4=30, v6=30, count=150, duration=40, concurrency=50, extra=["--timeout", "2"])
    invalid = {tm: invalid_drops(asymmetric_lab.status(tm)) for tm in topology.TMS}
    # With three TMs about two replies in three land on a TM without state.
    assert report.failed >= report.requests // 3, report.summary()
    assert sum(sum(reasons.values()) for reasons in invalid.values()) > 0, invalid
