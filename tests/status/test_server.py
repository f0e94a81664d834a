"""Every endpoint of the status service through aiohttp's test client, with fake providers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from overlay.status.server import build_app, start_status_server

from .conftest import ADMIN_TOKEN, TRAFFIC_STEP, FakeDistributor, FakeTm

MakeClient = Callable[[web.Application], Awaitable[TestClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient] = []

    async def make(app: web.Application) -> TestClient:
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def dist_client(make_client: MakeClient, distributor: FakeDistributor) -> TestClient:
    return await make_client(build_app(distributor, admin=distributor, admin_token=ADMIN_TOKEN, sample_interval=0.02))


async def test_status_is_the_providers_json(dist_client: TestClient) -> None:
    response = await dist_client.get("/status")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["role"] == "distributor"
    assert body["tms"]["tm2"]["admin"] == "draining"


async def test_healthz_ready_and_not_ready(dist_client: TestClient, distributor: FakeDistributor) -> None:
    response = await dist_client.get("/healthz")
    assert (response.status, (await response.json())["ok"]) == (200, True)
    distributor.ready = False
    response = await dist_client.get("/healthz")
    assert response.status == 503
    assert await response.json() == {"ok": False, "tms_up": 2, "reason": "no TM up"}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_parse_back_with_the_documented_names(dist_client: TestClient) -> None:
    response = await dist_client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = _samples(await response.text())
    # The sampler calls status() too: count the calls from one counter, check the others against it.
    calls = samples[("overlay_packets_total", (("tm", "tm1"),))] / TRAFFIC_STEP["tm1"]
    assert calls >= 1 and calls.is_integer()
    expected = {
        ("overlay_info", (("name", "dist1"), ("role", "distributor"), ("version", "0.1.0"))): 1.0,
        ("overlay_uptime_seconds", ()): 3723.5,
        ("overlay_config_generation", ()): 1.0,
        ("overlay_config_info", (("hash", "sha256:9f2c4e1d0b7a"),)): 1.0,
        ("overlay_packets_total", (("tm", "tm2"),)): 300 * calls,
        ("overlay_tm_up", (("tm", "tm1"),)): 1.0,
        ("overlay_tm_up", (("tm", "tm3"),)): 0.0,
        ("overlay_tm_serving", (("tm", "tm2"),)): 0.0,
        ("overlay_tm_reachable", (("tm", "tm2"),)): 1.0,
        ("overlay_tm_table_share", (("tm", "tm1"),)): 0.5,
        ("overlay_tm_weight", (("tm", "tm1"),)): 1.0,
        ("overlay_tm_admin_state", (("state", "draining"), ("tm", "tm2"))): 1.0,
        ("overlay_tm_admin_state", (("state", "enabled"), ("tm", "tm2"))): 0.0,
        ("overlay_health_replies_total", (("tm", "tm1"),)): 97.0,
        ("overlay_health_timeouts_total", (("tm", "tm3"),)): 40.0,
        ("overlay_health_rtt_seconds", (("tm", "tm1"),)): 0.0012,
        ("overlay_health_rejected_total", (("reason", "foreign_sender"),)): 2.0,
        ("overlay_health_all_down", ()): 0.0,
        ("overlay_decisions_total", (("cell", "unknown>virtual"),)): 1200 * calls,
        ("overlay_verdicts_total", (("reason", "malformed:gre"),)): 3.0,
        ("overlay_drops_total", (("reason", "truncated"),)): 3.0,
        ("overlay_rx_packets_total", ()): 1000 * calls,
        ("overlay_tun_rx_errors_total", ()): 0.0,
        ("overlay_udp_sockets", ()): 2.0,
        ("overlay_status_skipped_values", ()): 0.0,
    }
    assert {key: samples.get(key) for key in expected} == expected
    # A TM whose RTT is unknown (down) has no rtt sample rather than a fake zero.
    assert ("overlay_health_rtt_seconds", (("tm", "tm3"),)) not in samples
    # Per-entity flat counters are not turned into one metric name per TM or cell.
    assert not [name for name, _ in samples if name.startswith(("overlay_tm_tm", "overlay_cell_"))]


async def test_metrics_of_a_tm_expose_its_connection_table(make_client: MakeClient, tm: FakeTm) -> None:
    client = await make_client(build_app(tm))
    samples = _samples(await (await client.get("/metrics")).text())
    address = (("address", "203.0.113.101"), ("protocol", "tcp"))
    expected = {
        ("overlay_conntrack_entries", ()): 42.0,
        ("overlay_conntrack_limit", ()): 65536.0,
        ("overlay_conntrack_fullness", ()): 0.0006,
        ("overlay_conntrack_entries_by_state", (("state", "syn_sent"),)): 2.0,
        ("overlay_conntrack_created_total", ()): 50.0,
        ("overlay_nat_ports_in_use", address): 3.0,
        ("overlay_nat_ports_capacity", address): 64512.0,
        ("overlay_nat_ports_exhausted_total", address): 1.0,
        ("overlay_service_server_connections", (("server", "203.0.113.11:80"), ("service", "web"))): 19.0,
        ("overlay_drops_total", (("reason", "no_state"),)): 7.0,
        ("overlay_status_skipped_values", ()): 0.0,
    }
    assert {key: samples.get(key) for key in expected} == expected
    assert samples[("overlay_peer_packets_total", (("peer", "dist1"),))] >= 10


async def history_once(client: TestClient, ready: Callable[[dict], bool], seconds: float = 10.0) -> dict:
    """/api/history as soon as `ready(body)`: the sampler runs on the wall clock, so wait for what the
    test needs instead of sleeping a fixed time (bounded: a sampler that stopped fails the test)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        body = await (await client.get("/api/history")).json()
        if ready(body) or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.01)


