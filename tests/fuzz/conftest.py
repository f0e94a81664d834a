"""The fuzz budget: OVERLAY_FUZZ_SECONDS (unset: none, a few derandomized examples per target), shared
equally by the `fuzz` tests this run selected, so `-k` on one target gives it the whole budget."""

from __future__ import annotations

import os

import pytest

FUZZ_SECONDS = float(os.environ.get("OVERLAY_FUZZ_SECONDS") or 0)
_SELECTED = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what this run does not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_SELECTED] = sum(1 for item in items if item.get_closest_marker("fuzz"))


@pytest.fixture
def fuzz_seconds(request: pytest.FixtureRequest) -> float:
    """This test's share of the budget in seconds; 0 means "the fast suite's fixed examples"."""
    return FUZZ_SECONDS / max(request.config.stash.get(_SELECTED, 1), 1)
