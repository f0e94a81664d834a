"""Issue 12's lab proofs with real agents and real UDP: fragments through NAT TMs, UDP through a drain.

- Fragments: DNS-sized (3 KB) and 8 KB UDP datagrams, IPv4 and IPv6, from clients to the VIP's UDP echo
  service (DNAT) and from the servers to remote hosts (SNAT): the kernel fragments them, the TMs
  translate every fragment, the receiver reassembles them, the echo comes back whole. Negative control:
  the same harness against a port with no service counts every datagram lost.
- Drain: steady UDP flows (each a fixed source port, some datagrams fragmented) through the TM being
  drained, both client → VIP and server → remote: every flow keeps its server and its public source and
  loses nothing; new UDP flows from the drained TM's clients open on their new TM (the draining TM
  declines them). Negative control: `disable` instead of `drain` moves the source-NATed flows to
  another TM's public source.

The UDP echo service (`overlay.lab.udpecho`) answers with who it is and the source it saw, so each reply
says which server a flow reached and which public source a NATed flow left with. Where a flow lands is
computed by the distributor's own core on the lab's config.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from overlay.config import load_node_config
from overlay.distributor.core import Distributor
from overlay.lab import nsnet, topology, udpecho
from overlay.lab.lab import Lab, unavailable_reason
from tests.tm.packets import udp

from .conftest import lab_config_with_admin_token, lab_prefix, lab_running

pytestmark = pytest.mark.lab

LAB_UNAVAILABLE = unavailable_reason()
TOKEN = "issue12-admin-token-0123456789abcdef"
STATUS = f"http://127.0.0.1:{topology.STATUS_PORT}"
ECHO_PORT = 5300       # the VIP's UDP service
NO_SERVICE_PORT = 5301
REMOTE_PORT = 5400     # the remote host's echo, for server-originated (SNAT) flows
# More remote addresses than the plan's one per family: SNAT flows hash the remote, so many remotes spread
# them over every TM.
REMOTES_V4 = tuple(f"198.51.100.{host}" for host in range(30, 70))
REMOTES_V6 = tuple(f"2001:db8:1::{host:x}" for host in range(0x30, 0x70))
XLATE = set(topology.XLATE_V4.values()) | set(topology.XLATE_V6.values())

UDP_SERVICES = f"""
[[tm.service]]
name = "echo"
virtual = "{topology.VIP_V4}"
port = {ECHO_PORT}
protocol = "udp"
policy = "round-robin"
servers = ["{topology.SERVERS_V4['server1']}:{ECHO_PORT}", "{topology.SERVERS_V4['server2']}:{ECHO_PORT}"]

[[tm.service]]
name = "echo6"
virtual = "{topology.VIP_V6}"
port = {ECHO_PORT}
protocol = "udp"
policy = "round-robin"
servers = ["[{topology.SERVERS_V6['server1']}]:{ECHO_PORT}", "[{topology.SERVERS_V6['server2']}]:{ECHO_PORT}"]
"""


# -- a UDP peer, run inside a lab namespace --------------------------------------------------------------

def datagram(size: int, sequence: int) -> bytes:
    """`size` bytes: a header placeholder the echo overwrites, then a pattern that tells datagrams apart."""
    body = (sequence.to_bytes(4, "big") + bytes(range(251))) * (size // 255 + 1)
    return bytes(udpecho.HEADER) + body[: size - udpecho.HEADER]


@dataclass
class FlowReport:
    source: str
    destination: str
    sent: int = 0
    answered: int = 0
    corrupt: int = 0
    seen_by: list[tuple[str, str, int]] = field(default_factory=list)  # (server, source it saw, port)

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @property
    def servers(self) -> set[str]:
        return {server for server, _, _ in self.seen_by}

    @property
    def public_sources(self) -> set[tuple[str, int]]:
        return {(host, port) for _, host, port in self.seen_by}


def udp_flow(source: str, destination: str, port: int, sizes: list[int], interval: float = 0.0,
             source_port: int = 0, timeout: float = 2.0) -> FlowReport:
    """One UDP flow (one socket, one source port): each datagram sent, its echo awaited (bounded)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    report = FlowReport(source, destination)
    with udpecho.open_socket(family, (source, source_port)) as sock:
        sock.settimeout(timeout)
        for sequence, size in enumerate(sizes):
            started = time.monotonic()
            payload = datagram(size, sequence)
            sock.sendto(payload, (destination, port))
            report.sent += 1
            while True:   # bounded by the socket timeout: skip late echoes of earlier datagrams
                try:
                    answer = sock.recv(udpecho.MAX_DATAGRAM)
                except TimeoutError:
                    break
                if answer[udpecho.HEADER:] == payload[udpecho.HEADER:]:
                    report.answered += 1
                    report.seen_by.append(udpecho.parse_header(answer))
                    break
                if len(answer) == len(payload) and answer[udpecho.HEADER:udpecho.HEADER + 4] == payload[udpecho.HEADER:udpecho.HEADER + 4]:
                    report.corrupt += 1
                    break
            if interval:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return report


