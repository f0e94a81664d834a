"""The overlay's benchmark suite (issue 10): the product against baselines, measured in the same run.

    sudo .venv/bin/python -m benchmarks.run [--quick] [--rounds N] [--only NAME[,NAME...]] [--auth authenticate] [--json FILE]

NAME is one of: distributor, workers, tm, iperf, rtt (the default: all five), and profile (only when asked).

- distributor: the distributor agent (TUN → decide → GRE-in-UDP, 3 TMs) vs benchmarks/c/dist_loop.c
  (TUN reads until EAGAIN, xxh64, 65,536-row table, sendmmsg) and vs dist_loop -g (the same, each TM's runs
  of a batch sent as UDP GSO messages, as the agent sends them), each pinned to the subject core, flooded by
  benchmarks/c/flood.c (UDP GSO, 1,024 source endpoints) from the client namespace pinned to the other core.
  A C sink in the TM namespace counts the GRE-in-UDP datagrams that leave the subject (and echoes
  keepalives, so the agent sees its TMs up).
- workers: the distributor agent with [node] workers = 1 vs workers = 2 under the same flood, a fresh agent
  per sample: workers = 1 on the subject core; workers = 2 with process 0 on the subject core and worker 1
  on the generator core (shared with the flood and the sink). Packets/s, CPU per packet of all the agent's
  processes, each worker's share; the scaling (pps 2 / 1) and efficiency (CPU/packet 2 / 1) ratios.
  With --auth authenticate: the distributor seals every datagram (one TM, keyed with the distributor's
  own key so that the sink's unchanged echoes open again); its packets then take the per-packet Python
  path, three or four times the work of the C one, which the generator's share of a core hurts less.
- tm: the TM agent (NAT, established flows) vs benchmarks/c/tm_relay.c (recvmmsg, conntrack hash, DNAT
  with incremental checksums, sendmmsg). flood.c imitates the distributor: GRE-in-UDP straight to the TM,
  4,096 inner UDP flows; a warm-up pass opens them; the sink counts what the TM sends back.
- iperf: iperf3 TCP (1 and 4 streams) client → distributor → TM (DNAT) → server vs the kernel on the same
  hops: client → dist → tm namespace (kernel forwarding + nftables DNAT) → dist → server.
- rtt: UDP request/response round trips (benchmarks/pingpong.py) over the same two paths, p50/p99.
- profile: each agent under cProfile for a few seconds of flood, and the user/kernel split of its CPU.

Product and baseline alternate, round by round (the order flips every round; with three subjects it
rotates), so drift of the machine hits both. Everything is bounded in time; namespaces (rtx-*) and every process started here are removed
on exit. Not part of the test suite's pass/fail: it reports, it never asserts. Needs root, /dev/net/tun,
ip(8), nft(8), a C compiler (cc) and, for `iperf`, iperf3 (apt-get install iperf3). docs/performance.md
has the results and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import pstats
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
C_DIR = Path(__file__).resolve().parent / "c"
C_PROGRAMS = ("dist_loop", "tm_relay", "flood", "sink")
BENCHMARKS = ("distributor", "workers", "tm", "iperf", "rtt")
EVERYTHING = (*BENCHMARKS, "profile")

# The namespaces are tests/runtime/agents.py's mini overlay (client, dist, tm, server) plus these addresses.
TM_UNDERLAYS = ("192.0.2.3", "192.0.2.4", "192.0.2.5")  # tm1..tm3 of the distributor benchmark (the sink)
RELAY_UNDERLAY = "192.0.2.6"                            # tm_relay, beside the TM agent on 192.0.2.3
DIST_UNDERLAY = "192.0.2.2"
FLOOD_SOURCES = tuple(f"198.51.100.{20 + i}" for i in range(16))  # x 64 source ports: 1,024 client endpoints
VIP = "203.0.113.80"              # the product's VIP (captured by the distributor, NATed by the TM agent)
LOOP_VIP = "203.0.113.82"         # routed into dist_loop's TUN
GSO_LOOP_VIP = "203.0.113.83"     # routed into the TUN of dist_loop -g (GSO sends)
GSO_LOOP = "dist_loop -g (C, GSO)"
KERNEL_VIP = "203.0.113.81"       # the kernel path's VIP: nftables DNAT in the tm namespace
SERVER = "203.0.113.10"           # the server behind the product's VIP
KERNEL_SERVER = "203.0.113.11"    # the same server's second address, behind the kernel path's VIP
KERNEL_TABLE = 100
IPERF_PORT = 5201
ECHO_PORT = 7
SINK_PORT = 9

DISTRIBUTOR_TOML = """\
[node]
role = "distributor"
name = "bench-dist"
workers = {workers}

[status]
listen = "127.0.0.1:8080"

[underlay]
address = "{dist}"

[tun]
name = "benchovl0"
capture = ["{vip}/32"]
capture_from = ["203.0.113.0/26"]

[hash]
seed = "benchmark-seed-0123456789abcdef"

[sets]
virtual = ["{vip}/32"]
node = ["{server}/32"]
nat_able = ["203.0.113.0/26"]
nat_xlate = ["203.0.113.96/27"]

{tms}
[health]
interval = 0.5
timeout = 0.5
rise = 1
fall = 3
http = false
"""

TM_ENTRY = """\
[[tm]]
name = "tm{n}"
underlay = "{address}:4754"
management = ["203.0.113.20{n}"]
xlate = ["203.0.113.10{n}/32"]

"""

TM_TOML = """\
[node]
role = "tm"
name = "tm1"

[status]
listen = "0.0.0.0:8080"

[underlay]
address = "{tm}"

[tun]
name = "benchtm0"

[[distributor]]
underlay = "{dist}"

[tm]
mode = "nat"
management = ["203.0.113.201"]
xlate = ["203.0.113.101"]
natable = ["203.0.113.0/26"]

[[tm.service]]
name = "iperf"
virtual = "{vip}"
port = {iperf}
servers = ["{server}:{iperf}"]

[[tm.service]]
name = "echo"
virtual = "{vip}"
port = {echo}
protocol = "udp"
servers = ["{server}:{echo}"]

[[tm.service]]
name = "udp-sink"
virtual = "{vip}"
port = {sink}
protocol = "udp"
servers = ["{server}:{sink}"]
"""

KERNEL_NFT = f"""\
table ip bench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {KERNEL_VIP} dnat to {KERNEL_SERVER}
    }}
}}
"""


class BenchError(RuntimeError):
    """Something the operator has to fix (missing tool, no root); printed without a traceback."""


@dataclass
class Settings:
    rounds: int
    warmup: float
    seconds: float
    iperf_seconds: int
    rtt_count: int
    subject_cpu: int
    generator_cpu: int
    profile_seconds: float
    offered_pps: int = 800_000
    steer_rx: bool = False
    auth: str = "off"       # the workers benchmark's distributor: [auth] mode (see `workers_auth`)


@dataclass
class Sample:
    """One measurement of one subject: packets per second and what they cost."""

    pps: float = 0.0
    core_ns: float = 0.0     # busy time of the subject core (/proc/stat) per packet
    proc_ns: float = 0.0     # CPU time of the subject's own threads (schedstat) per packet
    user_share: float = 0.0  # of the subject's CPU time, the part in user mode (the rest: the kernel)
    core_busy: float = 0.0   # fraction of the window the subject core was busy
    generated_pps: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Result:
    benchmark: str
    subject: str
    unit: str
    values: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    # The ratio this row's cell shows, (numerator, denominator) subjects of the same benchmark; unset: the
    # first row shows first / second (product / baseline), the others none.
    ratio: tuple[str, str] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


# -- tools ------------------------------------------------------------------------------------------------


def build_c(outdir: Path) -> dict[str, Path]:
    """Compile the C baselines and helpers with `cc -O2 -Wall`; returns {name: binary}."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise BenchError("no C compiler: benchmarks/run.py builds its baselines with cc (apt-get install gcc)")
    binaries = {}
    for name in C_PROGRAMS:
        binary = outdir / name
        result = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(C_DIR / f"{name}.c")],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"compiling benchmarks/c/{name}.c failed:\n{result.stderr}")
        binaries[name] = binary
    return binaries


