"""`overlay status`, `tm_admin`, `admin_reload` and the admin token, against a live status server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.cli import main
from overlay.status.admin import AdminTokenError, bearer_matches, load_admin_token
from overlay.status.cli import admin_reload, format_summary, recent_rates, tm_admin
from overlay.status.server import start_status_server

from .conftest import ADMIN_TOKEN, FakeDistributor, FakeTm


class LiveServer:
    """A status server on its own event loop in a thread: the CLI under test blocks on urllib."""

    def __init__(self, provider: object, **kwargs: object):
        self.provider = provider
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    def __enter__(self) -> str:
        self._thread.start()
        start = start_status_server(self.provider, "127.0.0.1", 0, sample_interval=0.05, **self._kwargs)  # type: ignore[arg-type]
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(timeout=10)
        self._await_history(self._server.url)
        return self._server.url

    @staticmethod
    def _await_history(url: str, seconds: float = 10.0) -> None:
        """Until /api/history holds a rate (two samples): the sampler runs on the wall clock, so waiting
        for it, not a fixed sleep, keeps the share columns filled on a loaded machine. Bounded."""
        deadline = time.monotonic() + seconds
        while not json.load(urllib.request.urlopen(f"{url}/api/history", timeout=seconds))["samples"]:
            assert time.monotonic() < deadline, f"no history sample within {seconds} s"
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def dist_url(distributor: FakeDistributor) -> Iterator[str]:
    with LiveServer(distributor, admin=distributor, admin_token=ADMIN_TOKEN) as url:
        yield url


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OVERLAY_ADMIN_TOKEN", raising=False)


def test_status_command_prints_a_summary(dist_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", dist_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dist1 (distributor) · version 0.1.0 · up 1h 2m · config generation 1 sha256:9f2c4e1d0b7a")
    assert "readiness: ready" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("tm")}
    assert rows["tm1"][:4] == ["tm1", "enabled", "up", "1.2"]
    assert rows["tm2"][1:3] == ["draining", "up"]
    assert rows["tm3"][2:4] == ["DOWN", "-"]
    assert [row[-2] for row in (rows["tm1"], rows["tm2"], rows["tm3"])] == ["50.0%", "30.0%", "20.0%"]
    assert "drops: truncated 3, ttl_exceeded" in out
    assert "verdicts: hash-dst" in out
    assert "last reload refused" not in out


def test_status_command_json_is_the_raw_status(dist_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["status", dist_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tms"]["tm2"]["admin"] == "draining"


def test_status_command_exits_non_zero_when_not_ready(distributor: FakeDistributor, capsys: pytest.CaptureFixture[str]) -> None:
    distributor.ready = False
    with LiveServer(distributor) as url:
        assert main(["status", url.removeprefix("http://")]) == 1  # host:port works too
    assert "readiness: NOT READY (reason no TM up, tms_up 2)" in capsys.readouterr().out


def test_status_command_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "cannot reach http://127.0.0.1:9/status" in capsys.readouterr().err


def test_status_of_a_tm_shows_peers_and_conntrack(tm: FakeTm, capsys: pytest.CaptureFixture[str]) -> None:
    with LiveServer(tm) as url:
        assert main(["status", url]) == 0
    out = capsys.readouterr().out
    peers = [line.split() for line in out.splitlines() if line.startswith(("PEER", "dist1"))]
    assert peers[0] == ["PEER", "PPS", "SHARE", "PACKETS"]
    assert peers[1][0] == "dist1" and peers[1][2] == "100.0%"
    assert "conntrack: entries 42, established 40, limit 65536, syn_sent 2" in out
    assert "service web: connections 203.0.113.10:80 21, 203.0.113.11:80 19" in out
    assert "drops: no_state 7" in out


def test_tm_admin_drains_and_reports(dist_url: str, distributor: FakeDistributor, capsys: pytest.CaptureFixture[str]) -> None:
    assert tm_admin("drain", "tm1", dist_url, ADMIN_TOKEN) == 0
    assert distributor.states["tm1"] == "draining"
    # The last line: unconfigured structlog in the in-process server may log to stdout before it.
    assert capsys.readouterr().out.splitlines()[-1] == "tm1: enabled -> draining"


def test_tm_admin_takes_the_token_from_the_environment(dist_url: str, distributor: FakeDistributor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert tm_admin("disable", "tm3", dist_url, None) == 0
    assert distributor.states["tm3"] == "disabled"


ADMIN_FAILURES = [
    {"description": "wrong token", "call": ("drain", "tm1", "wrong"), "code": 1, "stderr": "refused, the admin token is missing or wrong"},
    {"description": "no token anywhere", "call": ("drain", "tm1", None), "code": 2, "stderr": "no admin token"},
    {"description": "unknown TM", "call": ("drain", "tm9", ADMIN_TOKEN), "code": 1, "stderr": "unknown TM 'tm9'"},
    {"description": "unknown action", "call": ("reboot", "tm1", ADMIN_TOKEN), "code": 2, "stderr": "unknown action 'reboot'"},
]


@pytest.mark.parametrize("case", ADMIN_FAILURES, ids=lambda case: case["description"])
def test_tm_admin_failures(dist_url: str, distributor: FakeDistributor, capsys: pytest.CaptureFixture[str], case: dict) -> None:
    action, name, token = case["call"]
    assert tm_admin(action, name, dist_url, token) == case["code"]
    assert case["stderr"] in capsys.readouterr().err
    assert distributor.states["tm1"] == "enabled"


def test_tm_admin_against_a_node_without_admin_api(tm: FakeTm, capsys: pytest.CaptureFixture[str]) -> None:
    with LiveServer(tm) as url:
        assert tm_admin("drain", "tm1", url, ADMIN_TOKEN) == 1
    assert "no admin API at" in capsys.readouterr().err


def test_admin_reload_accepted_then_refused(dist_url: str, distributor: FakeDistributor, capsys: pytest.CaptureFixture[str]) -> None:
    assert admin_reload(dist_url, ADMIN_TOKEN) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "reloaded: config generation 2"
    distributor.reload_error = "tm[0].weight: must be > 0"
    assert admin_reload(dist_url, ADMIN_TOKEN) == 1
    assert "reload refused, generation 2 stays: tm[0].weight: must be > 0" in capsys.readouterr().err
    assert main(["status", dist_url]) == 0
    assert "!! last reload refused, generation 2 stays: tm[0].weight: must be > 0" in capsys.readouterr().out


# -- token --------------------------------------------------------------------------------------------------


def test_token_from_file_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    monkeypatch.setenv("OVERLAY_ADMIN_TOKEN", "from-env")
    assert load_admin_token(str(path)) == "from-file"
    assert load_admin_token(None) == "from-env"


@pytest.mark.parametrize("env", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_no_token_means_none(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is not None:
        monkeypatch.setenv("OVERLAY_ADMIN_TOKEN", env)
    assert load_admin_token(None) is None


@pytest.mark.parametrize("content", [None, "", "\n  \n", b"\xff\xfe token"], ids=["missing", "empty", "blank", "not UTF-8"])
def test_configured_but_unusable_token_file_is_an_error(tmp_path: Path, content: str | bytes | None) -> None:
    path = tmp_path / "token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(AdminTokenError, match=str(path)):
        load_admin_token(str(path))


BEARER_CASES = [
    {"description": "exact", "header": "Bearer abc", "expected": True},
    {"description": "scheme is case-insensitive", "header": "bearer abc", "expected": True},
    {"description": "missing", "header": None, "expected": False},
    {"description": "empty", "header": "", "expected": False},
    {"description": "no token", "header": "Bearer ", "expected": False},
    {"description": "other scheme", "header": "Basic abc", "expected": False},
    {"description": "longer", "header": "Bearer abcd", "expected": False},
    {"description": "non-ascii", "header": "Bearer ábc", "expected": False},
]


@pytest.mark.parametrize("case", BEARER_CASES, ids=lambda case: case["description"])
def test_bearer_matches(case: dict) -> None:
    assert bearer_matches(case["header"], "abc") is case["expected"]


# -- summary formatting -------------------------------------------------------------------------------------


def test_recent_rates_average_only_the_recent_window() -> None:
    history = {
        "samples": [
            {"age": 30.0, "span": 1.0, "pps": {"tm1": 1000.0}},  # outside the 10 s window
            {"age": 1.0, "span": 1.0, "pps": {"tm1": 100.0, "tm2": 50.0}},
            {"age": 0.0, "span": 1.0, "pps": {"tm1": 300.0}},  # tm2 missing: counter reset
        ]
    }
    assert recent_rates(history) == {"tm1": 200.0, "tm2": 25.0}
    assert recent_rates({"samples": []}) == {}


def test_summary_warns_loudly_when_every_tm_is_down() -> None:
    status = {
        "role": "distributor",
        "name": "d",
        "tms": {"tm1": {"state": "enabled", "up": False, "packets": 0}},
        "health": {"all_down": True, "config": {"all_down": "route"}, "tms": {}},
    }
    text = format_summary(status, {"ok": False}, {"samples": []})
    assert "!! every TM is down (all-down policy: route)" in text
    assert "readiness: NOT READY" in text


def test_reload_command_uses_the_token_and_reports_refusal(
    dist_url: str, distributor: FakeDistributor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reload", dist_url]) == 2  # no token anywhere: refused before asking
    assert "token" in capsys.readouterr().err
    assert distributor.generation == 1
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    assert main(["reload", dist_url, "--token-file", str(token_file)]) == 0
    assert "reloaded: config generation" in capsys.readouterr().out
    distributor.reload_error = "sets.virtual[0]: '203.0.113.300/32' is not a valid IPv4 or IPv6 prefix"
    monkeypatch.setenv("OVERLAY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["reload", dist_url]) == 1
    assert "reload refused" in capsys.readouterr().err


def test_the_summary_shows_the_fleet_of_distributors_and_an_unreachable_store() -> None:
    fleet = {"store": "etcd", "prefix": "/overlay/lab", "state": "unavailable", "unavailable_for_s": 4.2,
             "last_error": "no etcd endpoint answered", "applied_revision": 12, "rebuilds": 5,
             "distributors": {"dist1": {"underlay": "192.0.2.2:4754"}, "dist2": {"underlay": "192.0.2.3:4754"}},
             "votes": {"dist1": {"up": ["tm1"], "down": ["tm2"]}}, "agreed_down": ["tm2"]}
    text = format_summary({"role": "distributor", "name": "dist1", "fleet": fleet}, {"ok": True}, {})
    assert "fleet store: etcd /overlay/lab · UNAVAILABLE · revision 12" in text
    assert "forwarding on the last agreed view (no etcd endpoint answered)" in text
    assert [line.split() for line in text.splitlines() if line.startswith("dist")][1:] == [
        ["dist1", "192.0.2.2:4754", "tm2"], ["dist2", "192.0.2.3:4754", "-"]]
    assert "agreed down: tm2" in text
    assert "fleet store" not in format_summary({"role": "distributor", "fleet": {"store": "file"}}, {"ok": True}, {})


def test_the_summary_says_how_the_datapath_runs() -> None:
    text = format_summary({"role": "distributor", "datapath": {"compiled": True, "tun_offload": True, "workers": 2}},
                          {"ok": True}, {})
    assert "datapath: compiled · TUN offloads on · workers 2" in text
    text = format_summary({"role": "tm", "datapath": {"compiled": False, "tun_offload": False, "workers": 1}},
                          {"ok": True}, {})
    assert "datapath: pure Python · TUN offloads off · workers 1" in text
    assert "datapath" not in format_summary({"role": "tm"}, {"ok": True}, {})
