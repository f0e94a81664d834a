"""The reference lab as one object: build it, start servers and agents, probe them, tear it all down.

`Lab.up()` always starts from nothing (it first removes whatever a crashed run with the same prefix left),
so it is idempotent; `Lab.down()` works from names and records alone, so it also cleans up after a run
that died. Agents run from the repository's `config/` files — the very files compose uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.lab import netns, nsnet, topology
from overlay.lab.processes import ProcessTable
from overlay.lab.traffic import TrafficReport

STATE_ROOT = Path("/run/overlay-lab")
PREFIX_ENV = "OVERLAY_LAB_PREFIX"
CONFIG_DIR_ENV = "OVERLAY_LAB_CONFIG_DIR"
SERVER_ROLES: tuple[str, ...] = ("server1", "server2", "plain", "remote")
AGENT_READY_TIMEOUT = 30.0


class LabUnavailable(RuntimeError):
    """This host cannot run the lab (not root, no /dev/net/tun, no iproute2); the message says which."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, TUN devices): run it with sudo"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: the kernel has no TUN support here (in a container: --device /dev/net/tun)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is missing (apt-get install iproute2)"
    return None


def default_prefix() -> str:
    return os.environ.get(PREFIX_ENV, topology.DEFAULT_PREFIX)


def default_config_dir() -> Path:
    """`$OVERLAY_LAB_CONFIG_DIR`, else `config/` of the working directory, else of the source checkout."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    here = Path.cwd() / "config"
    if (here / "distributor.toml").exists():
        return here
    return Path(__file__).resolve().parents[2] / "config"


@dataclass
class AgentConfigs:
    distributor: Path
    tms: dict[str, Path]

    @classmethod
    def from_dir(cls, config_dir: Path, distributor: Path | None = None) -> AgentConfigs:
        return cls(
            distributor=distributor or config_dir / "distributor.toml",
            tms={tm: config_dir / f"{tm}.toml" for tm in topology.TMS},
        )

    def missing(self) -> list[Path]:
        return [path for path in (self.distributor, *self.tms.values()) if not path.exists()]


class Lab:
    def __init__(
        self,
        prefix: str | None = None,
        *,
        config_dir: Path | None = None,
        distributor_config: Path | None = None,
        state_dir: Path | None = None,
    ):
        self.prefix = prefix or default_prefix()
        self.plan = topology.build_plan(self.prefix)
        self.config_dir = (config_dir or default_config_dir()).resolve()
        self.configs = AgentConfigs.from_dir(self.config_dir, distributor_config)
        self.state_dir = state_dir or STATE_ROOT / self.prefix.rstrip("-")
        self.processes = ProcessTable(self.state_dir)

    def ns(self, role: str) -> str:
        return self.plan.name(role)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def up(self, *, agents: bool = True, timeout: float = AGENT_READY_TIMEOUT,
           before_agents: Callable[[Lab], None] | None = None) -> None:
        """Build the topology, start the HTTP servers and (unless `agents=False`) the agents; wait until ready.
        `before_agents(lab)` changes the network first (a topology variant: NAT routers, more hosts)."""
        reason = unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        if agents and self.configs.missing():
            raise LabUnavailable("agent configs missing: " + ", ".join(map(str, self.configs.missing())))
        self.down()
        netns.create(self.plan)
        for role in SERVER_ROLES:
            self.processes.start(
                role, self.ns(role), [sys.executable, "-m", "overlay.lab.httpserver", "--name", role]
            )
        for role in SERVER_ROLES:
            self._wait_ready(role, f"http://127.0.0.1:{topology.HTTP_PORT}/", timeout)
        if before_agents is not None:
            before_agents(self)
        if not agents:
            return
        for tm, config in self.configs.tms.items():
            self._start_agent(tm, "tm", config)
        self._start_agent("dist", "distributor", self.configs.distributor)
        for role in (*topology.TMS, "dist"):
            self._wait_ready(role, f"http://127.0.0.1:{topology.STATUS_PORT}/healthz", timeout)
        # The distributor is healthy with one TM up; traffic before all three are up would skew the shares
        # and leave a TM without traffic, so wait for its health checks to see the whole fleet.
        self._wait_ready(
            "dist", f"http://127.0.0.1:{topology.STATUS_PORT}/healthz", timeout,
            accept=lambda body: set(json.loads(body).get("up", ())) >= set(topology.TMS),
        )

    def down(self) -> list[str]:
        """Stop every process of the lab and remove its namespaces; returns the namespaces removed."""
        self.processes.stop_all()
        return netns.destroy(self.prefix)

    def _start_agent(self, role: str, command: str, config: Path) -> None:
        self.processes.start(
            role,
            self.ns(role),
            [sys.executable, "-m", "overlay", command, "--config", str(config)],
            cwd=self.config_dir.parent,
        )

    def _wait_ready(
        self, role: str, url: str, timeout: float, accept: Callable[[bytes], bool] = lambda body: True
    ) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self.processes.exited(role)
            if code is not None:
                raise netns.LabError(f"{role} exited with {code} before it was ready:\n{self.processes.log_tail(role)}")
            try:
                status, body = nsnet.http_request(self.ns(role), url, timeout=1.0)
                if status == 200 and accept(body):
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as error:
                last = str(error)
            time.sleep(0.1)
        raise netns.LabError(f"{role} not ready after {timeout:.0f}s ({url}: {last}):\n{self.processes.log_tail(role)}")

    # -- probes ------------------------------------------------------------------------------------------

    def exec(self, role: str, argv: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a lab namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(role), *argv], capture_output=True, text=True, timeout=timeout
        )

    def status(self, role: str) -> dict[str, Any]:
        """An agent's `/status` JSON (from inside its namespace)."""
        return nsnet.http_json(self.ns(role), f"http://127.0.0.1:{topology.STATUS_PORT}/status")

    def traffic(
        self,
        *,
        v4: int = 100,
        v6: int = 100,
        count: int = 2000,
        duration: float = 20.0,
        concurrency: int = 32,
        extra: list[str] | None = None,
    ) -> TrafficReport:
        """Run the traffic generator in the client namespace against the VIP and return its report."""
        argv = [
            sys.executable, "-m", "overlay.lab.traffic", "--json", "--v4", str(v4), "--v6", str(v6),
            "--count", str(count), "--duration", str(duration), "--concurrency", str(concurrency),
            *(extra or []),
        ]
        result = self.exec("client", argv, timeout=duration + 30.0)
        try:
            return TrafficReport.from_dict(json.loads(result.stdout))
        except ValueError as error:
            raise netns.LabError(f"traffic generator failed ({result.returncode}): {result.stderr.strip()}") from error

    def agent_logs(self) -> str:
        """The tail of every process's log, for failure reports."""
        sections = []
        for role in (*topology.TMS, "dist", *SERVER_ROLES):
            tail = self.processes.log_tail(role)
            if tail:
                sections.append(f"--- {role} ({self.processes.log_dir / (role + '.log')}) ---\n{tail}")
        return "\n".join(sections)