def preflight(names: set[str]) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (namespaces, TUN devices): sudo .venv/bin/python -m benchmarks.run")
    if not os.path.exists("/dev/net/tun"):
        problems.append("needs /dev/net/tun")
    for tool in ("ip", "nft", "taskset", "curl"):
        if shutil.which(tool) is None:
            problems.append(f"needs {tool}(8) on PATH")
    if "iperf" in names and shutil.which("iperf3") is None:
        problems.append("the iperf benchmark needs iperf3: apt-get install iperf3 (or leave it out: --only ...)")
    if (os.cpu_count() or 1) < 2:
        problems.append("needs 2 CPUs: the subject on one, the generator on the other")
    if problems:
        raise BenchError("; ".join(problems))


# -- processes, CPUs, counters ------------------------------------------------------------------------------


def pin(pid: int, cpus: set[int]) -> None:
    """Move every thread of `pid` to `cpus` (threads started later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def proc_cpu(pid: int) -> tuple[int, int, int]:
    """(on-CPU ns of all threads, utime ticks, stime ticks) of a process."""
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ns, int(fields[11]), int(fields[12])


def procs_cpu(pids: list[int]) -> dict[int, tuple[int, int, int]]:
    """proc_cpu of each of `pids` that still exists."""
    out = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[pid] = proc_cpu(pid)
    return out


def kernel_thread(name: str) -> int:
    """The PID of the kernel thread called `name` (ksoftirqd/1), or -1."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    return int(entry)
    return -1


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from the parent PIDs in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in sorted(children.get(todo.pop(), [])):
            found.append(child)
            todo.append(child)
    return found


def udp_rcvbuf_errors(pid: int) -> int:
    """RcvbufErrors of the UDP MIB in the network namespace of process `pid`."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def foreign_cpu_ticks() -> dict[int, int]:
    """CPU ticks used so far by each user process that is not this run's (another engineer's lab, say)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[6]) & 0x00200000:   # PF_KTHREAD: the kernel's own threads work for everyone
                continue
            parents[int(entry)] = int(fields[1])
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
    me, foreign = os.getpid(), {}
    for pid, used in ticks.items():
        ancestor, hops = pid, 0
        while ancestor not in (me, 0, 1) and hops < 64:
            ancestor, hops = parents.get(ancestor, 0), hops + 1
        if ancestor != me:
            foreign[pid] = used
    return foreign


def foreign_ticks_between(before: dict[int, int], after: dict[int, int]) -> int:
    """Ticks the foreign processes used between two `foreign_cpu_ticks`: those alive at the end (a process
    that ended in between took its ticks along: what it used then is lost, but it no longer counts negative)."""
    return sum(used - before.get(pid, 0) for pid, used in after.items() if used >= before.get(pid, 0))


