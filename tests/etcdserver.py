"""A real, private etcd for a test: one member on free loopback ports, its data in a temporary directory,
stopped (by PID) afterwards. Tests of the fleet store run against the real thing rather than a fake so the
gateway's JSON dialect, leases, watches and compaction behave as in production.

Use the `etcd_server` fixture by importing it into the test module (pytest finds fixtures among a module's
attributes; it is registered under the name `etcd_server`):

    from tests.etcdserver import EtcdServer, etcd_server_fixture  # noqa: F401 (the etcd_server fixture)

    async def test_something(etcd_server: EtcdServer) -> None:
        async with EtcdClient([etcd_server.url]) as etcd: ...

or `with EtcdServer(path) as server:` directly. `kill()` / `start()` take etcd away and bring it back on the
same data dir and ports; `pause()` / `resume()` freeze it (connections are still accepted by the kernel, but
nothing answers). Without an etcd binary the fixture skips, saying why; .ci/run installs etcd-server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT = 15.0
STOP_GRACE = 5.0


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (held together while picking, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class EtcdServer:
    """One etcd member. Ports are chosen once, so `url` stays valid across kill() and start()."""

    def __init__(self, directory: Path, binary: str = ETCD, *, namespace: str | None = None,
                 address: str = "127.0.0.1") -> None:
        """`namespace`: run inside that network namespace (a lab's), listening on `address` there, on etcd's
        own ports (the namespace is ours alone); otherwise on free loopback ports here."""
        self.binary = binary
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "etcd.log"
        self.namespace = namespace
        client_port, peer_port = (2379, 2380) if namespace else free_ports(2)
        self.url = f"http://{address}:{client_port}"
        self.peer_url = f"http://{address}:{peer_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd (on the existing data dir, if any) and wait until it serves requests."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("etcd is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--name", "t", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"t={self.peer_url}", "--initial-cluster-state", "new",
            # One member: elect it fast (the default 1 s election timeout dominates a test's start-up).
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-level", "warn",
        ]
        if self.namespace is not None:
            command = ["ip", "netns", "exec", self.namespace, *command]   # exec: the PID is etcd's
        # A file, not a pipe: a pipe nobody reads would fill and stall etcd.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"etcd did not answer /health within {START_TIMEOUT} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            if self.namespace is not None:
                from overlay.lab import nsnet

                status, body = nsnet.http_request(self.namespace, self.url + "/health", timeout=1.0)
                return status == 200 and json.loads(body).get("health") == "true"
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A gateway call made with the standard library, for what tests do to etcd behind the client's back
        (compaction, say)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: dict[str, Any] = json.load(response)
            return answer

    def compact(self, revision: int) -> None:
        self.post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: etcd vanishes at once, mid-request ("etcd down" tests)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def pause(self) -> None:
        """SIGSTOP: etcd still accepts connections (the kernel does) but answers nothing ("etcd hangs")."""
        assert self.process is not None and self.process.poll() is None, "etcd is not running"
        os.kill(self.process.pid, signal.SIGSTOP)
        # kill() returns before every thread has stopped: on a busy machine etcd could still answer a
        # request sent right after. Wait until /proc shows all its threads stopped (state T).
        deadline = time.monotonic() + 2.0
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not stop on SIGSTOP within 2 s")
            time.sleep(0.001)

    def _all_threads_stopped(self) -> bool:
        assert self.process is not None
        states = []
        for stat in Path(f"/proc/{self.process.pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread may exit meanwhile
                # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ")".
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        assert self.process is not None and self.process.poll() is None, "etcd is not running"
        os.kill(self.process.pid, signal.SIGCONT)


def require_etcd() -> None:
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"no etcd binary at {ETCD}: apt-get install etcd-server (.ci/run installs it)")


@pytest.fixture(name="etcd_server")
def etcd_server_fixture(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd for one test, stopped after it."""
    require_etcd()
    with EtcdServer(tmp_path / "etcd") as server:
        yield server
