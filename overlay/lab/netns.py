"""Create and remove the lab's namespaces with iproute2 (`ip -batch`), one batch per namespace.

iproute2 is the tool every reader of a failure log already knows, and a batch of a few hundred lines
(the client's 356 addresses) runs in milliseconds. Everything the lab creates lives in namespaces named
with its prefix, so `destroy` needs no record of what was built: it finds the namespaces by name, kills
the processes still inside them (every one was started by the lab), and deletes them, which removes
their veths, bridges, TUNs, routes and rules with them — also after a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from overlay.lab.topology import Plan

NETNS_DIR = Path("/run/netns")


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which command failed and why."""


def run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ip_batch(lines: list[str], namespace: str | None = None) -> None:
    if not lines:
        return
    argv = ["ip"] + (["-n", namespace] if namespace else []) + ["-batch", "-"]
    run(argv, stdin="\n".join(lines) + "\n")


def list_namespaces(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(prefix))


def namespace_pids(namespace: str) -> list[int]:
    result = run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def sysctl(namespace: str, settings: list[str]) -> None:
    run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *settings])


def create(plan: Plan) -> None:
    """Build the plan from nothing. The caller destroys leftovers first (`destroy(plan.prefix)`)."""
    for ns in plan.namespaces.values():
        run(["ip", "netns", "add", ns.name])
        sysctl(ns.name, ns.sysctls)
        ip_batch(["link set lo up", *ns.setup], ns.name)
    ip_batch(plan.links)
    for ns in plan.namespaces.values():
        ip_batch(ns.commands, ns.name)


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    alive = [pid for pid in pids if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def destroy(prefix: str) -> list[str]:
    """Remove every namespace named `prefix*` and kill what runs inside; returns the names removed."""
    if not prefix:
        raise LabError("refusing to destroy namespaces with an empty prefix")
    names = list_namespaces(prefix)
    pids = sorted({pid for name in names for pid in namespace_pids(name) if pid != os.getpid()})
    kill_pids(pids)
    for name in names:
        run(["ip", "netns", "delete", name], check=False)
    leftover = list_namespaces(prefix)
    if leftover:
        raise LabError(f"namespaces still present after delete: {', '.join(leftover)}")
    return names


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def _exists(pid: int) -> bool:
    # A zombie child of ours still "exists" for kill(0); reap it if it is ours, else read its state.
    try:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
