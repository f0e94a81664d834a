"""Output piped into a reader that stops early (`overlay explain ... | head -1`): the command ends quietly
with the status a shell reports for a writer killed by SIGPIPE (141), never a BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "config" / "distributor.toml")


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run `overlay ARGV` with stdout a real pipe whose only reader has already gone: every write fails
    with EPIPE, as after `| head -1` has read its line and exited — deterministic, no timing involved."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "overlay", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=60, check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "argv",
    [
        ("explain", "--config", CONFIG, "tcp 198.51.100.100:40000 > 203.0.113.80:80"),
        ("explain", "--config", CONFIG, "--json", "udp [2001:db8:1::100]:5353 > [2001:db8:80::80]:53"),
        ("check", CONFIG),
    ],
    ids=["explain", "explain-json", "check"],
)
def test_a_closed_pipe_ends_the_command_quietly_with_141(argv: tuple[str, ...]) -> None:
    result = run_into_closed_pipe(*argv)
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr
    assert result.returncode == 141, stderr


def test_a_reader_that_takes_one_line_gets_it(tmp_path: Path) -> None:
    """`| head -1` for real: the first line arrives whole; the exit status is 0 or 141 depending on
    whether the output was already written when head left (a pipe buffers 64 KiB)."""
    pipeline = f"set -o pipefail; {sys.executable} -m overlay check {CONFIG} | head -1"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, cwd=ROOT, timeout=60, check=False)
    first = result.stdout.decode()
    assert first.count("\n") == 1 and ": ok (distributor dist1" in first
    assert result.returncode in (0, 141) and b"Traceback" not in result.stderr