def core_times(cpu: int) -> tuple[int, int]:
    """(busy, total) ticks of one CPU from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            return sum(values[:8]) - idle, sum(values[:8])
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


class LineReader:
    """Lines from a child's stdout with a timeout (the children print one line per request)."""

    def __init__(self, proc: subprocess.Popen):
        assert proc.stdout is not None
        self.proc, self.fd, self.buffer = proc, proc.stdout.fileno(), b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise TimeoutError(f"no line from {self.proc.args!r} within {timeout}s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError(f"{self.proc.args!r} exited ({self.proc.poll()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


class Processes:
    """Every process this run starts, stopped by PID (TERM, then KILL) in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], *, ns: str | None = None, capture: bool = True, **kwargs: Any) -> subprocess.Popen:
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        proc = subprocess.Popen(full, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                stderr=kwargs.pop("stderr", subprocess.DEVNULL), **kwargs)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def wait_ready(proc: subprocess.Popen, what: str, timeout: float = 10) -> LineReader:
    reader = LineReader(proc)
    line = reader.readline(timeout)
    if line.strip() != "ready":
        raise RuntimeError(f"{what} did not start: {line!r}")
    return reader


class Sink:
    """benchmarks/c/sink.c: counts datagrams; `read()` asks it (SIGUSR1) for (count, monotonic ns)."""

    def __init__(self, processes: Processes, binary: Path, ns: str, endpoints: list[str]):
        self.proc = processes.start([str(binary), "-s", "1800", *endpoints], ns=ns)
        self.reader = wait_ready(self.proc, "sink")

    def read(self) -> tuple[int, int]:
        os.kill(self.proc.pid, signal.SIGUSR1)
        words = self.reader.readline(5).split()
        return int(words[1]), int(words[3])

    def close(self) -> None:
        Processes.stop(self.proc)


# -- the lab ------------------------------------------------------------------------------------------------


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 10) -> str:
    from tests.runtime.lab import in_ns as lab_in_ns

    return lab_in_ns(ns, *argv, check=check, timeout=timeout)


def build_lab(ns: dict[str, str]) -> None:
    """tests/runtime/agents.py's topology, plus the benchmark's addresses and the kernel path."""
    from tests.runtime.agents import build_topology

    build_topology(ns)
    for address in (*TM_UNDERLAYS[1:], RELAY_UNDERLAY):
        in_ns(ns["tm"], "ip", "addr", "add", f"{address}/26", "dev", "tund")
    for address in FLOOD_SOURCES:
        in_ns(ns["client"], "ip", "addr", "add", f"{address}/24", "dev", "c0")
    in_ns(ns["server"], "ip", "addr", "add", f"{KERNEL_SERVER}/26", "dev", "s0")
    # The kernel path: the same hops as the overlay's (client → dist → tm → dist → server), the kernel
    # forwarding at every one and nftables doing the DNAT in the tm namespace; replies from the server's
    # second address go back through tm (a policy rule ahead of the distributor's own rules) to be un-NATed.
    dist, tm = ns["dist"], ns["tm"]
    in_ns(dist, "ip", "route", "add", f"{KERNEL_VIP}/32", "via", TM_UNDERLAYS[0])
    in_ns(dist, "ip", "route", "add", "default", "via", TM_UNDERLAYS[0], "table", str(KERNEL_TABLE))
    in_ns(dist, "ip", "rule", "add", "priority", "100", "from", KERNEL_SERVER, "lookup", str(KERNEL_TABLE))
    in_ns(tm, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
          "net.ipv4.conf.tund.send_redirects=0")
    in_ns(tm, "ip", "route", "add", "198.51.100.0/24", "via", DIST_UNDERLAY)
    in_ns(tm, "ip", "route", "add", "203.0.113.0/26", "via", DIST_UNDERLAY)
    subprocess.run(["ip", "netns", "exec", tm, "nft", "-f", "-"], input=KERNEL_NFT, text=True, check=True,
                   capture_output=True, timeout=10)


class Lab:
    def __init__(self, ns: dict[str, str], workdir: Path, tools: dict[str, Path], settings: Settings,
                 processes: Processes):
        from tests.runtime.agents import MiniOverlay

        self.ns, self.workdir, self.tools, self.settings, self.processes = ns, workdir, tools, settings, processes
        self.overlay = MiniOverlay(ns, workdir)
        self.subject_cpus = {settings.subject_cpu}
        self.generator_cpus = {settings.generator_cpu}
        self.all_cpus = set(range(os.cpu_count() or 2))

    # agents ---------------------------------------------------------------------------------------------

    def write_configs(self, tms: int, workers: int = 1, auth_mode: str = "off") -> None:
        entries = "".join(TM_ENTRY.format(n=n + 1, address=address) for n, address in enumerate(TM_UNDERLAYS[:tms]))
        distributor = DISTRIBUTOR_TOML.format(dist=DIST_UNDERLAY, vip=VIP, server=SERVER, tms=entries, workers=workers)
        if auth_mode != "off":
            distributor = self.workers_auth(distributor, auth_mode)
        self.overlay.distributor_config.write_text(distributor)
        self.overlay.tm_config.write_text(TM_TOML.format(
            tm=TM_UNDERLAYS[0], dist=DIST_UNDERLAY, vip=VIP, server=SERVER, iperf=IPERF_PORT, echo=ECHO_PORT,
            sink=SINK_PORT))

    def workers_auth(self, distributor: str, mode: str) -> str:
        """The distributor's config with `[auth]` on, for one TM whose key is the distributor's own: the C
        sink echoes a sealed keepalive unchanged, and sealed from our key to our key it opens here again
        (sender and receiver key ids both ours, the one direction key of that pair), so health works without
        a TM agent. Every data datagram is sealed as it would be to a real TM."""
        from overlay import auth

        key = auth.generate_private_key()
        key_file = self.workdir / "bench-dist.key"
        key_file.write_text(auth.encode_key(key) + "\n")
        key_file.chmod(0o600)
        public = auth.encode_key(auth.public_key_of(key))
        assert distributor.count("[[tm]]\nname = ") == 1, "one TM: a key names one peer"
        distributor = distributor.replace('[[tm]]\nname = "tm1"\n', f'[[tm]]\nname = "tm1"\npublic_key = "{public}"\n')
        return distributor + f'\n[auth]\nmode = "{mode}"\nprivate_key_file = "{key_file}"\n'

    def start_agent(self, role: str, cpus: set[int]) -> subprocess.Popen:
        proc = self.overlay.start(role)
        pin(proc.pid, cpus)
        return proc

    def stop_agent(self, role: str) -> None:
        if role in self.overlay.procs:
            self.overlay.stop(role)
            del self.overlay.procs[role]

    def wait_tms_up(self, names: list[str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            up = self.tms_up()
            if set(names) <= up:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"TMs not up after {timeout}s: {sorted(up)} of {names}\n"
                                   f"{self.overlay.log('distributor')[-3000:]}")
            time.sleep(0.2)

    def tms_up(self) -> set[str]:
        status = self.overlay.status("distributor", check=False)
        return set((status.get("health") or {}).get("serving") or ())

    # floods ---------------------------------------------------------------------------------------------

    def flood_sample(self, subject_pid: int | list[int], ns: str, flood_args: list[str], sink: Sink,
                     warmup: float | None = None, seconds: float | None = None,
                     at_edges: Callable[[], Any] | None = None) -> Sample:
        """Flood for warmup + seconds; count at the sink over the last `seconds`; the subject's CPU meanwhile.
        `subject_pid` may be several processes (an agent and its workers): their CPU adds up, and each one's
        is in extra["proc_ns_by_pid"]. `at_edges`, when given, is called just before the window opens and
        just after it closes; what it returns is in extra["edges"]."""
        warmup = self.settings.warmup if warmup is None else warmup
        seconds = self.settings.seconds if seconds is None else seconds
        cpu = self.settings.subject_cpu
        pids = [subject_pid] if isinstance(subject_pid, int) else list(subject_pid)
        cpus = sorted(self.all_cpus)
        softirqd = kernel_thread(f"ksoftirqd/{cpu}")
        flood = self.processes.start([str(self.tools["flood"]), *flood_args, "-r", str(self.settings.offered_pps),
                                      "-t", f"{warmup + seconds + 0.3:.2f}"], ns=ns, stderr=subprocess.PIPE)
        edges = []
        try:
            pin(flood.pid, self.generator_cpus)
            time.sleep(warmup)
            if at_edges is not None:
                edges.append(at_edges())
            foreign0, drops0 = foreign_cpu_ticks(), udp_rcvbuf_errors(sink.proc.pid)
            count0, ns0 = sink.read()
            by_pid0, cores0 = procs_cpu([*pids, softirqd]), {c: core_times(c) for c in cpus}
            time.sleep(seconds)
            count1, ns1 = sink.read()
            by_pid1, cores1 = procs_cpu([*pids, softirqd]), {c: core_times(c) for c in cpus}
            foreign1, drops1 = foreign_cpu_ticks(), udp_rcvbuf_errors(sink.proc.pid)
            if at_edges is not None:
                edges.append(at_edges())
            out, err = flood.communicate(timeout=warmup + seconds + 15)
        finally:
            Processes.stop(flood)
        gone = [pid for pid in pids if pid not in by_pid0 or pid not in by_pid1]
        proc0 = tuple(sum(by_pid0[pid][i] for pid in pids if pid not in gone) for i in range(3))
        proc1 = tuple(sum(by_pid1[pid][i] for pid in pids if pid not in gone) for i in range(3))
        core0, core1 = cores0[cpu], cores1[cpu]
        words = out.decode().split()
        if len(words) < 6 or words[0] != "sent":
            raise RuntimeError(f"flood failed: {out.decode()} {err.decode()}")
        packets = count1 - count0
        window = (ns1 - ns0) / 1e9
        per_packet = max(packets, 1)
        busy, total = core1[0] - core0[0], core1[1] - core0[1]
        user, system = proc1[1] - proc0[1], proc1[2] - proc0[2]
        tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
        extra: dict[str, Any] = {
            "flood_errors": int(words[3]), "flood_stderr": err.decode().strip(), "sink_drops": drops1 - drops0,
            "foreign_cpu": foreign_ticks_between(foreign0, foreign1) * tick_ns / 1e9 / window, "window_s": window,
            "cores_busy": {str(c): (cores1[c][0] - cores0[c][0]) / max(cores1[c][1] - cores0[c][1], 1) for c in cpus}}
        extra["proc_ns_by_pid"] = {str(pid): by_pid1[pid][0] - by_pid0[pid][0] for pid in pids if pid not in gone}
        extra["pids_gone"] = gone
        # The subject core's softirq work that ran in its ksoftirqd, not in the subject's system calls.
        extra["ksoftirqd_ns"] = ((by_pid1[softirqd][0] - by_pid0[softirqd][0]) / per_packet
                                 if softirqd in by_pid0 and softirqd in by_pid1 else 0.0)
        if at_edges is not None:
            extra["edges"] = edges
        return Sample(
            pps=packets / window,
            core_ns=busy * tick_ns / per_packet,
            proc_ns=(proc1[0] - proc0[0]) / per_packet,
            user_share=user / max(user + system, 1),
            core_busy=busy / max(total, 1),
            generated_pps=int(words[1]) / float(words[5]),
            extra=extra,
        )

    def steer_rx(self, on: bool) -> None:
        """RPS: the receive side of every veth runs on the generator core (on), or where it arrives (off).
        On (--steer), the subject core no longer delivers the subject's output to the sink (another machine's
        work on a real network) but sends an IPI per batch the remote backlog takes: in this VM an x2APIC
        write, a VM exit, 9-15 % of a C baseline's time, and the rates turn bimodal (docs/performance.md)."""
        mask = f"{1 << self.settings.generator_cpu:x}" if on else "0"
        for role, device in (("client", "c0"), ("dist", "dout"), ("dist", "dund"), ("dist", "din"), ("tm", "tund"),
                             ("server", "s0")):
            in_ns(self.ns[role], "sh", "-c", f"echo {mask} > /sys/class/net/{device}/queues/rx-0/rps_cpus")


# -- the benchmarks -----------------------------------------------------------------------------------------


def alternate(round_index: int, pair: tuple[str, str]) -> tuple[str, str]:
    """The order of the two subjects in a round: flipped every round."""
    return pair if round_index % 2 == 0 else (pair[1], pair[0])


def report_progress(text: str) -> None:
    print(f"  {text}", flush=True)


def rotate(round_index: int, labels: tuple[str, ...]) -> tuple[str, ...]:
    """The order of the subjects in a round: rotated by one every round (for two: flipped, as `alternate`),
    so that over len(labels) rounds each subject has each place once."""
    shift = round_index % len(labels)
    return labels[shift:] + labels[:shift]


def run_pps(lab: Lab, name: str, subjects: dict[str, tuple[int, Callable[[], Sample]]],
            flags: Callable[[Sample], str] | None = None,
            progress: Callable[[Sample], str] | None = None) -> list[Result]:
    """Every subject once a round, in `rotate`'s order; `flags` (default `warnings`) judges each sample,
    `progress` adds to its progress line."""
    results = {label: Result(name, label, "pps") for label in subjects}
    labels = tuple(subjects)
    assert len(labels) >= 2
    width = max(18, *(len(label) for label in labels))
    for round_index in range(lab.settings.rounds):
        for label in rotate(round_index, labels):
            sample = subjects[label][1]()
            sample.extra["flags"] = (flags or warnings)(sample)
            results[label].values.append(sample.pps)
            results[label].samples.append(asdict(sample))
            core = f"core {sample.core_ns:>6,.0f} ns/pkt ({sample.core_busy:.0%} busy)  " if sample.core_ns >= 0 else ""
            report_progress(f"{name} round {round_index + 1}: {label:<{width}} {sample.pps:>9,.0f} pps  {core}"
                            f"proc {sample.proc_ns:>6,.0f} ns/pkt (user {sample.user_share:.0%})  "
                            f"{progress(sample) + '  ' if progress else ''}"
                            f"offered {sample.generated_pps:>9,.0f} pps{sample.extra['flags']}")
    return list(results.values())


def common_warnings(sample: Sample) -> list[str]:
    notes = []
    if sample.pps > 0.8 * sample.generated_pps:
        notes.append("not saturated: raise --offered")
    if sample.extra.get("sink_drops"):
        notes.append(f"sink dropped {sample.extra['sink_drops']:,}")
    if sample.extra.get("foreign_cpu", 0) > 0.05:
        notes.append(f"other processes used {sample.extra['foreign_cpu']:.0%} of a core")
    if sample.extra.get("pids_gone"):
        notes.append(f"subject process(es) {', '.join(map(str, sample.extra['pids_gone']))} exited in the window")
    return notes


def flagged(notes: list[str]) -> str:
    return "  (!) " + "; ".join(notes) if notes else ""


def warnings(sample: Sample) -> str:
    notes = common_warnings(sample)
    if sample.core_busy < 0.9:
        notes.append(f"subject core only {sample.core_busy:.0%} busy")
    elif sample.proc_ns < 0.85 * sample.core_ns:
        notes.append(f"the subject had only {sample.proc_ns / sample.core_ns:.0%} of its core")
    return flagged(notes)


DIST_FLOOD = ["udp", "-a", ",".join(FLOOD_SOURCES), "-p", "64", "-l", "64", "-g", "64"]


def start_dist_loop(lab: Lab, tun: str, vip: str, *options: str) -> subprocess.Popen:
    """benchmarks/c/dist_loop.c on its own TUN in the dist namespace, `vip` routed into it, pinned to the
    subject core."""
    ns = lab.ns["dist"]
    loop = lab.processes.start([str(lab.tools["dist_loop"]), *options, "-s", "1800", tun, DIST_UNDERLAY,
                                *TM_UNDERLAYS], ns=ns)
    wait_ready(loop, f"dist_loop {' '.join(options)}")
    pin(loop.pid, lab.subject_cpus)
    in_ns(ns, "ip", "link", "set", tun, "up")
    in_ns(ns, "ip", "route", "add", f"{vip}/32", "dev", tun)
    return loop


def bench_distributor(lab: Lab) -> list[Result]:
    """The agent against two C loops: dist_loop (a sendmmsg of one message per datagram, the stick of
    issue 10) and dist_loop -g (each TM's runs of a batch as UDP GSO messages, as the agent sends them)."""
    ns, tools, processes = lab.ns, lab.tools, lab.processes
    sink = Sink(processes, tools["sink"], ns["tm"], [f"{address}:4754" for address in TM_UNDERLAYS])
    loops: list[subprocess.Popen] = []
    try:
        lab.write_configs(tms=3)
        agent = lab.start_agent("distributor", lab.subject_cpus)
        lab.wait_tms_up(["tm1", "tm2", "tm3"])
        loops.append(start_dist_loop(lab, "benchdl0", LOOP_VIP))
        loops.append(start_dist_loop(lab, "benchdg0", GSO_LOOP_VIP, "-g"))
        plain, gso = loops

        def product() -> Sample:
            sample = lab.flood_sample(agent.pid, ns["client"], [*DIST_FLOOD, "-d", f"{VIP}:{SINK_PORT}"], sink)
            sample.extra["tms_up"] = sorted(lab.tms_up())
            return sample

        def baseline() -> Sample:
            return lab.flood_sample(plain.pid, ns["client"], [*DIST_FLOOD, "-d", f"{LOOP_VIP}:{SINK_PORT}"], sink)

        def gso_baseline() -> Sample:
            return lab.flood_sample(gso.pid, ns["client"], [*DIST_FLOOD, "-d", f"{GSO_LOOP_VIP}:{SINK_PORT}"], sink)

        results = run_pps(lab, "distributor", {"distributor agent": (agent.pid, product),
                                               "dist_loop (C)": (plain.pid, baseline),
                                               GSO_LOOP: (gso.pid, gso_baseline)})
        results[0].ratio = ("distributor agent", "dist_loop (C)")
        results[2].ratio = ("distributor agent", GSO_LOOP)
        return results
    finally:
        for loop in loops:
            Processes.stop(loop)
            out = loop.stdout.read().decode().split() if loop.stdout else []
            if "gso_messages" in out:   # "rx N tx N dropped N gso_messages N gso_refused N"
                counts = dict(zip(out[::2], out[1::2]))
                report_progress(f"dist_loop -g, all rounds: {int(counts['tx']):,} datagrams in "
                                f"{int(counts['gso_messages']):,} GSO messages (and single datagrams); runs the "
                                f"kernel refused (sent plain): {counts['gso_refused']}")
        lab.stop_agent("distributor")
        sink.close()


WORKER_COUNTS = (1, 2)


def wait_workers(lab: Lab, count: int, timeout: float = 20) -> dict[int, int]:
    """{worker index: PID} once the agent reports all `count` packet loops running (0: the agent itself)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = lab.overlay.status("distributor", check=False).get("workers") or {}
        pids = {int(index): pid for index, pid in (workers.get("pids") or {}).items()}
        if workers.get("running") == count and len(pids) == count - 1:
            return {0: lab.overlay.procs["distributor"].pid, **pids}
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not running after {timeout}s: {workers}\n"
                               f"{lab.overlay.log('distributor')[-3000:]}")
        time.sleep(0.2)


def worker_counts(lab: Lab) -> dict[str, Any]:
    """From the agent's /status: what each packet loop has read so far (TUN packets + underlay datagrams),
    the agent's own (its counters less the workers' it adds in) and each worker's as last reported (they
    report every second: `age` says how long ago), and when."""
    before = time.monotonic()
    status = lab.overlay.status("distributor", check=False)
    at = (before + time.monotonic()) / 2
    counters, workers = status.get("counters") or {}, status.get("workers") or {}
    reported = {index: packets for index, packets in (workers.get("packets") or {}).items()}
    total = counters.get("tun_rx_packets", 0) + counters.get("udp_rx_datagrams", 0)
    loops = {"0": (total - sum(reported.values()), 0.0)}
    for index, packets in reported.items():
        loops[index] = (packets, (workers.get("stats_age_s") or {}).get(index, 0.0))
    return {"at": at, "loops": loops, "running": workers.get("running", 1), "restarts": workers.get("restarts", 0)}


def worker_shares(edges: list[dict[str, Any]]) -> dict[str, float]:
    """Each packet loop's share of the packets read in the window: its rate between its two reports (a
    worker's report is `age` old, so its interval is its own), over the sum of the rates."""
    start, end = edges
    rates = {}
    for index, (packets1, age1) in end["loops"].items():
        if index not in start["loops"]:
            continue
        packets0, age0 = start["loops"][index]
        interval = (end["at"] - age1) - (start["at"] - age0)
        rates[index] = (packets1 - packets0) / interval if interval > 0 else 0.0
    total = sum(rates.values())
    return {index: rate / total if total else 0.0 for index, rate in sorted(rates.items())}


