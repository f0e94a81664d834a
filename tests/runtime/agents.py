"""A minimal overlay in namespaces for the runtime's own tests: client, distributor, one TM, one server.

    client 198.51.100.10 ── 198.51.100.1 [distributor] 203.0.113.1 ── 203.0.113.10 server (HTTP :80)
           2001:db8:1::10      2001:db8:1::1         2001:db8:2::1      2001:db8:2::10
                                          192.0.2.2
                                              │  underlay (GRE-in-UDP 4754)
                                          192.0.2.3 [tm1]  management 203.0.113.201,
                                                           VIPs 203.0.113.80 and 2001:db8:80::80

The full reference lab (three TMs behind a router, IPv6, many clients) is part B's (`overlay lab`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.runtime.lab import in_ns, namespaces, veth

DISTRIBUTOR_TOML = """\
[node]
role = "distributor"
name = "rtx-dist"

[status]
listen = "127.0.0.1:8080"
{admin}
[underlay]
address = "192.0.2.2"

[tun]
name = "rtxovl0"
capture = ["203.0.113.80/32", "203.0.113.96/27", "203.0.113.192/27", "2001:db8:80::80/128", "2001:db8:ee::/64"]
capture_from = ["203.0.113.0/26", "2001:db8:2::/64"]

[hash]
seed = "runtime-test-seed"

[sets]
virtual = ["203.0.113.80/32", "2001:db8:80::80/128"]
node = ["203.0.113.10/32", "2001:db8:2::10/128"]
nat_able = ["203.0.113.0/26", "2001:db8:2::/64"]
nat_xlate = ["203.0.113.96/27", "2001:db8:ee::/64"]

[[tm]]
name = "tm1"
underlay = "192.0.2.3:4754"
management = ["203.0.113.201"]
xlate = ["203.0.113.101/32", "2001:db8:ee::101/128"]

[health]
interval = {interval}
timeout = 0.3
rise = 1
fall = 2
http = {http}
"""

TM_TOML = """\
[node]
role = "tm"
name = "tm1"

[status]
listen = "0.0.0.0:8080"

[underlay]
address = "192.0.2.3"

[tun]
name = "rtxtm0"

[[distributor]]
underlay = "192.0.2.2"

[tm]
mode = "nat"
management = ["203.0.113.201"]
xlate = ["203.0.113.101", "2001:db8:ee::101"]
natable = ["203.0.113.0/26", "2001:db8:2::/64"]

[[tm.service]]
name = "web"
virtual = "203.0.113.80"
port = 80
servers = ["203.0.113.10:80"]

[[tm.service]]
name = "udp-sink"
virtual = "203.0.113.80"
port = 9
protocol = "udp"
servers = ["203.0.113.10:9"]

[[tm.service]]
name = "web6"
virtual = "2001:db8:80::80"
port = 80
servers = ["[2001:db8:2::10]:80"]
"""

ADMIN_TOKEN = "rtx-admin-token"


@dataclass
class MiniOverlay:
    ns: dict[str, str]
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def distributor_config(self) -> Path:
        return self.workdir / "distributor.toml"

    @property
    def tm_config(self) -> Path:
        return self.workdir / "tm.toml"

    def start(self, role: str, ready: bool = True) -> subprocess.Popen:
        config = self.distributor_config if role == "distributor" else self.tm_config
        command = "distributor" if role == "distributor" else "tm"
        log = open(self.workdir / f"{role}.log", "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[role if role == "tm" else "dist"], sys.executable, "-m", "overlay",
             command, "--config", str(config), "--log-format", "json"],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.procs[role] = proc
        if ready:
            self.wait_ready(role)
        return proc

    def wait_ready(self, role: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[role].poll() is not None:
                raise AssertionError(f"{role} exited with {self.procs[role].returncode}:\n{self.log(role)}")
            if self.status(role, check=False):
                return
            time.sleep(0.1)
        raise AssertionError(f"{role} not ready after {timeout}s:\n{self.log(role)}")

    def status(self, role: str, check: bool = True) -> dict:
        ns = self.ns["dist"] if role == "distributor" else self.ns["tm"]
        out = in_ns(ns, "curl", "-sf", "-m", "2", "http://127.0.0.1:8080/status", check=check)
        return json.loads(out) if out else {}

    def log(self, role: str) -> str:
        path = self.workdir / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_events(self, role: str) -> list[dict]:
        events = []
        for line in self.log(role).splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def signal(self, role: str, signum: int) -> None:
        self.procs[role].send_signal(signum)

    def stop(self, role: str, timeout: float = 10) -> int:
        proc = self.procs[role]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def http(self, url: str = "http://203.0.113.80/", timeout: float = 5) -> subprocess.CompletedProcess:
        """curl from the client; stdout is the HTTP status code ("000": no answer)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns["client"], "curl", "-s", "-m", str(timeout), "-o", "/dev/null",
             "-w", "%{http_code}", url],
            capture_output=True, text=True, timeout=timeout + 5,
        )

    def fetch(self, url: str, timeout: float = 5) -> str:
        """The body curl got from the client's side (raises when the request fails)."""
        return in_ns(self.ns["client"], "curl", "-sf", "-m", str(timeout), url, timeout=timeout + 5)