def run_flows(lab: Lab, flows: list[tuple[str, tuple]]) -> list[FlowReport]:
    """Every (role, udp_flow arguments) at once, each in its own thread inside its role's namespace."""
    with ThreadPoolExecutor(max_workers=len(flows), thread_name_prefix="udp") as pool:
        futures = [pool.submit(nsnet.in_namespace, lab.ns(role), udp_flow, *arguments) for role, arguments in flows]
        return [future.result(timeout=120) for future in futures]


# -- where a flow lands: the distributor's own core ---------------------------------------------------------

class Placement:
    def __init__(self, distributor_config: Path):
        node = load_node_config(distributor_config)
        assert node.distributor is not None
        self._config = node.distributor

    def landing(self, source: str, destination: str, draining: tuple[str, ...] = ()) -> str:
        core = Distributor(self._config)
        for tm in draining:
            core.set_tm_state(tm, "draining")
        verdict = core.from_tun(udp(source, 40000, destination, ECHO_PORT))
        assert verdict.tm is not None, verdict.reason
        return verdict.tm

    def on(self, tm: str, sources: tuple[str, ...], destination_v4: str, destination_v6: str, count: int) -> list[str]:
        """`count` of `sources` (half each family) whose flows to the destination land on `tm`."""
        def destination(source: str) -> str:
            return destination_v6 if ":" in source else destination_v4
        v4 = [s for s in sources if ":" not in s and self.landing(s, destination(s)) == tm]
        v6 = [s for s in sources if ":" in s and self.landing(s, destination(s)) == tm]
        chosen = v4[: (count + 1) // 2] + v6[: count // 2]
        assert len(chosen) == count, f"not enough addresses land on {tm}"
        return chosen

    def remotes_on(self, tm: str, count: int) -> list[str]:
        """Remote addresses whose flows from server1 (hash of the remote) land on `tm`."""
        server = topology.SERVERS_V4["server1"], topology.SERVERS_V6["server1"]
        v4 = [r for r in REMOTES_V4 if self.landing(server[0], r) == tm]
        v6 = [r for r in REMOTES_V6 if self.landing(server[1], r) == tm]
        chosen = v4[: (count + 1) // 2] + v6[: count // 2]
        assert len(chosen) == count, f"not enough remote addresses land on {tm}"
        return chosen


# -- the lab --------------------------------------------------------------------------------------------

class UdpLab:
    def __init__(self, lab: Lab, config_dir: Path, token_file: Path):
        self.lab = lab
        self.token_file = token_file
        self.placement = Placement(config_dir / "distributor.toml")

    def status(self, role: str = "dist") -> dict:
        return self.lab.status(role)

    def counters(self) -> dict[str, dict[str, int]]:
        return {tm: self.status(tm)["counters"] for tm in topology.TMS}

    def tm_admin(self, action: str, tm: str) -> str:
        result = self.lab.exec("dist", [sys.executable, "-m", "overlay", "tm", action, tm, "--url", STATUS,
                                        "--token-file", str(self.token_file)], timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


def delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]], prefix: str) -> dict[str, int]:
    """Per TM and counter, how much every counter starting with `prefix` grew."""
    return {
        f"{tm}:{name}": count - before[tm].get(name, 0)
        for tm in after for name, count in after[tm].items()
        if name.startswith(prefix) and count != before[tm].get(name, 0)
    }


def start_echo(lab: Lab, role: str, port: int) -> None:
    lab.processes.start(f"udpecho-{role}", lab.ns(role),
                        [sys.executable, "-m", "overlay.lab.udpecho", "--name", role, "--port", str(port), "--seconds", "600"])
    address = "127.0.0.1"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:   # bounded: the echo process's start-up
        report = nsnet.in_namespace(lab.ns(role), udp_flow, address, address, port, [100], 0.0, 0, 0.2)
        if report.answered:
            return
    pytest.fail(f"udpecho in {role} not answering:\n{lab.processes.log_tail(f'udpecho-{role}')}")


