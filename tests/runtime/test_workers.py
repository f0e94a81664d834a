"""`[node] workers = 2`: a distributor with a second packet loop (overlay/runtime/workers.py), real agents
on a real multi-queue TUN. Connections cross it whichever process sees their packets; both processes do
see packets; the status adds their counters up; an admin change reaches the worker (negative control: a
disabled TM's traffic stops at both); a SIGKILLed agent takes its worker with it."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.runtime.agents import ADMIN_TOKEN, MiniOverlay, mini_overlay
from tests.runtime.lab import in_ns, require_lab

pytestmark = pytest.mark.lab

CONNECTIONS = """
import http.client, sys
ok = 0
for index in range(int(sys.argv[1])):
    connection = http.client.HTTPConnection("203.0.113.80", 80, timeout=3)
    try:
        connection.request("GET", "/")
        ok += connection.getresponse().status == 200
    except OSError:
        pass
    finally:
        connection.close()
print(ok)
"""


def connections(overlay: MiniOverlay, count: int) -> int:
    out = in_ns(overlay.ns["client"], sys.executable, "-c", CONNECTIONS, str(count), timeout=120)
    return int(out.strip())


def with_workers(overlay: MiniOverlay, workers: int) -> None:
    path = overlay.distributor_config
    path.write_text(path.read_text().replace("[node]\n", f"[node]\nworkers = {workers}\n", 1))


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def admin(overlay: MiniOverlay, action: str) -> None:
    in_ns(overlay.ns["dist"], "curl", "-sf", "-m", "3", "-X", "POST", "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
          f"http://127.0.0.1:8080/admin/tm/tm1/{action}")


def worker_pids(overlay: MiniOverlay) -> list[int]:
    return [int(pid) for pid in overlay.status("distributor")["workers"]["pids"].values()]


def test_two_workers_share_the_traffic_and_one_decision(tmp_path: Path) -> None:
    require_lab()
    with mini_overlay(tmp_path, admin=True, agents=False) as overlay:
        with_workers(overlay, 2)
        overlay.start("tm")
        overlay.start("distributor")
        assert wait_for(lambda: overlay.status("distributor")["workers"]["running"] == 2), "the worker starts"
        assert connections(overlay, 150) == 150, "every connection crosses, whichever loop sees its packets"
        assert wait_for(lambda: sum(overlay.status("distributor")["workers"]["packets"].values()) > 0, 5), \
            "the worker handled packets of its own (the TUN's queues and SO_REUSEPORT spread them)"
        status = overlay.status("distributor")
        worker = sum(status["workers"]["packets"].values())
        total = status["counters"]["tun_rx_packets"] + status["counters"]["udp_rx_datagrams"]
        # Spread: the TUN's queues and the workers' SO_REUSEPORT group, steered by the inner flow
        # (udp.attach_steering); without the steering the TM's one 4-tuple put 6 % on the worker.
        assert 0.2 < worker / total < 0.8, (worker, total)
        assert status["tms"]["tm1"]["packets"] == status["counters"]["tm.tm1"], "counters add up across workers"
        # One decision: disabled at the agent, and so at the worker — no connection gets through either.
        admin(overlay, "disable")
        assert connections(overlay, 20) == 0, "negative control: a TM out of the table is out for every loop"
        admin(overlay, "enable")
        assert connections(overlay, 40) == 40
        print(f"\nworkers=2: 190 connections, worker share {worker}/{total} packets")
        # SIGKILL: the worker dies with the agent (no process keeps a TUN queue open).
        pids = worker_pids(overlay)
        overlay.signal("distributor", signal.SIGKILL)
        overlay.procs["distributor"].wait(10)
        assert wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and "overlay" in _cmdline(pid) for pid in pids)), \
            "the worker died with its agent"
        del overlay.procs["distributor"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_worker_that_dies_is_restarted(tmp_path: Path) -> None:
    require_lab()
    with mini_overlay(tmp_path, agents=False) as overlay:
        with_workers(overlay, 2)
        overlay.start("tm")
        overlay.start("distributor")
        assert wait_for(lambda: overlay.status("distributor")["workers"]["running"] == 2)
        (pid,) = worker_pids(overlay)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: worker_pids(overlay) not in ([], [pid]) and
                        overlay.status("distributor")["workers"]["restarts"] == 1), "restarted"
        assert connections(overlay, 30) == 30
        assert re.search(r'"worker.died"|worker.died', overlay.log("distributor"))
