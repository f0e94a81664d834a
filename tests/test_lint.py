"""Static checks as tests: `mypy` over overlay/ and `ruff check` over overlay/ and tests/, configured in
pyproject.toml. Fast (a few seconds); skipped, with the reason, where a tool is not installed (both are in
the `test` extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


def test_mypy_passes_on_overlay() -> None:
    result = run_tool("mypy", "overlay")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes_on_overlay_and_tests() -> None:
    result = run_tool("ruff", "check", "overlay", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
