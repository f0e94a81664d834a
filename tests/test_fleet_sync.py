"""Several distributors' shared fleet view (issue 11), against a real etcd: registration under leases,
the watched view with its coalesced rebuilds, agreed health by quorum, and what happens while etcd is away.
The agents' use of it is proven in the ECMP lab; here, the parts every distributor runs the same."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.config import load_node_config, parse_node_config
from overlay.configlib import ConfigError
from overlay.etcd import EtcdClient
from overlay.fleetview import FleetStoreConfig, FleetView, parse_fleet_document
from overlay.runtime import fleet_sync
from overlay.runtime.fleet_sync import FleetSync
from tests.etcdserver import EtcdServer, etcd_server_fixture  # noqa: F401 (the etcd_server fixture)

# A real etcd with real lease waits: not part of the fast suite (`-m "not etcd"`); CI runs them.
pytestmark = pytest.mark.etcd

CONFIG = Path(__file__).resolve().parents[1] / "config"
PREFIX = "/overlay/test"
DOCUMENT = """\
[[tm]]
name = "tm1"
underlay = "192.0.2.71"
weight = 2
management = ["203.0.113.201"]
xlate = ["203.0.113.101", "2001:db8:ee::101"]

[[tm]]
name = "tm2"
underlay = "192.0.2.72"
management = ["203.0.113.202"]
xlate = ["203.0.113.102", "2001:db8:ee::102"]
"""


class Recorder:
    """A FleetSync and every view it hands over."""

    def __init__(self, url: str, name: str, settle: float = 0.05, ttl: int = 2) -> None:
        self.views: list[FleetView] = []
        config = FleetStoreConfig("etcd", (url,), PREFIX, ttl, settle)
        self.sync = FleetSync(config, name, {"underlay": "192.0.2.2:4754"}, self.views.append)

    async def until(self, predicate, timeout: float = 10.0) -> FleetView:  # type: ignore[no-untyped-def]
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.views and predicate(self.views[-1]):
                return self.views[-1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no view matched in {timeout}s; last: {self.views[-1] if self.views else None}")


async def test_a_distributor_registers_votes_and_follows_the_store(etcd_server: EtcdServer) -> None:
    recorder = Recorder(etcd_server.url, "dist1")
    recorder.sync.start(asyncio.get_running_loop())
    try:
        view = await recorder.until(lambda v: "dist1" in v.distributors)
        assert view.distributors["dist1"]["underlay"] == "192.0.2.2:4754" and "dist1" in view.votes
        async with EtcdClient([etcd_server.url]) as etcd:
            await etcd.put(f"{PREFIX}/tms", DOCUMENT)
            await etcd.put(f"{PREFIX}/admin/tm2", "draining")
            view = await recorder.until(lambda v: v.document == DOCUMENT and v.admin == {"tm2": "draining"})
            await etcd.put(f"{PREFIX}/admin/tm2", "sideways")     # refused, named: never a state
            view = await recorder.until(lambda v: "admin/tm2" in v.problems)
            assert "tm2" not in view.admin and recorder.sync.status()["state"] == "ok"
    finally:
        await recorder.sync.stop()
    async with EtcdClient([etcd_server.url]) as etcd:
        assert await etcd.get(f"{PREFIX}/distributors/dist1") is None, "leaving revokes the lease"


async def test_a_watch_storm_coalesces_into_few_rebuilds_without_stalling_the_loop(etcd_server: EtcdServer) -> None:
    recorder = Recorder(etcd_server.url, "dist1", settle=0.05)
    loop = asyncio.get_running_loop()
    recorder.sync.start(loop)
    try:
        await recorder.until(lambda v: "dist1" in v.distributors)
        before = recorder.sync.rebuilds
        worst = 0.0

        async def ticker() -> None:   # the packet loop's view: how late does a 5 ms timer fire?
            nonlocal worst
            while True:
                start = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - start - 0.005)

        ticking = loop.create_task(ticker())
        async with EtcdClient([etcd_server.url]) as etcd:
            start = loop.time()
            for index in range(100):                 # 100 updates within a second
                await etcd.put(f"{PREFIX}/admin/tm{index % 3 + 1}", ("enabled", "draining")[index % 2])
            elapsed = loop.time() - start
            await etcd.put(f"{PREFIX}/admin/tm1", "disabled")
        view = await recorder.until(lambda v: v.admin.get("tm1") == "disabled")
        ticking.cancel()
        rebuilds = recorder.sync.rebuilds - before
        print(f"\n101 updates in {elapsed:.2f}s: {rebuilds} rebuilds, {recorder.sync.events} events, "
              f"worst timer lateness {worst * 1000:.1f} ms")
        assert elapsed < 1.5 and recorder.sync.events >= 101
        assert rebuilds <= 101 // 4, "coalesced: a rebuild per settle window, not per update"
        assert view.admin == {"tm1": "disabled", "tm2": "draining", "tm3": "enabled"}
        assert worst < 0.5, "the watch never stalls the loop"
    finally:
        await recorder.sync.stop()


async def test_health_is_agreed_by_a_majority_of_the_live_distributors(etcd_server: EtcdServer) -> None:
    a, b, c = (Recorder(etcd_server.url, name) for name in ("dist-a", "dist-b", "dist-c"))
    loop = asyncio.get_running_loop()
    for each in (a, b, c):
        each.sync.start(loop)
    tms = ["tm1", "tm2", "tm3"]
    try:
        await a.until(lambda v: len(v.distributors) == 3)
        a.sync.publish({"tm1", "tm3"}, {"tm2"})          # one of three sees tm2 down: it stays in
        view = await a.until(lambda v: "tm2" in v.votes["dist-a"].down)
        assert view.agreed_down(tms) == set()
        b.sync.publish({"tm1", "tm3"}, {"tm2"})          # two of three: a quorum
        view = await c.until(lambda v: "tm2" in v.votes["dist-b"].down)
        assert view.agreed_down(tms) == {"tm2"}, "every distributor, c included, sees the same agreement"
        await b.sync.stop()                              # b leaves: a alone of two is no majority
        view = await c.until(lambda v: "dist-b" not in v.distributors)
        assert view.agreed_down(tms) == set()
    finally:
        for each in (a, b, c):
            await each.sync.stop()


async def test_with_etcd_away_the_last_view_holds_and_it_reconverges_when_etcd_returns(etcd_server: EtcdServer) -> None:
    recorder = Recorder(etcd_server.url, "dist1", ttl=1)
    recorder.sync.start(asyncio.get_running_loop())
    try:
        async with EtcdClient([etcd_server.url]) as etcd:
            await etcd.put(f"{PREFIX}/admin/tm2", "draining")
        await recorder.until(lambda v: v.admin == {"tm2": "draining"})
        views = len(recorder.views)
        etcd_server.kill()
        for _ in range(200):                             # bounded: the keepalive notices within ttl/3 + timeout
            if recorder.sync.state == "unavailable":
                break
            await asyncio.sleep(0.05)
        status = recorder.sync.status()
        assert status["state"] == "unavailable" and status["last_error"] and status["outages"] == 1
        await asyncio.sleep(1.6)                         # longer than the lease: it expires meanwhile
        assert len(recorder.views) == views, "no view is applied while the store is away: nothing flaps"
        etcd_server.start()
        async with EtcdClient([etcd_server.url]) as etcd:
            await etcd.put(f"{PREFIX}/admin/tm2", "enabled")
        view = await recorder.until(lambda v: v.admin == {"tm2": "enabled"} and "dist1" in v.distributors, timeout=20)
        assert recorder.sync.state == "ok" and view.votes["dist1"] is not None
    finally:
        await recorder.sync.stop()


async def test_reconnection_attempts_come_at_most_half_a_lease_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backoff doubles from RETRY_MIN but never past half the lease's TTL (nor RETRY_MAX)."""
    assert [fleet_sync.retry_max(ttl) for ttl in (1, 2, 3, 10)] == [0.5, 1.0, 1.5, fleet_sync.RETRY_MAX]
    sync = FleetSync(FleetStoreConfig("etcd", ("http://127.0.0.1:9",), PREFIX, 1, 0.05), "dist1", {}, lambda view: None)
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def refused(client: EtcdClient) -> None:
        raise OSError("connection refused")

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) >= 6:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(sync, "_session", refused)
    monkeypatch.setattr(fleet_sync.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        await sync._run()
    assert delays == [0.25, 0.5, 0.5, 0.5, 0.5, 0.5] and sync.state == "unavailable"


async def test_a_restarted_etcd_never_lets_the_registration_lapse(etcd_server: EtcdServer) -> None:
    """etcd gives every lease its TTL again when it comes back; the distributor must re-register within it.
    With a backoff of up to 2 s and lease_ttl = 1, a restart just after a failed attempt let the old lease
    expire first: the registration vanished and came back (an ECMP controller withdrew the distributor).
    The key's create_revision tells: overwritten under the new lease, it keeps it; deleted and put again, not."""
    recorder = Recorder(etcd_server.url, "dist1", ttl=1)
    recorder.sync.start(asyncio.get_running_loop())
    key = f"{PREFIX}/distributors/dist1"
    try:
        await recorder.until(lambda v: "dist1" in v.distributors)
        async with EtcdClient([etcd_server.url]) as etcd:
            registered = await etcd.get(key)
        assert registered is not None
        etcd_server.kill()
        # Attempts after 0.25, 0.75, 1.75 and 3.75 s with the old backoff (the next at 5.75 s): back at 3.9 s,
        # etcd expires the old lease about 1.1-1.6 s later — before that next attempt.
        await asyncio.sleep(3.9)
        etcd_server.start()
        for _ in range(100):   # bounded: 5 s
            if recorder.sync.state == "ok":
                break
            await asyncio.sleep(0.05)
        assert recorder.sync.state == "ok"
        await asyncio.sleep(2.0)   # the old lease's TTL and etcd's expiry sweep (0.5 s) are over
        async with EtcdClient([etcd_server.url]) as etcd:
            now = await etcd.get(key)
        assert now is not None and now.create_revision == registered.create_revision, \
            "the registration lapsed while etcd was back and the distributor not yet"
    finally:
        await recorder.sync.stop()


# -- the document and [fleet], validated as every distributor will -----------------------------------------

def test_the_fleet_document_replaces_the_files_tms_and_errors_name_its_lines() -> None:
    text = (CONFIG / "distributor.toml").read_text()
    node = parse_node_config(text, "distributor.toml", CONFIG, parse_fleet_document(DOCUMENT, "etcd:/x/tms"))
    assert node.distributor is not None and [(t.name, t.weight) for t in node.distributor.tms] == [("tm1", 2), ("tm2", 1)]
    bad = DOCUMENT.replace('"203.0.113.102"', '"203.0.113.250"')
    with pytest.raises(ConfigError) as error:
        parse_node_config(text, "distributor.toml", CONFIG, parse_fleet_document(bad, "etcd:/x/tms"))
    assert str(error.value).startswith("etcd:/x/tms:12: tm[1].xlate[0]")
    with pytest.raises(ConfigError) as error:
        parse_fleet_document(DOCUMENT + '\n[hash]\nseed = "x"\n', "etcd:/x/tms")
    assert "hash" in str(error.value) and ":14:" in str(error.value)


@pytest.mark.parametrize(("fleet", "field"), [
    ('store = "zookeeper"', "fleet.store"),
    ('store = "etcd"\nprefix = "overlay/x"', "fleet.prefix"),
    ('store = "etcd"\nendpoints = ["127.0.0.1:2379"]', "fleet.endpoints[0]"),
    ('store = "etcd"\nlease_ttll = 3', "fleet.lease_ttll"),
])
def test_a_bad_fleet_section_is_refused_naming_the_field(tmp_path: Path, fleet: str, field: str) -> None:
    path = tmp_path / "distributor.toml"
    path.write_text((CONFIG / "distributor.toml").read_text() + f"\n[fleet]\n{fleet}\n")
    with pytest.raises(ConfigError) as error:
        load_node_config(path)
    assert error.value.field == field and error.value.line is not None


def overlay_fleet(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlay", "fleet", *argv], capture_output=True, text=True, timeout=30)


def test_the_cli_validates_before_it_writes_and_operates_the_fleet(etcd_server: EtcdServer, tmp_path: Path) -> None:
    config = tmp_path / "distributor.toml"
    config.write_text((CONFIG / "distributor.toml").read_text()
                      + f'\n[fleet]\nstore = "etcd"\nendpoints = ["{etcd_server.url}"]\nprefix = "{PREFIX}"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(DOCUMENT.replace('"192.0.2.72"', '"192.0.2.71"'))
    result = overlay_fleet("--config", str(config), "put", str(bad))
    assert result.returncode == 1 and f"{bad}:10: tm[1].underlay" in result.stderr, result.stderr
    good = tmp_path / "fleet.toml"
    good.write_text(DOCUMENT)
    assert overlay_fleet("--config", str(config), "get").returncode == 0
    assert json.loads(overlay_fleet("--config", str(config), "get").stdout)["document"] is None, "nothing written"
    result = overlay_fleet("--config", str(config), "put", str(good))
    assert result.returncode == 0, result.stderr
    result = overlay_fleet("--etcd", etcd_server.url, "--prefix", PREFIX, "drain", "tm2")
    assert result.returncode == 0, result.stderr
    fleet = json.loads(overlay_fleet("--config", str(config), "get").stdout)
    assert fleet["document"] == DOCUMENT and fleet["admin"] == {"tm2": "draining"}
    etcd_server.kill()
    result = overlay_fleet("--config", str(config), "get")
    assert result.returncode == 3 and "etcd" in result.stderr
