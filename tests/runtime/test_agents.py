"""The real agents in namespaces: a TCP connection through distributor and TM, signals, reload, cleanup.

Every test builds its own `rtx-` namespaces (tests/runtime/agents.py) and removes them, with every
process it started, even when it fails.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runtime.agents import ADMIN_TOKEN, MiniOverlay, mini_overlay
from tests.runtime.lab import in_ns, net_state, require_lab

pytestmark = pytest.mark.lab


def wait_for(predicate, timeout: float = 10, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def events(overlay: MiniOverlay, role: str, name: str) -> list[dict]:
    return [event for event in overlay.log_events(role) if event.get("event") == name]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    require_lab()
    return tmp_path


def test_tcp_connections_cross_the_overlay_both_ways(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        codes = [overlay.http().stdout for _ in range(4)]
        assert codes == ["200"] * 4
        # The server saw the client itself (DNAT only), and its reply still found the way back via the TM.
        assert json.loads(overlay.fetch("http://203.0.113.80/whoami"))["peer"] == "198.51.100.10"
        dist = overlay.status("distributor")
        tm = overlay.status("tm")
        # Both directions went through the one TM: the client's packets (hash src) and the server's (hash dst).
        assert dist["cells"].get("unknown>virtual", 0) >= 5 * 3
        assert dist["cells"].get("nat-able+node>unknown", 0) >= 5 * 3
        assert dist["tms"]["tm1"]["packets"] == dist["counters"]["tm.tm1"] > 0
        assert tm["counters"]["conntrack.created"] == 5
        assert tm["peers"] == {"192.0.2.2:4754": {"packets": tm["counters"]["packets.received"]}}
        # Keepalives ran through the same tunnel and were echoed.
        assert tm["counters"]["keepalives_echoed"] >= 1
        assert dist["health"]["tms"]["tm1"]["replies"] >= 1 and dist["health"]["tms"]["tm1"]["up"]


def test_ipv6_connections_cross_the_overlay(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        assert [overlay.http("http://[2001:db8:80::80]/").stdout for _ in range(2)] == ["200"] * 2
        assert json.loads(overlay.fetch("http://[2001:db8:80::80]/whoami"))["peer"] == "2001:db8:1::10"
        tm = overlay.status("tm")
        assert tm["counters"]["conntrack.created"] == 3
        assert overlay.status("distributor")["cells"].get("nat-able+node>unknown", 0) >= 3 * 3


def test_the_tm_management_address_reaches_the_tm_host_stack(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        result = overlay.http("http://203.0.113.201:8080/healthz")
        assert result.stdout == "200"
        tm = overlay.status("tm")
        assert tm["counters"]["forwarded.management"] >= 1  # into the TUN
        assert tm["counters"]["packets.from_local"] >= 1  # the stack's answers, out of the TUN


def test_a_port_the_tm_does_not_serve_fails(workdir: Path) -> None:
    """Negative control: only what the TM opens gets through (the VIP serves port 80, not 81)."""
    with mini_overlay(workdir) as overlay:
        assert overlay.http("http://203.0.113.80:81/", timeout=2).stdout == "000"
        assert overlay.http().stdout == "200"


def test_sigterm_leaves_nothing_behind(workdir: Path) -> None:
    with mini_overlay(workdir, agents=False) as overlay:
        before = {role: net_state(overlay.ns[role]) for role in ("dist", "tm")}
        overlay.start("tm")
        overlay.start("distributor")
        assert overlay.http().stdout == "200"
        during = net_state(overlay.ns["dist"])
        assert during["rules4"] != before["dist"]["rules4"]  # the agent did set things up
        assert overlay.stop("distributor") == 0
        assert overlay.stop("tm") == 0
        for role in ("dist", "tm"):
            assert net_state(overlay.ns[role]) == before[role], role
        assert events(overlay, "distributor", "agent.stopped")
        assert events(overlay, "tm", "agent.stopped")
        assert not [line for line in overlay.log("distributor").splitlines() if "Traceback" in line]


def test_sigint_stops_cleanly_too(workdir: Path) -> None:
    with mini_overlay(workdir, agents=False) as overlay:
        before = net_state(overlay.ns["tm"])
        proc = overlay.start("tm")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert net_state(overlay.ns["tm"]) == before


def test_a_crashed_run_is_cleaned_up_by_the_next_start(workdir: Path) -> None:
    with mini_overlay(workdir, agents=False) as overlay:
        before = net_state(overlay.ns["dist"])
        overlay.start("tm")
        proc = overlay.start("distributor")
        proc.kill()  # SIGKILL: no cleanup at all; the TUN dies with the process, the rules stay
        proc.wait(5)
        assert net_state(overlay.ns["dist"])["rules4"] != before["rules4"]
        overlay.start("distributor")
        assert events(overlay, "distributor", "netsetup.stale_removed")
        assert overlay.http().stdout == "200"
        assert overlay.stop("distributor") == 0
        assert net_state(overlay.ns["dist"]) == before


def test_sighup_with_a_bad_config_keeps_the_old_one(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        good = overlay.distributor_config.read_text()
        overlay.distributor_config.write_text(good.replace('name = "tm1"', 'name = "tm1"\nweight = "heavy"'))
        overlay.signal("distributor", signal.SIGHUP)
        failed = wait_for(lambda: events(overlay, "distributor", "config.reload_failed"), what="reload_failed")
        assert "weight" in failed[0]["error"] and str(overlay.distributor_config) in failed[0]["error"]
        status = overlay.status("distributor")
        assert status["config"]["generation"] == 1
        assert "weight" in status["config"]["last_reload_error"]
        assert status["counters"]["config_reloads_failed"] == 1
        assert overlay.http().stdout == "200"  # still running, on the old config

        # A good config is applied, as a new generation, without a restart.
        overlay.distributor_config.write_text(good.replace("rise = 1", "rise = 2"))
        overlay.signal("distributor", signal.SIGHUP)
        wait_for(lambda: overlay.status("distributor")["config"]["generation"] == 2, what="generation 2")
        status = overlay.status("distributor")
        assert status["health"]["config"]["rise"] == 2 and status["config"]["last_reload_error"] is None
        assert overlay.procs["distributor"].poll() is None
        assert overlay.http().stdout == "200"


def test_sighup_refuses_changes_that_need_a_restart(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        good = overlay.distributor_config.read_text()
        overlay.distributor_config.write_text(good.replace('name = "rtxovl0"', 'name = "rtxovl1"'))
        overlay.signal("distributor", signal.SIGHUP)
        failed = wait_for(lambda: events(overlay, "distributor", "config.reload_failed"), what="reload_failed")
        assert "tun" in failed[0]["error"] and "restart" in failed[0]["error"]
        assert overlay.status("distributor")["config"]["generation"] == 1


def test_a_dead_tm_is_taken_out_and_comes_back(workdir: Path) -> None:
    with mini_overlay(workdir) as overlay:
        assert overlay.stop("tm") == 0
        wait_for(lambda: events(overlay, "distributor", "tm.down"), what="tm.down")
        # Logged in the same health pass as tm.down, after the table rebuild between them: a read of the
        # log can fall between the two lines (CI did), so it is waited for too.
        wait_for(lambda: events(overlay, "distributor", "fleet.all_down"), what="fleet.all_down")
        status = overlay.status("distributor")
        assert status["tms"]["tm1"]["up"] is False and status["health"]["all_down"] is True
        healthz = in_ns(overlay.ns["dist"], "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "http://127.0.0.1:8080/healthz", check=False)
        assert healthz == "503"
        overlay.start("tm")
        wait_for(lambda: events(overlay, "distributor", "tm.up"), what="tm.up")
        assert overlay.status("distributor")["tms"]["tm1"]["up"] is True
        assert overlay.http().stdout == "200"


def test_admin_drain_and_reload_through_the_cli(workdir: Path) -> None:
    with mini_overlay(workdir, admin=True) as overlay:
        token_file = workdir / "admin.token"
        run = ["ip", "netns", "exec", overlay.ns["dist"], sys.executable, "-m", "overlay"]
        drained = subprocess.run([*run, "tm", "drain", "tm1", "--token-file", str(token_file)],
                                 capture_output=True, text=True, timeout=20)
        assert drained.returncode == 0, drained.stderr
        assert overlay.status("distributor")["tms"]["tm1"]["admin"] == "draining"
        wrong = workdir / "wrong.token"
        wrong.write_text(ADMIN_TOKEN + "-not")
        refused = subprocess.run([*run, "tm", "disable", "tm1", "--token-file", str(wrong)],
                                 capture_output=True, text=True, timeout=20)
        assert refused.returncode != 0
        assert overlay.status("distributor")["tms"]["tm1"]["admin"] == "draining"
        enabled = subprocess.run([*run, "tm", "enable", "tm1", "--token-file", str(token_file)],
                                 capture_output=True, text=True, timeout=20)
        assert enabled.returncode == 0, enabled.stderr
        assert overlay.status("distributor")["tms"]["tm1"]["admin"] == "enabled"


# {description, how the agent is started, what the operator must read}
START_FAILURES = [
    {"description": "no NET_ADMIN", "prefix": ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"],
     "config": None, "expected": "CAP_NET_ADMIN"},
    {"description": "config with an error", "prefix": [], "config": "[node]\nrole = \"tm\"\nname = \"tm 1\"\n",
     "expected": ":3: node.name"},
    {"description": "config of the other role", "prefix": [], "config": "distributor", "expected": "is a distributor config"},
    {"description": "underlay address not on this host", "prefix": [], "config": "wrong-underlay",
     "expected": "is 192.0.2.99 an address of this host"},
]


@pytest.mark.parametrize("case", START_FAILURES, ids=[case["description"] for case in START_FAILURES])
def test_start_failures_are_clear_and_leave_nothing(workdir: Path, case: dict) -> None:
    with mini_overlay(workdir, agents=False) as overlay:
        config = overlay.tm_config
        if case["config"] == "distributor":
            config = overlay.distributor_config
        elif case["config"] == "wrong-underlay":
            config.write_text(config.read_text().replace('address = "192.0.2.3"', 'address = "192.0.2.99"'))
        elif case["config"]:
            config = workdir / "broken.toml"
            config.write_text(case["config"])
        before = net_state(overlay.ns["tm"])
        result = subprocess.run(
            ["ip", "netns", "exec", overlay.ns["tm"], *case["prefix"], sys.executable, "-m", "overlay", "tm",
             "--config", str(config)],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2
        assert case["expected"] in result.stderr
        assert "Traceback" not in result.stderr
        assert net_state(overlay.ns["tm"]) == before


SEND_DATAGRAM = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
sock.settimeout(1)
sock.sendto(bytes.fromhex(sys.argv[2]), ("192.0.2.3", 4754))
try:
    print(sock.recv(2048).hex())
except socket.timeout:
    print("no-answer")
"""