@pytest.fixture(scope="module")
def lab12(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdpLab]:
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    root = tmp_path_factory.mktemp("issue12-lab")
    config_dir = lab_config_with_admin_token(root, TOKEN)
    for tm in topology.TMS:
        path = config_dir / f"{tm}.toml"
        path.write_text(path.read_text() + UDP_SERVICES)
    lab = Lab(lab_prefix("i12"), config_dir=config_dir, state_dir=root / "state")
    with lab_running(lab):
        for address in (*REMOTES_V4, *REMOTES_V6):
            plen, extra = ("64", ["nodad"]) if ":" in address else ("24", [])
            result = lab.exec("remote", ["ip", "address", "add", f"{address}/{plen}", "dev", "outside", *extra])
            assert result.returncode == 0, result.stderr
        for role, port in (("server1", ECHO_PORT), ("server2", ECHO_PORT), ("remote", REMOTE_PORT)):
            start_echo(lab, role, port)
        yield UdpLab(lab, config_dir, root / "admin.token")


# -- 1. fragments ---------------------------------------------------------------------------------------------

# Whole, just under IPv6's minimum MTU, DNS with EDNS, bulk. (Not between 1232 and the TUN's 1464: the
# Linux sender does not fragment those at its IPV6_MTU, and server2's 1280-byte bottleneck answers the
# first one of each client with "packet too big" — PMTU discovery doing its job, not a fragment test.)
SIZES = [512, 1200, 3000, 8000, 3000, 8000]


def vip(source: str) -> str:
    return topology.VIP_V6 if ":" in source else topology.VIP_V4


def test_fragmented_udp_through_nat_tms_both_ways_v4_and_v6(lab12: UdpLab) -> None:
    sources = [s for tm in topology.TMS for s in lab12.placement.on(tm, topology.CLIENT_SOURCES_V4 + topology.CLIENT_SOURCES_V6,
                                                                      topology.VIP_V4, topology.VIP_V6, 6)]
    remotes = [r for tm in topology.TMS for r in lab12.placement.remotes_on(tm, 4)]
    before = lab12.counters()
    inbound = run_flows(lab12.lab, [("client", (s, vip(s), ECHO_PORT, SIZES)) for s in sources])
    outbound = run_flows(lab12.lab, [
        (server, ((topology.SERVERS_V6 if ":" in r else topology.SERVERS_V4)[server], r, REMOTE_PORT, SIZES))
        for r in remotes for server in ("server1", "server2")
    ])
    after = lab12.counters()

    reports = inbound + outbound
    assert [(r.source, r.destination, r.lost, r.corrupt) for r in reports if r.lost or r.corrupt] == []
    assert sum(r.sent for r in reports) == len(reports) * len(SIZES)
    for report in inbound:   # DNAT: a server of the pool answered, and saw the client's own address
        assert report.servers <= {"server1", "server2"} and {h for _, h, _ in report.seen_by} == {report.source}
    for report in outbound:  # SNAT: the remote saw an xlate address, one per flow
        assert len(report.public_sources) == 1 and next(iter(report.public_sources))[0] in XLATE
    fragments = delta(after, before, "translated.fragment")
    assert set(fragments) == {f"{tm}:translated.fragment" for tm in topology.TMS}, fragments
    refused = {**delta(after, before, "invalid."), **delta(after, before, "unsupported."),
               **{k: v for k, v in delta(after, before, "dropped.").items() if "fragment" in k}}
    assert refused == {}, refused
    print(f"\n{len(reports)} UDP flows × {len(SIZES)} datagrams ({', '.join(map(str, SIZES))} B), v4+v6, "
          f"DNAT and SNAT: 0 lost, 0 corrupt; fragments translated per TM {fragments}")


def test_negative_control_the_harness_counts_every_lost_datagram(lab12: UdpLab) -> None:
    sources = [topology.CLIENT_SOURCES_V4[0], topology.CLIENT_SOURCES_V6[0]]
    reports = run_flows(lab12.lab, [("client", (s, vip(s), NO_SERVICE_PORT, [3000, 8000], 0.0, 0, 0.5)) for s in sources])
    assert [r.lost for r in reports] == [2, 2]


# -- 2. UDP through a drain --------------------------------------------------------------------------------

DRAINED = "tm2"
ADMIN_STATE = {"drain": "draining", "disable": "disabled"}
FLOW_SECONDS = 8.0
FLOW_INTERVAL = 0.1
DRAIN_AFTER = 2.0
FLOW_SIZES = [1000, 1000, 1000, 1000, 3000] * int(FLOW_SECONDS / FLOW_INTERVAL / 5)   # every 5th fragmented