def workers_flags(sample: Sample) -> str:
    """The usual checks; with several workers the subject core is process 0's (the agent's) alone, and a
    worker that restarted or stopped in the window spoils the sample."""
    info = sample.extra["workers"]
    if info["count"] == 1:
        return warnings(sample)
    notes = common_warnings(sample)
    # Below 90 % is expected here: while worker 1 holds the generator core, nothing new reaches the TUN
    # queues and process 0 drains its own and waits (91-96 % busy in docs/performance.md's run).
    if sample.core_busy < 0.8:
        notes.append(f"subject core only {sample.core_busy:.0%} busy")
    elif info["cpu"].get("0", 0.0) < 0.85 * sample.core_busy:
        notes.append(f"process 0 had only {info['cpu'].get('0', 0.0) / sample.core_busy:.0%} of its core")
    if info["running"] != info["count"] or info["restarted"]:
        notes.append(f"workers running {info['running']} of {info['count']}, restarts {info['restarted']}")
    return flagged(notes)


def workers_progress(sample: Sample) -> str:
    info = sample.extra["workers"]
    if info["count"] == 1:
        return ""
    shares = " ".join(f"w{index} {share:.0%}" for index, share in info["shares"].items())
    cpu = " ".join(f"w{index} {used:.0%}" for index, used in info["cpu"].items())
    generator = sample.extra["cores_busy"].get(str(info["generator_cpu"]), 0.0)
    return f"shares {shares}; CPU {cpu} of a core; CPU {info['generator_cpu']} busy {generator:.0%}"