def build_topology(ns: dict[str, str]) -> None:
    veth(ns["client"], "c0", "198.51.100.10/24", ns["dist"], "dout", "198.51.100.1/24")
    veth(ns["dist"], "dund", "192.0.2.2/26", ns["tm"], "tund", "192.0.2.3/26")
    veth(ns["dist"], "din", "203.0.113.1/26", ns["server"], "s0", "203.0.113.10/26")
    for ns_role, name, address in (("client", "c0", "2001:db8:1::10/64"), ("dist", "dout", "2001:db8:1::1/64"),
                                   ("dist", "din", "2001:db8:2::1/64"), ("server", "s0", "2001:db8:2::10/64")):
        in_ns(ns[ns_role], "ip", "-6", "addr", "add", address, "dev", name, "nodad")
    in_ns(ns["client"], "ip", "route", "add", "default", "via", "198.51.100.1")
    in_ns(ns["client"], "ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    in_ns(ns["server"], "ip", "route", "add", "default", "via", "203.0.113.1")
    in_ns(ns["server"], "ip", "-6", "route", "add", "default", "via", "2001:db8:2::1")
    in_ns(ns["dist"], "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


def wait_listening(ns: str, endpoints: tuple[str, ...], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = in_ns(ns, "ss", "-Hltn")
        if all(endpoint in listening for endpoint in endpoints):
            return
        time.sleep(0.05)
    raise AssertionError(f"servers in {ns} not listening on {endpoints}")


@contextlib.contextmanager
def mini_overlay(workdir: Path, *, admin: bool = False, interval: float = 0.2, http_health: bool = False,
                 agents: bool = True, offload: str | None = None, tm_services: str = "") -> Iterator[MiniOverlay]:
    """`offload`: the distributor's `[tun] offload` ("auto", "on", "off"; None: the key left out, its
    default); `tm_services`: more `[[tm.service]]` tables for the TM's config."""
    with namespaces("client", "dist", "tm", "server") as ns:
        build_topology(ns)
        admin_lines = ""
        if admin:
            token = workdir / "admin.token"
            token.write_text(ADMIN_TOKEN + "\n")
            admin_lines = f'admin_token_file = "{token}"\n'
        distributor = DISTRIBUTOR_TOML.format(admin=admin_lines, interval=interval, http=str(http_health).lower())
        if offload is not None:
            distributor = distributor.replace('name = "rtxovl0"\n', f'name = "rtxovl0"\noffload = "{offload}"\n', 1)
        (workdir / "distributor.toml").write_text(distributor)
        (workdir / "tm.toml").write_text(TM_TOML + tm_services)
        # The lab's HTTP server (part B's) answers /whoami with the peer it saw: proof of where NAT happened.
        servers = [
            subprocess.Popen(
                ["ip", "netns", "exec", ns["server"], sys.executable, "-m", "overlay.lab.httpserver",
                 "--name", "server1", "--port", "80"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        ]
        overlay = MiniOverlay(ns, workdir)
        try:
            wait_listening(ns["server"], ("0.0.0.0:80", "[::]:80"))
            if agents:
                overlay.start("tm")
                overlay.start("distributor")
            yield overlay
        finally:
            for role in list(overlay.procs):
                overlay.stop(role)
            for server in servers:
                server.terminate()
                server.wait(5)