async def test_history_has_per_tm_rates_and_shares(dist_client: TestClient) -> None:
    body = await history_once(dist_client, lambda body: len(body["samples"]) >= 3)
    assert body["series"] == ["tm1", "tm2", "tm3"]
    assert body["errors"] == 0
    assert len(body["samples"]) >= 3
    # Other requests may call status() between samples, so rates vary; the proportions never do.
    for sample in body["samples"]:
        total = sum(sample["pps"].values())
        assert total > 0
        assert sample["pps"]["tm1"] / total == pytest.approx(0.5)
        assert sample["pps"]["tm3"] / total == pytest.approx(0.2)


async def test_history_survives_a_failing_provider(make_client: MakeClient, distributor: FakeDistributor) -> None:
    class Flaky(FakeDistributor):
        def status(self) -> dict:
            if self.calls % 2:
                self.calls += 1
                raise RuntimeError("provider bug")
            return super().status()

    client = await make_client(build_app(Flaky(), sample_interval=0.02))
    body = await history_once(client, lambda body: body["errors"] >= 2 and len(body["samples"]) >= 1)
    assert body["errors"] >= 2
    assert body["samples"], "the sampler kept going after errors"


async def test_page_and_its_assets_are_served_without_external_references(dist_client: TestClient) -> None:
    page = await dist_client.get("/")
    assert page.status == 200
    html = await page.text()
    assert '<svg id="share-chart"' in html
    for asset in ("/static/app.js", "/static/style.css"):
        response = await dist_client.get(asset)
        assert response.status == 200, asset
        text = await response.text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, asset
    assert "https://" not in html and "http://" not in html