def bench_workers(lab: Lab) -> list[Result]:
    """The distributor agent with [node] workers = 1 and = 2 under the distributor benchmark's flood. A fresh
    agent for every sample (the count is a start-up setting). workers = 1: the agent on the subject core,
    as in `distributor`. workers = 2: process 0 (the agent: packets, and the control work: health probes,
    status, the workers' counters) on the subject core, worker 1 on the generator core, which it shares
    with the flood, the sink, this harness and the kernel's forwarding of the flood into the TUN. CPU per
    packet: every process of the agent (schedstat), over the packets the sink counted."""
    ns, tools, processes = lab.ns, lab.tools, lab.processes
    sink = Sink(processes, tools["sink"], ns["tm"], [f"{address}:4754" for address in TM_UNDERLAYS])
    subject, generator = lab.settings.subject_cpu, lab.settings.generator_cpu

    auth_mode = lab.settings.auth
    tms = ["tm1", "tm2", "tm3"] if auth_mode == "off" else ["tm1"]

    def sample_with(count: int) -> Sample:
        lab.write_configs(tms=len(tms), workers=count, auth_mode=auth_mode)
        agent = lab.start_agent("distributor", lab.subject_cpus)
        try:
            lab.wait_tms_up(tms)
            loops = wait_workers(lab, count)
            # Process 0 and whatever else the agent started (multiprocessing's resource tracker) on the
            # subject core; worker 1 (and any further) on the generator core.
            others = [pid for pid in descendants(agent.pid) if pid not in loops.values()]
            for pid in [agent.pid, *others]:
                pin(pid, lab.subject_cpus)
            for index, pid in loops.items():
                if index:
                    pin(pid, lab.generator_cpus)
            pids = [agent.pid, *others, *(pid for index, pid in sorted(loops.items()) if index)]
            sample = lab.flood_sample(pids, ns["client"], [*DIST_FLOOD, "-d", f"{VIP}:{SINK_PORT}"], sink,
                                      at_edges=(lambda: worker_counts(lab)) if count > 1 else None)
        finally:
            lab.stop_agent("distributor")
        window = sample.extra["window_s"] * 1e9
        by_pid = sample.extra["proc_ns_by_pid"]
        cpu = {str(index): by_pid.get(str(pid), 0) / window for index, pid in sorted(loops.items())}
        cpu["0"] += sum(by_pid.get(str(pid), 0) for pid in others) / window
        info: dict[str, Any] = {"count": count, "pids": {str(i): pid for i, pid in loops.items()}, "others": others,
                                "cpu": cpu, "subject_cpu": subject, "generator_cpu": generator,
                                "placement": {"0": subject, **{str(i): generator for i in loops if i}}}
        if count > 1:
            edges = sample.extra.pop("edges")
            info.update(shares=worker_shares(edges), running=edges[1]["running"],
                        restarted=edges[1]["restarts"] - edges[0]["restarts"])
            # The subject core is process 0's alone: its busy time per packet would be half a picture.
            sample.core_ns = -1.0
        else:
            info.update(shares={"0": 1.0}, running=1, restarted=0)
        sample.extra["workers"] = info
        return sample

    try:
        subjects: dict[str, tuple[int, Callable[[], Sample]]] = {
            f"workers = {count}{'' if auth_mode == 'off' else ', auth'}": (0, functools.partial(sample_with, count))
            for count in WORKER_COUNTS}
        results = run_pps(lab, "workers", subjects, flags=workers_flags, progress=workers_progress)
        results[1].ratio = (results[1].subject, results[0].subject)
        return results
    finally:
        lab.stop_agent("distributor")
        sink.close()


def bench_tm(lab: Lab) -> list[Result]:
    ns, tools, processes = lab.ns, lab.tools, lab.processes
    sink = Sink(processes, tools["sink"], ns["dist"], [f"{DIST_UNDERLAY}:4754"])
    relay = None
    try:
        lab.write_configs(tms=1)
        agent = lab.start_agent("tm", lab.subject_cpus)
        relay = processes.start([str(tools["tm_relay"]), "-s", "1800", f"{RELAY_UNDERLAY}:4754",
                                 f"{DIST_UNDERLAY}:4754", f"udp:{VIP}:{SINK_PORT}={SERVER}:{SINK_PORT}"],
                                ns=ns["tm"])
        wait_ready(relay, "tm_relay")
        pin(relay.pid, lab.subject_cpus)
        flood = ["gre", "-b", DIST_UNDERLAY, "-v", f"{VIP}:{SINK_PORT}", "-f", "4096", "-l", "64", "-g", "64"]
        product_flood = [*flood, "-d", f"{TM_UNDERLAYS[0]}:4754"]
        baseline_flood = [*flood, "-d", f"{RELAY_UNDERLAY}:4754"]
        # Warm-up: the first packet of each of the 4,096 flows opens it; from then on every flow is established.
        for pid, args in ((agent.pid, product_flood), (relay.pid, baseline_flood)):
            lab.flood_sample(pid, ns["dist"], args, sink, warmup=0.2, seconds=max(lab.settings.warmup, 0.5))

        def product() -> Sample:
            sample = lab.flood_sample(agent.pid, ns["dist"], product_flood, sink)
            status = lab.overlay.status("tm", check=False)
            sample.extra["tm_status_keys"] = sorted(status)[:20]
            return sample

        def baseline() -> Sample:
            return lab.flood_sample(relay.pid, ns["dist"], baseline_flood, sink)

        return run_pps(lab, "tm", {"TM agent": (agent.pid, product), "tm_relay (C)": (relay.pid, baseline)})
    finally:
        if relay is not None:
            Processes.stop(relay)
        lab.stop_agent("tm")
        sink.close()