KEEPALIVE_HEX = "000088b5" + "4f564b41" + "01000000" + "00" * 24  # GRE(0x88B5) + a 32-byte keepalive body

# {description, underlay source, UDP payload (hex), expected answer, expected TM drop counter}
TM_UNDERLAY_INPUTS = [
    {"description": "keepalive from the distributor is echoed unchanged", "source": "192.0.2.2",
     "payload": KEEPALIVE_HEX, "answer": KEEPALIVE_HEX, "drop": None},
    {"description": "keepalive from a stranger is not echoed (no reflector)", "source": "192.0.2.4",
     "payload": KEEPALIVE_HEX, "answer": "no-answer", "drop": "agent:unknown-peer"},
    {"description": "truncated GRE header from the distributor", "source": "192.0.2.2",
     "payload": "0000", "answer": "no-answer", "drop": "agent:malformed:gre"},
    {"description": "GRE version 1 from the distributor", "source": "192.0.2.2",
     "payload": "00010800" + "45" + "00" * 19, "answer": "no-answer", "drop": "agent:malformed:gre"},
    {"description": "GRE carrying Ethernet (0x6558) from the distributor", "source": "192.0.2.2",
     "payload": "00006558" + "00" * 14, "answer": "no-answer", "drop": "agent:unsupported-gre-protocol"},
]


