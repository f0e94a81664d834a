"""The lab's long-running processes (servers and agents): started in a namespace, recorded, stopped by PID.

Each process gets `STATE/pids/NAME` holding "PID STARTTIME" — the start time from /proc/PID/stat makes the
record safe against PID reuse: a stale file from a crashed run never gets an unrelated process killed.
Output goes to `STATE/logs/NAME.log`, which outlives `down` so a failure report can quote it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from overlay.lab.netns import kill_pids

LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class LabProcess:
    name: str
    namespace: str
    pid: int
    log: Path


def _starttime(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    # Field 22 of stat(5) (starttime); fields[0] here is field 3 (state).
    return fields[19] if fields[0] != "Z" else None


class ProcessTable:
    def __init__(self, state_dir: Path):
        self.pid_dir = state_dir / "pids"
        self.log_dir = state_dir / "logs"
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.started: list[LabProcess] = []  # everything this table ever started, for leak checks

    def start(self, name: str, namespace: str, argv: list[str], *, cwd: Path | None = None) -> LabProcess:
        """Run `argv` inside `namespace` (`ip netns exec` execs it: the PID is the program's own)."""
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as output:
            child = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *argv],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in the terminal reaches the lab's driver, not every agent
            )
        self._children[child.pid] = child
        (self.pid_dir / name).write_text(f"{child.pid} {_starttime(child.pid) or ''}\n")
        process = LabProcess(name, namespace, child.pid, log)
        self.started.append(process)
        return process

    def recorded(self) -> dict[str, int]:
        """Processes from the records that are still the very processes started: name -> PID."""
        alive: dict[str, int] = {}
        if not self.pid_dir.is_dir():
            return alive
        for record in sorted(self.pid_dir.iterdir()):
            words = record.read_text().split()
            if len(words) != 2 or not words[0].isdigit():
                continue
            pid = int(words[0])
            if self._poll(pid) and _starttime(pid) == words[1]:
                alive[record.name] = pid
        return alive

    def exited(self, name: str) -> int | None:
        """The exit code of a process this table started, or None while it runs (or if unknown)."""
        record = self.pid_dir / name
        if not record.exists():
            return None
        pid = int(record.read_text().split()[0])
        child = self._children.get(pid)
        return child.poll() if child else None

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every recorded process, SIGKILL after `grace`, and forget the records."""
        kill_pids(list(self.recorded().values()), grace)
        for child in self._children.values():
            child.poll()  # reap, so no zombie outlives the lab
        self._children.clear()
        if self.pid_dir.is_dir():
            for record in self.pid_dir.iterdir():
                record.unlink()

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _poll(self, pid: int) -> bool:
        child = self._children.get(pid)
        return child.poll() is None if child else _starttime(pid) is not None