@contextlib.contextmanager
def both_agents(lab: Lab) -> Iterator[None]:
    """Distributor (one TM) and TM agent up, not pinned: the end-to-end benchmarks."""
    lab.write_configs(tms=1)
    try:
        lab.start_agent("tm", lab.all_cpus)
        lab.start_agent("distributor", lab.all_cpus)
        lab.wait_tms_up(["tm1"])
        yield
    finally:
        lab.stop_agent("distributor")
        lab.stop_agent("tm")


def iperf_once(lab: Lab, target: str, streams: int) -> float:
    """Gbit/s received by the server in one iperf3 run of `streams` TCP streams."""
    ns, seconds = lab.ns, lab.settings.iperf_seconds
    server = lab.processes.start(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], ns=ns["server"])
    try:
        deadline = time.monotonic() + 5
        while f":{IPERF_PORT} " not in in_ns(ns["server"], "ss", "-Hltn"):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server not listening")
            time.sleep(0.05)
        omit = ["-O", "1"] if seconds >= 3 else []
        result = subprocess.run(["ip", "netns", "exec", ns["client"], "iperf3", "-c", target, "-p", str(IPERF_PORT),
                                 "-t", str(seconds), "-P", str(streams), "-J", "--connect-timeout", "3000", *omit],
                                capture_output=True, text=True, timeout=seconds + 30)
        report = json.loads(result.stdout or "{}")
        if "error" in report or "end" not in report:
            raise RuntimeError(f"iperf3 to {target} failed: {report.get('error', result.stderr.strip())}")
        return report["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        Processes.stop(server)


def bench_iperf(lab: Lab) -> list[Result]:
    results: list[Result] = []
    with both_agents(lab):
        for streams in (1, 4):
            name = f"iperf3 TCP x{streams}"
            paths = {"overlay": VIP, "kernel": KERNEL_VIP}
            rows = {label: Result(name, label, "Gbit/s") for label in paths}
            for round_index in range(lab.settings.rounds):
                for label in alternate(round_index, ("overlay", "kernel")):
                    gbps = iperf_once(lab, paths[label], streams)
                    rows[label].values.append(gbps)
                    report_progress(f"{name} round {round_index + 1}: {label:<8} {gbps:6.2f} Gbit/s")
            results.extend(rows.values())
    return results


def rtt_once(lab: Lab, target: str) -> dict:
    count = lab.settings.rtt_count
    result = subprocess.run(["ip", "netns", "exec", lab.ns["client"], sys.executable, "-m", "benchmarks.pingpong",
                             "client", f"{target}:{ECHO_PORT}", "--count", str(count), "--warmup", "100",
                             "--timeout", "0.2", "--seconds", "30"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"pingpong client failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def bench_rtt(lab: Lab) -> list[Result]:
    server = lab.processes.start([sys.executable, "-m", "benchmarks.pingpong", "server", f"{SERVER}:{ECHO_PORT}",
                                  f"{KERNEL_SERVER}:{ECHO_PORT}", "--seconds", "1800"], ns=lab.ns["server"], cwd=ROOT)
    try:
        wait_ready(server, "pingpong server")
        with both_agents(lab):
            paths = {"overlay": VIP, "kernel": KERNEL_VIP}
            rows = {(label, q): Result(f"UDP RTT {q}", label, "µs") for label in paths for q in ("p50", "p99")}
            for round_index in range(lab.settings.rounds):
                for label in alternate(round_index, ("overlay", "kernel")):
                    rtt = rtt_once(lab, paths[label])
                    for q in ("p50", "p99"):
                        rows[(label, q)].values.append(rtt[f"{q}_us"])
                        rows[(label, q)].samples.append(rtt)
                    report_progress(f"rtt round {round_index + 1}: {label:<8} p50 {rtt['p50_us']:7.1f} µs  "
                                    f"p99 {rtt['p99_us']:7.1f} µs  ({rtt['round_trips']} round trips, "
                                    f"{rtt['lost']} lost)")
            return [rows[key] for key in sorted(rows, key=lambda k: (k[1], k[0] != "overlay"))]
    finally:
        Processes.stop(server)


# -- profile ------------------------------------------------------------------------------------------------

# Builtins that are (batches of) system calls. The event loop's own C code (uvloop, epoll) is not in the
# profile: profiling starts inside the loop, and cProfile sees only the Python callbacks it makes.
IO_WORDS = ("send", "recv", "readv", "read_batch", "write")


def perf_profile(lab: Lab, pid: int, flood_ns: str, flood_args: list[str], name: str, sink: Sink) -> dict | None:
    """perf(1) samples (cpu-clock, 499 Hz) of the subject core under the flood, the subject's own only (its
    system calls and the softirq work done in them included; idle time excluded): the shares of the kernel,
    the interpreter, libc and extensions, and the top symbols. perf costs the run some rate (reported);
    the shares are the point. None where perf is missing or refused."""
    if shutil.which("perf") is None:
        return None
    seconds = lab.settings.seconds
    data = lab.workdir / f"{name}.perf"
    flood = lab.processes.start([str(lab.tools["flood"]), *flood_args, "-r", str(lab.settings.offered_pps), "-t",
                                 f"{seconds + 1:.2f}"], ns=flood_ns)
    try:
        pin(flood.pid, lab.generator_cpus)
        time.sleep(0.5)
        count0, ns0 = sink.read()
        record = subprocess.run(["perf", "record", "-q", "-F", "499", "-e", "cpu-clock", "-C", str(lab.settings.subject_cpu),
                                 "-o", str(data), "--", "sleep", str(seconds)], capture_output=True, text=True,
                                timeout=seconds + 30)
        count1, ns1 = sink.read()
        out, _ = flood.communicate(timeout=seconds + 10)
    finally:
        Processes.stop(flood)
    if record.returncode != 0 or not data.exists():
        return None

    report = subprocess.run(["perf", "report", "-i", str(data), "--pid", str(pid), "--no-children", "--sort",
                             "dso,sym", "--stdio"], capture_output=True, text=True, timeout=60).stdout
    symbols: list[tuple[float, str]] = []
    for line in report.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].endswith("%") and not line.startswith("#"):
            symbols.append((float(words[0].rstrip("%")), " ".join(words[1:])))
    by_binary: dict[str, float] = {}
    for share, name in symbols:   # "libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault": the binary comes first
        by_binary[name.split()[0]] = by_binary.get(name.split()[0], 0.0) + share
    dso = sorted(((share, name) for name, share in by_binary.items()), reverse=True)[:6]
    return {"dso": dso, "symbols": symbols[:14], "flood": out.decode().strip(),
            "pps_under_perf": (count1 - count0) / ((ns1 - ns0) / 1e9)}


def profile_agent(lab: Lab, role: str, flood_ns: str, flood_args: list[str], sink: Sink) -> dict:
    """One agent (benchmarks/profile_agent.py) under a flood, cProfile on for `profile_seconds` of steady state;
    returns where its time went."""
    ns = lab.ns["dist"] if role == "distributor" else lab.ns["tm"]
    config = lab.overlay.distributor_config if role == "distributor" else lab.overlay.tm_config
    out = lab.workdir / f"{role}.prof"
    log = open(lab.workdir / f"{role}.log", "ab")
    proc = lab.processes.start([sys.executable, "-m", "benchmarks.profile_agent", str(out), role, "--config",
                                str(config), "--log-format", "json"], ns=ns, capture=False, stderr=log, cwd=ROOT)
    log.close()
    lab.overlay.procs[role] = proc   # so wait_ready, status and stop_agent know it
    lab.overlay.wait_ready(role)
    pin(proc.pid, lab.subject_cpus)
    if role == "distributor":
        lab.wait_tms_up(["tm1", "tm2", "tm3"])
    else:   # open the flows first: the profile is of established ones
        lab.flood_sample(proc.pid, flood_ns, flood_args, sink, warmup=0.2, seconds=0.5)
    unprofiled = lab.flood_sample(proc.pid, flood_ns, flood_args, sink, warmup=0.5, seconds=lab.settings.seconds)
    perf = perf_profile(lab, proc.pid, flood_ns, flood_args, role, sink)
    seconds = lab.settings.profile_seconds
    flood = lab.processes.start([str(lab.tools["flood"]), *flood_args, "-r", str(lab.settings.offered_pps), "-t",
                                 f"{seconds + 1.5:.2f}"], ns=flood_ns)
    try:
        pin(flood.pid, lab.generator_cpus)
        time.sleep(0.5)
        count0, ns0 = sink.read()
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(seconds)
        os.kill(proc.pid, signal.SIGUSR2)
        count1, ns1 = sink.read()
        flood.wait(seconds + 10)
    finally:
        Processes.stop(flood)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)   # dump_stats finishes writing
    lab.stop_agent(role)
    stats = pstats.Stats(str(out))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), (_cc, calls, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, calls, f"{Path(filename).name}:{line}({function})" if line else function))
    rows.sort(reverse=True)
    builtin = [(t, name) for t, _, name in rows if name.startswith(("<", "{"))]
    io = sum(t for t, name in builtin if any(word in name for word in IO_WORDS))
    return {"role": role, "pps": unprofiled.pps, "proc_ns": unprofiled.proc_ns, "user_share": unprofiled.user_share,
            "pps_under_profiler": (count1 - count0) / ((ns1 - ns0) / 1e9), "profiled_seconds": total,
            "io_share": io / total if total else 0.0, "perf": perf,
            "top": [{"tottime_s": round(t, 4), "share": round(t / total, 4) if total else 0, "calls": calls,
                     "function": name} for t, calls, name in rows[:20]]}