ADMIN_CASES = [
    {"description": "no Authorization header", "headers": {}, "path": "/admin/tm/tm1/drain", "expected": 401},
    {"description": "wrong token", "headers": {"Authorization": "Bearer nope"}, "path": "/admin/tm/tm1/drain", "expected": 401},
    {"description": "token as Basic auth", "headers": {"Authorization": f"Basic {ADMIN_TOKEN}"}, "path": "/admin/tm/tm1/drain", "expected": 401},
    {"description": "token prefix only", "headers": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, "path": "/admin/tm/tm1/drain", "expected": 401},
    {"description": "reload without token", "headers": {}, "path": "/admin/reload", "expected": 401},
    {"description": "unknown TM", "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}, "path": "/admin/tm/tm9/drain", "expected": 404},
    {"description": "unknown action", "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}, "path": "/admin/tm/tm1/reboot", "expected": 404},
]


@pytest.mark.parametrize("case", ADMIN_CASES, ids=lambda case: case["description"])
async def test_admin_refusals(dist_client: TestClient, distributor: FakeDistributor, case: dict) -> None:
    response = await dist_client.post(case["path"], headers=case["headers"])
    assert response.status == case["expected"]
    if case["expected"] == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert distributor.states == {"tm1": "enabled", "tm2": "draining", "tm3": "enabled"}
    assert distributor.generation == 1


@pytest.mark.parametrize("action, state", [("drain", "draining"), ("disable", "disabled"), ("enable", "enabled")])
async def test_admin_sets_tm_state(dist_client: TestClient, distributor: FakeDistributor, action: str, state: str) -> None:
    response = await dist_client.post(f"/admin/tm/tm3/{action}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status == 200
    assert await response.json() == {"ok": True, "tm": "tm3", "state": state, "previous": "enabled"}
    assert distributor.states["tm3"] == state


async def test_admin_reload_accepted_and_refused(dist_client: TestClient, distributor: FakeDistributor) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = await dist_client.post("/admin/reload", headers=auth)
    assert (response.status, await response.json()) == (200, {"ok": True, "error": None, "generation": 2})
    distributor.reload_error = "config:7: tm[1].weight: must be > 0"
    response = await dist_client.post("/admin/reload", headers=auth)
    assert response.status == 422
    assert await response.json() == {"ok": False, "error": "config:7: tm[1].weight: must be > 0", "generation": 2}


async def test_admin_accepts_an_async_controller(make_client: MakeClient, distributor: FakeDistributor) -> None:
    class AsyncAdmin:
        async def set_tm_state(self, name: str, state: str) -> dict:
            await asyncio.sleep(0)
            return distributor.set_tm_state(name, state)

        async def reload(self) -> dict:
            return distributor.reload()

    client = await make_client(build_app(distributor, admin=AsyncAdmin(), admin_token=ADMIN_TOKEN))
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await client.post("/admin/tm/tm1/disable", headers=auth)).status == 200
    assert distributor.states["tm1"] == "disabled"
    assert (await client.post("/admin/tm/ghost/disable", headers=auth)).status == 404


@pytest.mark.parametrize("token", [None, ""], ids=["None", "empty"])
async def test_admin_routes_absent_without_a_token(make_client: MakeClient, distributor: FakeDistributor, token: str | None) -> None:
    client = await make_client(build_app(distributor, admin=distributor, admin_token=token))
    for path in ("/admin/tm/tm1/drain", "/admin/reload"):
        response = await client.post(path, headers={"Authorization": "Bearer "})
        assert response.status == 404, path
    assert distributor.states["tm1"] == "enabled"


async def test_admin_routes_absent_on_a_tm(make_client: MakeClient, tm: FakeTm) -> None:
    client = await make_client(build_app(tm, admin_token=ADMIN_TOKEN))
    response = await client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status == 404


async def test_start_status_server_binds_at_once_and_closes(distributor: FakeDistributor) -> None:
    server = await start_status_server(distributor, "127.0.0.1", 0)
    try:
        assert server.port > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/healthz") as response:
                assert response.status == 200
    finally:
        await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"{server.url}/healthz")


async def test_start_status_server_reports_a_port_in_use(distributor: FakeDistributor) -> None:
    first = await start_status_server(distributor, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await start_status_server(distributor, "127.0.0.1", first.port)
    finally:
        await first.close()


async def test_admin_refused_by_the_agent_is_a_409_with_its_reason(make_client: MakeClient, distributor: FakeDistributor) -> None:
    class FleetManaged:
        def set_tm_state(self, name: str, state: str) -> dict:
            raise ValueError("this fleet's admin states live in its store: use `overlay fleet drain|enable|disable`")

        def reload(self) -> dict:
            return distributor.reload()

    client = await make_client(build_app(distributor, admin=FleetManaged(), admin_token=ADMIN_TOKEN))
    response = await client.post("/admin/tm/tm1/drain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status == 409
    assert "overlay fleet drain" in (await response.json())["error"]
