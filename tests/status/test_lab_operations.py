"""Operating the real agents in the namespace lab: metrics, admin token, drain, reload, health detection.

One lab for the module, built from a copy of `config/` whose distributor reads an admin token file, so a
bad config can be written for the reload test without touching the repository. Tests run in file order
and each leaves the fleet as it found it (all TMs enabled, up and running).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlay.lab import nsnet, topology
from overlay.lab.lab import Lab, unavailable_reason

from .conftest import lab_config_with_admin_token

pytestmark = pytest.mark.lab

LAB_UNAVAILABLE = unavailable_reason()
TOKEN = "lab-admin-token-0123456789abcdef"
STATUS = f"http://127.0.0.1:{topology.STATUS_PORT}"
DETECTION = 0.5 * 3 + 0.5  # config/distributor.toml [health]: interval × fall + timeout
RECOVERY = 0.5 * 2 + 0.5  # interval × rise + timeout
# Measuring adds to the bound: the 50 ms status poll, an HTTP round trip into the namespace, timer
# granularity of the agent's loop. Measured here: 2.05 s for a 2.0 s bound.
SLACK = 0.5


class OperatedLab:
    def __init__(self, lab: Lab, distributor_config: Path, token_file: Path):
        self.lab = lab
        self.distributor_config = distributor_config
        self.token_file = token_file

    def status(self) -> dict:
        return self.lab.status("dist")

    def request(self, path: str, method: str = "GET", token: str | None = None, role: str = "dist") -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return nsnet.http_request(self.lab.ns(role), f"{STATUS}{path}", method=method, headers=headers)

    def metrics(self, role: str = "dist") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, body = self.request("/metrics", role=role)
        assert code == 200
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def overlay_cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.lab.exec("dist", [sys.executable, "-m", "overlay", *argv], timeout=30)

    def pid(self, role: str) -> int:
        return self.lab.processes.recorded()[role]

    def wait_for(self, predicate, timeout: float, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
        """Seconds until `predicate(status)` holds; fails after `timeout` (bounded polling)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate(self.status()):
                return time.monotonic() - start
            time.sleep(step)
        pytest.fail(f"condition not met within {timeout}s; status: {json.dumps(self.status().get('tms'))}")


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatedLab]:
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    root = tmp_path_factory.mktemp("status-lab")
    config_dir = lab_config_with_admin_token(root, TOKEN)
    token_file = root / "admin.token"
    distributor_config = config_dir / "distributor.toml"
    prefix = f"{os.environ.get('OVERLAY_LAB_PREFIX', 'ovt-')}{os.getpid() % 100000}stat-"
    lab = Lab(prefix, config_dir=config_dir, state_dir=root / "state")
    try:
        lab.up()
        yield OperatedLab(lab, distributor_config, token_file)
    except BaseException:
        print(lab.agent_logs())
        raise
    finally:
        lab.down()


def test_metrics_scraped_after_traffic_match_status(operated: OperatedLab) -> None:
    report = operated.lab.traffic(v4=50, v6=50, count=600, duration=15)
    assert report.failed == 0 and report.succeeded == 600
    metrics = operated.metrics()
    status = operated.status()
    for tm in topology.TMS:
        assert metrics[("overlay_tm_up", (("tm", tm),))] == 1.0
        assert metrics[("overlay_tm_admin_state", (("state", "enabled"), ("tm", tm)))] == 1.0
        packets = metrics[("overlay_packets_total", (("tm", tm),))]
        assert packets > 100, f"{tm} carried traffic"
        assert packets <= status["tms"][tm]["packets"]  # counters only grow between the two reads
        assert metrics[("overlay_health_replies_total", (("tm", tm),))] > 0
    assert metrics[("overlay_status_skipped_values", ())] == 0.0
    assert metrics[("overlay_health_all_down", ())] == 0.0
    tm1 = operated.metrics("tm1")
    assert tm1[("overlay_status_skipped_values", ())] == 0.0
    assert ("overlay_conntrack_entries", ()) in tm1
    assert sum(value for (name, _), value in tm1.items() if name == "overlay_peer_packets_total") > 100


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN[:-1]], ids=["no token", "wrong token", "prefix"])
@pytest.mark.parametrize("path", ["/admin/tm/tm2/disable", "/admin/reload"])
def test_admin_refuses_requests_without_the_token(operated: OperatedLab, token: str | None, path: str) -> None:
    generation = operated.status()["config"]["generation"]
    code, body = operated.request(path, method="POST", token=token)
    assert code == 401, body
    status = operated.status()
    assert status["tms"]["tm2"]["admin"] == "enabled"
    assert status["config"]["generation"] == generation