def bench_profile(lab: Lab) -> list[dict]:
    ns, tools, processes = lab.ns, lab.tools, lab.processes
    reports = []
    lab.write_configs(tms=3)
    sink = Sink(processes, tools["sink"], ns["tm"], [f"{address}:4754" for address in TM_UNDERLAYS])
    loop = None
    try:
        flood = ["udp", "-a", ",".join(FLOOD_SOURCES), "-p", "64", "-l", "64", "-g", "64"]
        reports.append(profile_agent(lab, "distributor", ns["client"], [*flood, "-d", f"{VIP}:{SINK_PORT}"], sink))
        loop = processes.start([str(tools["dist_loop"]), "-s", "600", "benchdl0", DIST_UNDERLAY, *TM_UNDERLAYS],
                               ns=ns["dist"])
        wait_ready(loop, "dist_loop")
        pin(loop.pid, lab.subject_cpus)
        in_ns(ns["dist"], "ip", "link", "set", "benchdl0", "up")
        in_ns(ns["dist"], "ip", "route", "add", f"{LOOP_VIP}/32", "dev", "benchdl0")
        reports.append({"role": "dist_loop (C)",
                        "perf": perf_profile(lab, loop.pid, ns["client"], [*flood, "-d", f"{LOOP_VIP}:{SINK_PORT}"],
                                             "dist_loop", sink)})
    finally:
        if loop is not None:
            Processes.stop(loop)
        sink.close()
    lab.write_configs(tms=1)
    sink = Sink(processes, tools["sink"], ns["dist"], [f"{DIST_UNDERLAY}:4754"])
    relay = None
    try:
        flood = ["gre", "-b", DIST_UNDERLAY, "-v", f"{VIP}:{SINK_PORT}", "-f", "4096", "-l", "64", "-g", "64"]
        reports.append(profile_agent(lab, "tm", ns["dist"], [*flood, "-d", f"{TM_UNDERLAYS[0]}:4754"], sink))
        relay = processes.start([str(tools["tm_relay"]), "-s", "600", f"{RELAY_UNDERLAY}:4754", f"{DIST_UNDERLAY}:4754",
                                 f"udp:{VIP}:{SINK_PORT}={SERVER}:{SINK_PORT}"], ns=ns["tm"])
        wait_ready(relay, "tm_relay")
        pin(relay.pid, lab.subject_cpus)
        reports.append({"role": "tm_relay (C)",
                        "perf": perf_profile(lab, relay.pid, ns["dist"], [*flood, "-d", f"{RELAY_UNDERLAY}:4754"],
                                             "tm_relay", sink)})
    finally:
        if relay is not None:
            Processes.stop(relay)
        sink.close()
    return reports


# -- reporting ----------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    mean = statistics.fmean(values)
    return f"±{statistics.pstdev(values) / mean:.1%}" if mean else ""


def ratio_line(product: Result, baseline: Result) -> str:
    per_round = [p / b for p, b in zip(product.values, baseline.values) if b]
    ratio = product.median / baseline.median if baseline.median else float("nan")
    rounds = f" (per round {min(per_round):.2f}–{max(per_round):.2f})" if per_round else ""
    if product.samples and baseline.samples and "flags" in product.samples[0].get("extra", {}):
        clean = [p / b for p, b, ps, bs in zip(product.values, baseline.values, product.samples, baseline.samples)
                 if b and not ps["extra"]["flags"] and not bs["extra"]["flags"]]
        if len(clean) < len(per_round):
            rounds += (f"; rounds without (!): {len(clean)}, median ratio {statistics.median(clean):.2f}" if clean
                       else "; every round had (!)")
    return f"{ratio:.2f}{rounds}"