def steady_flows(lab12: UdpLab) -> tuple[list[tuple[str, tuple]], int, int]:
    """UDP flows through DRAINED and elsewhere, both ways: (flows, how many inbound, how many on DRAINED)."""
    pool = topology.CLIENT_SOURCES_V4 + topology.CLIENT_SOURCES_V6
    on_drained = lab12.placement.on(DRAINED, pool, topology.VIP_V4, topology.VIP_V6, 8)
    elsewhere = [s for tm in topology.TMS if tm != DRAINED for s in lab12.placement.on(tm, pool, topology.VIP_V4, topology.VIP_V6, 2)]
    remotes = lab12.placement.remotes_on(DRAINED, 6)
    flows: list[tuple[str, tuple]] = [
        ("client", (s, vip(s), ECHO_PORT, FLOW_SIZES, FLOW_INTERVAL, 41000 + i)) for i, s in enumerate(on_drained + elsewhere)
    ]
    flows += [("server1", ((topology.SERVERS_V6 if ":" in r else topology.SERVERS_V4)["server1"], r, REMOTE_PORT,
                           FLOW_SIZES, FLOW_INTERVAL, 42000 + i)) for i, r in enumerate(remotes)]
    return flows, len(on_drained) + len(elsewhere), len(on_drained)


def flows_across(lab12: UdpLab, action: str) -> tuple[list[FlowReport], dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Steady flows; `action` (drain or disable) applied to DRAINED mid-run; the TM counters around it."""
    flows, _, _ = steady_flows(lab12)
    before = lab12.counters()
    outcome: dict[str, list[FlowReport]] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("reports", run_flows(lab12.lab, flows)))
    runner.start()
    try:
        time.sleep(DRAIN_AFTER)
        assert lab12.tm_admin(action, DRAINED) == f"{DRAINED}: enabled -> {ADMIN_STATE[action]}"
        runner.join(timeout=FLOW_SECONDS + 60)
        assert not runner.is_alive()
    finally:
        runner.join(timeout=FLOW_SECONDS + 60)
    return outcome["reports"], before, lab12.counters()


def test_drain_keeps_established_udp_flows_on_the_draining_tm(lab12: UdpLab) -> None:
    try:
        reports, before, after = flows_across(lab12, "drain")
        # New flows from the drained TM's clients, during the drain: opened on their new TM.
        pool = topology.CLIENT_SOURCES_V4 + topology.CLIENT_SOURCES_V6
        newcomers = lab12.placement.on(DRAINED, pool, topology.VIP_V4, topology.VIP_V6, 12)[8:]
        declined_before = after[DRAINED].get("bounced.declined", 0)
        connections_before = lab12.status(DRAINED)["connections"]["total"]
        fresh = run_flows(lab12.lab, [("client", (s, vip(s), ECHO_PORT, [1000, 3000, 1000], 0.05, 43000)) for s in newcomers])
        declined = lab12.counters()[DRAINED].get("bounced.declined", 0) - declined_before
        connections_after = lab12.status(DRAINED)["connections"]["total"]
    finally:
        lab12.tm_admin("enable", DRAINED)

    lost = [(r.source, r.destination, r.lost) for r in reports + fresh if r.lost or r.corrupt]
    assert lost == []
    changed = [(r.source, r.destination, r.servers, r.public_sources) for r in reports
               if len(r.servers) != 1 or len(r.public_sources) != 1]
    assert changed == [], "a UDP flow changed server or public source across the drain"
    invalid = delta(after, before, "invalid.")
    assert invalid == {}, invalid
    bounced = delta(after, before, "bounced.second_chance")
    assert bounced and f"{DRAINED}:bounced.second_chance" not in bounced, bounced
    assert declined >= len(newcomers), "new UDP flows must be declined by the draining TM"
    assert connections_after <= connections_before, "the draining TM opened a new flow"
    print(f"\ndrain {DRAINED} under {len(reports)} UDP flows ({sum(r.sent for r in reports)} datagrams, every 5th "
          f"fragmented): 0 lost, 0 changed server or public source; bounced {bounced}; {len(newcomers)} new flows "
          f"during the drain declined by {DRAINED} ({declined}) and opened on their new TM")


def test_negative_control_disable_moves_the_source_nated_udp_flows(lab12: UdpLab) -> None:
    try:
        reports, _, _ = flows_across(lab12, "disable")
    finally:
        lab12.tm_admin("enable", DRAINED)
    _, inbound, _ = steady_flows(lab12)
    snat = reports[inbound:]
    moved = [r for r in snat if len(r.public_sources) > 1]
    assert len(moved) == len(snat), [(r.destination, r.public_sources) for r in snat]