def test_drain_sends_no_new_connections_to_the_tm_then_enable(operated: OperatedLab) -> None:
    drained = operated.overlay_cli("tm", "drain", "tm2", "--url", STATUS, "--token-file", str(operated.token_file))
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.strip().splitlines()[-1] == "tm2: enabled -> draining"
    try:
        status = operated.status()
        assert status["tms"]["tm2"]["admin"] == "draining"
        assert status["tms"]["tm2"]["serving"] is False
        before = {tm: status["tms"][tm]["packets"] for tm in topology.TMS}
        report = operated.lab.traffic(v4=50, v6=50, count=400, duration=15)
        assert report.failed == 0
        after = {tm: operated.status()["tms"][tm]["packets"] for tm in topology.TMS}
        delta = {tm: after[tm] - before[tm] for tm in topology.TMS}
        # Health checks travel as keepalives, not through the table: no new connection reaches tm2.
        assert delta["tm2"] == 0, delta
        assert delta["tm1"] > 0 and delta["tm3"] > 0, delta
    finally:
        enabled = operated.overlay_cli("tm", "enable", "tm2", "--url", STATUS, "--token-file", str(operated.token_file))
    assert enabled.returncode == 0, enabled.stderr
    assert operated.status()["tms"]["tm2"]["admin"] == "enabled"


def test_unknown_tm_is_404_and_the_cli_says_so(operated: OperatedLab) -> None:
    code, _ = operated.request("/admin/tm/tm9/drain", method="POST", token=TOKEN)
    assert code == 404
    result = operated.overlay_cli("tm", "drain", "tm9", "--url", STATUS, "--token-file", str(operated.token_file))
    assert result.returncode == 1
    assert "unknown TM 'tm9'" in result.stderr


def test_reload_applies_a_good_config_and_refuses_a_bad_one(operated: OperatedLab) -> None:
    generation = operated.status()["config"]["generation"]
    code, body = operated.request("/admin/reload", method="POST", token=TOKEN)
    assert code == 200, body
    assert json.loads(body)["generation"] == generation + 1
    good = operated.distributor_config.read_text()
    operated.distributor_config.write_text(good.replace("weight = 1", "weight = -1", 1))
    try:
        code, body = operated.request("/admin/reload", method="POST", token=TOKEN)
        assert code == 422, body
        answer = json.loads(body)
        assert answer["ok"] is False and answer["generation"] == generation + 1
        assert "weight" in answer["error"]
        status = operated.status()
        assert status["config"]["generation"] == generation + 1
        assert "weight" in status["config"]["last_reload_error"]
        summary = operated.overlay_cli("status", STATUS)
        assert "!! last reload refused" in summary.stdout
    finally:
        operated.distributor_config.write_text(good)
    code, body = operated.request("/admin/reload", method="POST", token=TOKEN)
    assert code == 200, body
    assert operated.status()["config"]["last_reload_error"] is None