def print_table(results: list[Result]) -> None:
    print("\n| benchmark | subject | median | rounds (spread) | core ns/pkt | proc ns/pkt | user | ratio |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    by_benchmark: dict[str, list[Result]] = {}
    for result in results:
        by_benchmark.setdefault(result.benchmark, []).append(result)
    for benchmark, rows in by_benchmark.items():
        product, baseline = rows[0], rows[1] if len(rows) > 1 else None
        by_label = {row.subject: row for row in rows}
        explicit = any(row.ratio for row in rows)
        for row in rows:
            fmt = "{:,.0f}" if row.unit == "pps" else "{:.2f}" if row.unit == "Gbit/s" else "{:.1f}"
            median = fmt.format(row.median) + f" {row.unit}"
            values = " ".join(fmt.format(v) for v in row.values)
            core = proc = user = ""
            if row.samples and "core_ns" in row.samples[0]:
                measured = [s["core_ns"] for s in row.samples if s["core_ns"] >= 0]
                core = f"{statistics.median(measured):,.0f}" if measured else "—"
                proc = f"{statistics.median(s['proc_ns'] for s in row.samples):,.0f}"
                user = f"{statistics.median(s['user_share'] for s in row.samples):.0%}"
            if explicit:
                ratio = ""
                if row.ratio:
                    numerator, denominator = row.ratio
                    ratio = ratio_line(by_label[numerator], by_label[denominator])
                    if row.subject != numerator:
                        ratio += f" ({numerator} / {denominator})"
            else:
                ratio = ratio_line(product, baseline) if row is product and baseline is not None else ""
            print(f"| {benchmark} | {row.subject} | {median} | {values} ({spread(row.values)}) | {core} | {proc} | "
                  f"{user} | {ratio} |")
    print("\nratio: product / baseline medians (per-round ratios in brackets); for RTT, overlay / kernel "
          "(how many times longer); for workers, workers = 2 / workers = 1 (the scaling).")
    if "workers" in by_benchmark:
        print_workers(by_benchmark["workers"])


def print_workers(rows: list[Result]) -> None:
    """The workers benchmark beyond the table: scaling, efficiency, the shares and where the CPU went."""
    one, two = rows[0], rows[1]
    if not one.values or not two.values:
        return
    per_round = [b["proc_ns"] / a["proc_ns"] for a, b in zip(one.samples, two.samples) if a["proc_ns"]]
    efficiency = (statistics.median(s["proc_ns"] for s in two.samples)
                  / statistics.median(s["proc_ns"] for s in one.samples))
    print(f"\nworkers: scaling (packets/s, workers = 2 / workers = 1) {ratio_line(two, one)}")
    print(f"workers: efficiency (CPU ns per packet of all the agent's processes, workers = 2 / workers = 1) "
          f"{efficiency:.2f} (per round {min(per_round):.2f}–{max(per_round):.2f}); 1.0: each packet costs the same, "
          f"the rate grows with the CPU the agent gets")
    info = two.samples[0]["extra"]["workers"]
    print(f"workers: where: workers = 1, the agent on CPU {info['subject_cpu']}; workers = 2, process 0 (the agent: "
          f"packets, health probes, status, the workers' counters) on CPU {info['subject_cpu']}, worker 1 on CPU "
          f"{info['generator_cpu']}, shared with the generator (flood), the sink, this harness and the kernel's "
          f"forwarding of the flood into the TUN — so workers = 2 had less than two cores, and the generator less "
          f"than one")
    for round_index, sample in enumerate(two.samples):
        extra = sample["extra"]
        w = extra["workers"]
        shares = ", ".join(f"w{index} {share:.1%}" for index, share in w["shares"].items())
        cpu = ", ".join(f"w{index} {used:.0%}" for index, used in w["cpu"].items())
        generator = extra["cores_busy"].get(str(w["generator_cpu"]), 0.0)
        print(f"  round {round_index + 1}, workers = 2: packets read {shares}; CPU {cpu} of a core; CPU "
              f"{w['generator_cpu']} busy {generator:.0%}; the generator sent {sample['generated_pps']:,.0f} pps "
              f"(its cap: --offered){extra['flags']}")


def print_perf(perf: dict | None) -> None:
    if not perf:
        print("  (no perf profile: perf(1) missing or not permitted)")
        return
    print(f"  perf ({perf['pps_under_perf']:,.0f} pps meanwhile), the subject core by binary: "
          + ", ".join(f"{name} {share:.1f}%" for share, name in perf["dso"]))
    for share, name in perf["symbols"]:
        print(f"  {share:5.1f}%  {name}")


def print_profile(reports: list[dict]) -> None:
    for report in reports:
        if "top" not in report:
            print(f"\n{report['role']}:")
            print_perf(report["perf"])
            continue
        print(f"\n{report['role']} agent: {report['pps']:,.0f} pps, {report['proc_ns']:,.0f} ns/pkt of its own CPU, "
              f"{report['user_share']:.0%} in user mode (Python and C extensions), the rest in the kernel (system "
              f"calls and the stack below them). Under cProfile ({report['pps_under_profiler']:,.0f} pps, "
              f"{report['profiled_seconds']:.1f} s profiled): I/O builtins {report['io_share']:.0%}, the rest (Python "
              f"code and the builtins it calls) {1 - report['io_share']:.0%}; by own time:")
        for row in report["top"]:
            print(f"  {row['share']:6.1%}  {row['calls']:>10,}  {row['function']}")
        print_perf(report.get("perf"))


def git_state() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "overlay"], capture_output=True,
                           text=True)
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" + uncommitted overlay/ changes: {', '.join(changed)}" if changed else "")


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


# -- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    parser.add_argument("--rounds", type=int, help="rounds of product vs baseline (default 5, --quick 2)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated: {', '.join(EVERYTHING)} (default: {','.join(BENCHMARKS)})")
    parser.add_argument("--subject-cpu", type=int, default=1, help="the core the subject is pinned to (default 1)")
    parser.add_argument("--generator-cpu", type=int, default=0, help="the core the generator and sink use")
    parser.add_argument("--offered", type=int, default=800_000,
                        help="the generator's rate cap in packets/s (default 800000; 0: as fast as it can)")
    parser.add_argument("--steer", action="store_true",
                        help="RPS: the kernel's receive work on the generator core during the packet-rate benchmarks "
                             "(default: where it lands; docs/performance.md compares both)")
    parser.add_argument("--auth", choices=("off", "authenticate"), default="off",
                        help="workers: the distributor with [auth] on (one TM keyed with its own key, so the "
                             "sink's echoes open; every datagram sealed, per-packet Python instead of the C path)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, profiles)")
    args = parser.parse_args(argv)
    names = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = names - set(EVERYTHING)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(EVERYTHING)}")
    args.names = names
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    common = {"subject_cpu": args.subject_cpu, "generator_cpu": args.generator_cpu, "offered_pps": args.offered,
              "steer_rx": args.steer, "auth": args.auth}
    if args.quick:
        return Settings(rounds=args.rounds or 2, warmup=0.4, seconds=1.0, iperf_seconds=1, rtt_count=2000,
                        profile_seconds=2.0, **common)
    return Settings(rounds=args.rounds or 5, warmup=1.0, seconds=3.0, iperf_seconds=4, rtt_count=10000,
                    profile_seconds=5.0, **common)


def run(args: argparse.Namespace) -> int:
    preflight(args.names)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.runtime.lab import namespaces

    settings = settings_for(args)
    workdir = Path(tempfile.mkdtemp(prefix="overlay-bench-"))
    started = datetime.datetime.now().astimezone()
    print(f"overlay benchmarks, {started:%Y-%m-%d %H:%M %Z}; {machine()}")
    print(f"product: {git_state()}")
    print(f"subject CPU {settings.subject_cpu}, generator CPU {settings.generator_cpu}; {settings.rounds} rounds; "
          f"offered {settings.offered_pps:,} pps; receive work {'steered to the generator core' if settings.steer_rx else 'where it lands'}; "
          f"work dir {workdir}")
    load = os.getloadavg()
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} before the run: numbers are only comparable on a quiet machine")
    processes = Processes()
    results: list[Result] = []
    profiles: list[dict] = []
    durations: dict[str, float] = {}
    # The harness and everything it starts run on the generator core; subjects are moved to theirs.
    os.sched_setaffinity(0, {settings.generator_cpu})
    try:
        tools = build_c(workdir)
        with namespaces("client", "dist", "tm", "server") as ns:
            build_lab(ns)
            lab = Lab(ns, workdir, tools, settings, processes)
            try:
                lab.steer_rx(settings.steer_rx)
                for name, bench in (("distributor", bench_distributor), ("workers", bench_workers), ("tm", bench_tm)):
                    if name in args.names:
                        print(f"\n[{name}]", flush=True)
                        section = time.monotonic()
                        results.extend(bench(lab))
                        durations[name] = time.monotonic() - section
                lab.steer_rx(False)
                os.sched_setaffinity(0, lab.all_cpus)   # end to end: nothing pinned, no steering
                for name, bench in (("iperf", bench_iperf), ("rtt", bench_rtt)):
                    if name in args.names:
                        print(f"\n[{name}]", flush=True)
                        section = time.monotonic()
                        results.extend(bench(lab))
                        durations[name] = time.monotonic() - section
                if "profile" in args.names:
                    print("\n[profile]", flush=True)
                    lab.steer_rx(settings.steer_rx)
                    os.sched_setaffinity(0, {settings.generator_cpu})
                    section = time.monotonic()
                    profiles = bench_profile(lab)
                    durations["profile"] = time.monotonic() - section
            finally:
                for role in list(lab.overlay.procs):
                    lab.stop_agent(role)
                processes.stop_all()
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    if results:
        print_table(results)
    if profiles:
        print_profile(profiles)
    print(f"\n{elapsed:.0f} s in all" + (" (" + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())
                                         + ")" if durations else ""))
    if args.json:
        args.json.write_text(json.dumps({"date": started.isoformat(), "machine": machine(), "product": git_state(),
                                         "settings": asdict(settings), "results": [asdict(r) for r in results],
                                         "profiles": profiles}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as error:
        print(f"benchmarks: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