def test_tm_underlay_inputs(workdir: Path) -> None:
    """What reaches a TM's underlay port that is not traffic: echoed, or counted and dropped."""
    with mini_overlay(workdir) as overlay:
        in_ns(overlay.ns["dist"], "ip", "addr", "add", "192.0.2.4/26", "dev", "dund")
        for case in TM_UNDERLAY_INPUTS:
            answer = in_ns(overlay.ns["dist"], sys.executable, "-c", SEND_DATAGRAM, case["source"],
                           case["payload"]).strip()
            assert answer == case["answer"], case["description"]
            if case["drop"]:
                assert overlay.status("tm")["drops"].get(case["drop"], 0) >= 1, case["description"]
        assert overlay.procs["tm"].poll() is None
        assert overlay.http().stdout == "200"


def test_a_deleted_tun_stops_the_agent_with_exit_1_and_cleans_up(workdir: Path) -> None:
    """`ip link del` under a running agent: no busy loop on the dead descriptor, a loud log, exit 1."""
    with mini_overlay(workdir, agents=False) as overlay:
        before = net_state(overlay.ns["tm"])
        proc = overlay.start("tm")
        in_ns(overlay.ns["tm"], "ip", "link", "del", "rtxtm0")
        assert proc.wait(10) == 1
        assert events(overlay, "tm", "tun.lost")
        assert net_state(overlay.ns["tm"]) == before


def test_http_health_checks_reach_the_tm_status_service_through_the_overlay(workdir: Path) -> None:
    """With `health.http`, the distributor also asks each TM's /healthz, on its management address."""
    with mini_overlay(workdir, http_health=True) as overlay:
        def http_up() -> bool:
            tm1 = overlay.status("distributor")["health"]["tms"]["tm1"]
            return tm1["http_up"] is True and tm1["consecutive_successes"] >= 2
        wait_for(http_up, what="an answered /healthz")
        assert overlay.status("distributor")["health"]["tms"]["tm1"]["http_failures"] == 0
        assert overlay.status("tm")["counters"]["forwarded.management"] >= 1


def test_sigterm_under_a_flood_handles_what_is_in_flight_and_cleans_up(workdir: Path) -> None:
    from tests.runtime.test_agent_benchmark import FLOOD

    with mini_overlay(workdir, agents=False) as overlay:
        before = net_state(overlay.ns["dist"])
        overlay.start("tm")
        overlay.start("distributor")
        flood = subprocess.Popen(["ip", "netns", "exec", overlay.ns["client"], sys.executable, "-c", FLOOD,
                                  "203.0.113.80", "3"], stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: overlay.status("distributor")["counters"]["tun_rx_packets"] > 1000, what="the flood")
            started = time.monotonic()
            assert overlay.stop("distributor") == 0
            assert time.monotonic() - started < 5
        finally:
            flood.wait(15)
        [stopped] = events(overlay, "distributor", "agent.stopped")
        assert stopped["in_flight_handled"] > 0  # queued packets were decided and sent, not dropped
        assert net_state(overlay.ns["dist"]) == before