def test_reloads_under_traffic_lose_no_connection(operated: OperatedLab) -> None:
    generation = operated.status()["config"]["generation"]
    outcome: dict[str, object] = {}
    traffic = threading.Thread(
        target=lambda: outcome.update(report=operated.lab.traffic(v4=50, v6=50, count=1500, duration=20, concurrency=16))
    )
    traffic.start()
    reloads = 0
    try:
        time.sleep(0.5)
        while traffic.is_alive() and reloads < 20:  # bounded: at most 20 reloads, one per 0.25 s
            code, body = operated.request("/admin/reload", method="POST", token=TOKEN)
            assert code == 200, body
            reloads += 1
            time.sleep(0.25)
    finally:
        traffic.join(timeout=60)
    report = outcome["report"]
    print(f"{reloads} reloads during {report.requests} requests: {report.failed} failed")  # type: ignore[attr-defined]
    assert reloads >= 3, "the traffic ended before the reloads could overlap it"
    assert report.failed == 0, report.failures  # type: ignore[attr-defined]
    assert operated.status()["config"]["generation"] == generation + reloads


def test_a_frozen_tm_is_taken_down_within_the_detection_time_and_returns(operated: OperatedLab) -> None:
    pid = operated.pid("tm3")
    os.kill(pid, signal.SIGSTOP)  # alive but silent: what a hung agent or a cut tunnel looks like
    try:
        detected = operated.wait_for(lambda status: status["tms"]["tm3"]["up"] is False, timeout=DETECTION + 3)
        status = operated.status()
        assert status["tms"]["tm1"]["up"] and status["tms"]["tm2"]["up"]
        assert status["tms"]["tm3"]["serving"] is False
        metrics = operated.metrics()
        assert metrics[("overlay_tm_up", (("tm", "tm3"),))] == 0.0
        print(f"tm3 detected down after {detected:.2f}s (bound {DETECTION}s)")
        assert detected <= DETECTION + SLACK
        report = operated.lab.traffic(v4=20, v6=20, count=200, duration=15)
        assert report.failed == 0, "connections through the remaining TMs are unaffected"
    finally:
        os.kill(pid, signal.SIGCONT)
    returned = operated.wait_for(lambda status: status["tms"]["tm3"]["up"] is True, timeout=RECOVERY + 3)
    print(f"tm3 back up after {returned:.2f}s (rise × interval + timeout = {RECOVERY}s)")
    assert returned <= RECOVERY + SLACK


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed (apt-get install -y nftables)")
def test_a_cut_underlay_path_is_noticed_although_the_tm_process_is_fine(operated: OperatedLab) -> None:
    # The router between underlay A and B drops everything to and from tm3: its agent keeps running and
    # its own /healthz stays 200, only the in-band keepalives can tell.
    router = operated.lab.ns("router")
    nft = ["ip", "netns", "exec", router, "nft"]
    rules = """
table inet statuscut {
    chain forward {
        type filter hook forward priority 0;
        ip saddr 192.0.2.73 drop
        ip daddr 192.0.2.73 drop
    }
}
"""
    subprocess.run([*nft, "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        detected = operated.wait_for(lambda status: status["tms"]["tm3"]["up"] is False, timeout=DETECTION + 3)
        print(f"cut path to tm3 detected after {detected:.2f}s (bound {DETECTION}s)")
        assert detected <= DETECTION + SLACK
        code, _ = operated.request("/healthz", role="tm3")
        assert code == 200, "the TM itself is healthy: only the path is broken"
        report = operated.lab.traffic(v4=20, v6=20, count=200, duration=15)
        assert report.failed == 0
    finally:
        subprocess.run([*nft, "delete table inet statuscut"], check=True, capture_output=True)
    operated.wait_for(lambda status: status["tms"]["tm3"]["up"] is True, timeout=RECOVERY + 3)


CHROMIUM = shutil.which("chromium")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_page_of_the_real_distributor(operated: OperatedLab, tmp_path: Path) -> None:
    operated.lab.traffic(v4=20, v6=20, count=200, duration=10)
    profile = tmp_path / "profile"
    result = operated.lab.exec(
        "dist",
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=3000", "--dump-dom", f"{STATUS}/",
        ],
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'id="node-name">dist1<' in dom
    for tm in topology.TMS:
        assert f"<span>{tm}</span>" in dom
    assert dom.count('class="health up"') == 3
    assert 'data-bars="0"' not in dom
