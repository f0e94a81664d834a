"""Process records: a stale or reused PID is never signalled; empty prefixes are refused (no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.lab import netns
from overlay.lab.processes import ProcessTable, _starttime


def test_a_record_whose_start_time_differs_is_not_ours(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path)
    table.pid_dir.mkdir(parents=True)
    # This very test process, recorded with another start time: what a reused PID looks like.
    (table.pid_dir / "reused").write_text(f"{os.getpid()} 1\n")
    (table.pid_dir / "garbage").write_text("not a record\n")
    assert table.recorded() == {}
    table.stop_all(grace=0.1)  # must not signal this process
    assert list(table.pid_dir.iterdir()) == []


def test_a_live_record_is_found_and_stopped(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path)
    table.pid_dir.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (table.pid_dir / "sleeper").write_text(f"{child.pid} {_starttime(child.pid)}\n")
        assert table.recorded() == {"sleeper": child.pid}
        table.stop_all(grace=2.0)
        # The sleeper would run for a minute: ending now means it was stopped (stop_all reaps it itself,
        # so its exit status is no longer ours to read).
        child.wait(timeout=5)
        assert _starttime(child.pid) is None
    finally:
        child.kill()
        child.wait()


def test_destroy_refuses_an_empty_prefix() -> None:
    with pytest.raises(netns.LabError):
        netns.destroy("")


def test_kill_pids_escalates_to_sigkill() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        child.stdout.readline()  # type: ignore[union-attr]  # SIGTERM is ignored from here on
        netns.kill_pids([child.pid], grace=0.3)
        child.wait(timeout=5)  # ignoring SIGTERM, only SIGKILL can have ended it this soon
        assert _starttime(child.pid) is None
    finally:
        child.kill()
        child.wait()
