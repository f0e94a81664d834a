"""`[node] workers = 2`: a distributor with a second packet loop (overlay/runtime/workers.py), real agents
on a real multi-queue TUN. Connections cross it whichever process sees their packets; both processes do
see packets; the status adds their counters up; an admin change reaches the worker (negative control: a
disabled TM's traffic stops at both); a SIGKILLed agent takes its worker with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
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


def refused(status: dict) -> dict[str, int]:
    return {reason: count for reason, count in status["drops"].items() if reason.startswith("auth:") and count}


@pytest.mark.parametrize("mode", ["encrypt", "authenticate"])
def test_two_workers_with_authentication_seal_in_lanes_and_share_their_replay_windows(tmp_path: Path, mode: str) -> None:
    """`workers = 2` with `[auth]`: both loops seal with the distributor's key, each in its own lane, and the
    TM opens both without refusing one datagram as replayed or too old (one window for both loops' counters
    would refuse the slower one's); both loops open the TM's datagrams against one set of windows."""
    require_lab()
    with mini_overlay(tmp_path, agents=False) as overlay:
        with_workers(overlay, 2)
        with_auth(overlay, mode)
        overlay.start("tm")
        overlay.start("distributor")
        assert wait_for(lambda: overlay.status("distributor")["workers"]["running"] == 2), "the worker starts"
        assert wait_for(lambda: overlay.status("distributor")["tms"]["tm1"]["up"], 10), "sealed keepalives"
        assert connections(overlay, 120) == 120, "every connection crosses, whichever loop seals or opens it"
        assert wait_for(lambda: sum(overlay.status("distributor")["workers"]["packets"].values()) > 0, 5), \
            "the worker sealed and opened packets of its own"
        time.sleep(1.2)     # the worker's counters of the last connections reach the agent
        dist, tm = overlay.status("distributor"), overlay.status("tm")
        assert dist["auth"] == tm["auth"] == mode
        assert refused(dist) == refused(tm) == {}
        windows = dist["workers"]["replay_windows"]
        assert windows["shared"] and windows["in_use"] >= 1, windows
        print(f"\nworkers=2, auth {mode}: 120 connections, worker share "
              f"{sum(dist['workers']['packets'].values())} packets, nothing refused, windows {windows}")


CAPTURE = """
import socket, sys, time
# The first sealed datagram from the TM's underlay address to the distributor's port (AF_PACKET, bounded).
tm, port = socket.inet_aton(sys.argv[1]), int(sys.argv[2])
with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)) as sock:
    sock.settimeout(0.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            packet, address = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if address[1] == 0x0800 and packet[9] == 17 and packet[12:16] == tm and \\
                int.from_bytes(packet[22:24], "big") == port and packet[28] == 0x4F:
            print(packet[28:].hex())
            sys.exit(0)
sys.exit("nothing captured")
"""

SEND = """
import socket, sys
# The captured datagram again, to each of the distributor's ports, from a fresh source port each time.
payload, target = bytes.fromhex(sys.argv[1]), sys.argv[2]
for port in sys.argv[3:]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, (target, int(port)))
"""


def udp_sockets(overlay: MiniOverlay, address: str) -> dict[int, int]:
    """The distributor's UDP ports on its underlay address → the PID that holds each (ss -p)."""
    out = in_ns(overlay.ns["dist"], "ss", "-Huanp")
    ports: dict[int, int] = {}
    for line in out.splitlines():
        found = re.search(rf"\s{re.escape(address)}:(\d+)\s.*pid=(\d+)", line)
        if found:
            ports.setdefault(int(found[1]), int(found[2]))
    return ports


def test_a_replay_sent_to_any_socket_of_either_loop_is_refused(tmp_path: Path) -> None:
    """The threat the shared windows answer: a datagram captured on the underlay and sent again — to the
    well-known port from other source ports, to each send socket of each loop (outside the steered group,
    so at the loop that never opened the original), and again after the worker was killed and restarted
    (a new process with no memory of its own: the datagram captured before its restart is sent to it
    again, as is a new one). Every copy is refused as replayed, none reaches the
    client; the sockets it was sent to belong to both processes. (Loops with windows of their own accept
    it at the loop that did not see it: tests/test_antireplay.py, the negative control.)"""
    require_lab()
    dist_address, tm_address = "192.0.2.2", "192.0.2.3"
    with mini_overlay(tmp_path, agents=False) as overlay:
        with_workers(overlay, 2)
        with_auth(overlay, "encrypt")
        overlay.start("tm")
        overlay.start("distributor")
        assert wait_for(lambda: overlay.status("distributor")["workers"]["running"] == 2), "the worker starts"
        assert wait_for(lambda: overlay.status("distributor")["tms"]["tm1"]["up"], 10)

        def replay_everywhere(earlier: str | None = None) -> tuple[str, int]:
            capture = subprocess.Popen(["ip", "netns", "exec", overlay.ns["dist"], sys.executable, "-c", CAPTURE,
                                        tm_address, "4754"], stdout=subprocess.PIPE, text=True)
            try:
                time.sleep(0.3)
                connections(overlay, 3)
                datagram, _ = capture.communicate(timeout=20)
            finally:
                if capture.poll() is None:
                    capture.kill()
            assert capture.returncode == 0 and datagram.strip(), "a sealed datagram of the TM's was captured"
            sockets = udp_sockets(overlay, dist_address)
            agent, (worker,) = overlay.procs["distributor"].pid, worker_pids(overlay)
            assert {agent, worker} <= set(sockets.values()), ("both loops' sockets are targets", sockets)
            targets = [*sockets, *[4754] * 4]
            before = overlay.status("distributor")["drops"].get("auth:replayed", 0)
            for copy in (datagram.strip(), *([earlier] if earlier else [])):
                in_ns(overlay.ns["tm"], sys.executable, "-c", SEND, copy, dist_address, *map(str, targets))
            expected = before + len(targets) * (2 if earlier else 1)
            assert wait_for(lambda: overlay.status("distributor")["drops"].get("auth:replayed", 0) >= expected, 5), \
                (overlay.status("distributor")["drops"], expected)
            time.sleep(1.2)   # anything late from the worker's counters
            assert overlay.status("distributor")["drops"].get("auth:replayed", 0) == expected, "each copy, once"
            return datagram.strip(), expected - before

        first, sent = replay_everywhere()
        (pid,) = worker_pids(overlay)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: worker_pids(overlay) not in ([], [pid]) and
                        overlay.status("distributor")["workers"]["running"] == 2, 15), "restarted"
        # The restarted worker is a new process: the datagram captured before it existed is a replay to
        # it too, at every socket (its own new ones included), and so is one captured now.
        sent += replay_everywhere(earlier=first)[1]
        status = overlay.status("distributor")
        assert {reason for reason in refused(status)} == {"auth:replayed"}, refused(status)
        assert connections(overlay, 30) == 30, "the traffic itself still crosses"
        print(f"\nworkers=2, auth encrypt: {sent} replays to every socket of both loops (and of a restarted "
              f"worker), all refused")
