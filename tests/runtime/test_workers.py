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


def with_auth(overlay: MiniOverlay, mode: str) -> None:
    """Both agents' configs with `[auth]` on: a key pair each, each naming the other's public key."""
    from overlay import auth

    keys = {role: auth.generate_private_key() for role in ("distributor", "tm")}
    public = {role: auth.encode_key(auth.public_key_of(key)) for role, key in keys.items()}
    for role, path, entry in (("distributor", overlay.distributor_config, '[[tm]]\nname = "tm1"\n'),
                              ("tm", overlay.tm_config, "[[distributor]]\n")):
        key_file = path.with_suffix(".key")
        key_file.write_text(auth.encode_key(keys[role]) + "\n")
        key_file.chmod(0o600)
        other = public["tm" if role == "distributor" else "distributor"]
        text = path.read_text()
        assert entry in text
        text = text.replace(entry, f'{entry}public_key = "{other}"\n', 1)
        path.write_text(text + f'\n[auth]\nmode = "{mode}"\nprivate_key_file = "{key_file}"\n')


@pytest.mark.parametrize("mode", ["encrypt", "authenticate"])
def test_two_workers_with_authentication_seal_in_lanes_of_their_own(tmp_path: Path, mode: str) -> None:
    """`workers = 2` with `[auth]`: both loops seal with the distributor's key, each in its own lane, and the
    TM opens both without refusing one datagram as replayed or too old (one window for both loops' counters
    would refuse the slower one's; one nonce sequence would repeat nonces). The sealed receive group is
    steered by sealed bytes (encrypt: the sender's key and lane), and every connection crosses."""
    require_lab()
    with mini_overlay(tmp_path, agents=False) as overlay:
        with_workers(overlay, 2)
        with_auth(overlay, mode)
        overlay.start("tm")
        overlay.start("distributor")
        assert wait_for(lambda: overlay.status("distributor")["workers"]["running"] == 2), "the worker starts"
        assert wait_for(lambda: overlay.status("distributor")["tms"]["tm1"]["up"], 10), "sealed keepalives"
        assert connections(overlay, 120) == 120, "every connection crosses, whichever loop seals it"
        assert wait_for(lambda: sum(overlay.status("distributor")["workers"]["packets"].values()) > 0, 5), \
            "the worker sealed and opened packets of its own"
        time.sleep(1.2)     # the worker's counters of the last connections reach the agent
        dist, tm = overlay.status("distributor"), overlay.status("tm")
        assert dist["auth"] == tm["auth"] == mode
        refused = {reason: count for reason, count in {**dist["drops"], **tm["drops"]}.items() if reason.startswith("auth:")}
        assert refused == {}, refused
        worker = sum(dist["workers"]["packets"].values())
        print(f"\nworkers=2, auth {mode}: 120 connections, worker share {worker} packets, nothing refused")
