"""The traffic generator against loopback servers: counting, bounds, sources, and failures by kind.

Loopback owns all of 127.0.0.0/8, so binding 127.0.0.2–.9 as client sources needs no root.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import aiohttp
import pytest
from aiohttp import web

from overlay.lab.httpserver import build_app
from overlay.lab.traffic import TrafficPlan, TrafficReport, failure_kind, generate

SOURCES = tuple(f"127.0.0.{host}" for host in range(2, 10))


@pytest.fixture
async def server_url():
    runner = web.AppRunner(build_app("loop"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


async def test_counts_every_request_and_the_answering_server(server_url: str) -> None:
    report = await generate(TrafficPlan(SOURCES, url_v4=server_url, count=200, concurrency=16))
    assert (report.requests, report.succeeded, report.failed) == (200, 200, 0)
    assert report.servers == {"loop": 200}
    assert report.sources_used == len(SOURCES)
    assert set(report.latency_ms) == {"p50", "p90", "p99", "max"}


async def test_each_request_comes_from_a_fresh_connection_on_a_rotating_source(server_url: str) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.remote} {request.transport.get_extra_info('peername')[1]}")  # type: ignore[union-attr]
        return web.Response(text="recorder\n")

    app = web.Application()
    app.router.add_get("/", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await generate(TrafficPlan(SOURCES[:4], url_v4=f"http://127.0.0.1:{port}/", count=8, concurrency=1))
    finally:
        await runner.cleanup()
    assert [entry.split()[0] for entry in seen] == list(SOURCES[:4]) * 2
    assert len(set(seen)) == 8  # no connection reused: every request is a new 5-tuple


async def test_duration_bounds_the_run(server_url: str) -> None:
    # A billion requests would never finish: only the duration can end this run. The outer timeout turns a
    # broken bound into a failure instead of a hang (no timing is asserted: the machine is shared).
    plan = TrafficPlan(SOURCES, url_v4=server_url, count=10**9, duration=0.5, concurrency=4)
    report = await asyncio.wait_for(generate(plan), timeout=60)
    assert 0 < report.requests < 10**9 and report.failed == 0


async def test_refused_connections_are_failures_by_kind() -> None:
    report = await generate(TrafficPlan(SOURCES[:2], url_v4=closed_url(), count=6, concurrency=2))
    assert (report.succeeded, report.failed) == (0, 6)
    assert report.failures == {"econnrefused": 6}


async def test_http_errors_are_failures_by_status(server_url: str) -> None:
    report = await generate(TrafficPlan(SOURCES[:1], url_v4=server_url + "missing", count=3, concurrency=1))
    assert report.failures == {"http-404": 3} and report.succeeded == 0


def test_no_sources_is_refused() -> None:
    with pytest.raises(ValueError):
        asyncio.run(generate(TrafficPlan(())))


FAILURE_KINDS = [
    {"description": "timeout", "error": TimeoutError(), "kind": "timeout"},
    {"description": "server closed the connection", "error": aiohttp.ServerDisconnectedError(), "kind": "server-disconnected"},
    {"description": "connection reset", "error": ConnectionResetError(errno.ECONNRESET, "reset"), "kind": "econnreset"},
    {"description": "no route", "error": OSError(errno.EHOSTUNREACH, "unreachable"), "kind": "ehostunreach"},
    {"description": "unknown error type", "error": aiohttp.ClientPayloadError("cut"), "kind": "ClientPayloadError"},
]


@pytest.mark.parametrize("case", FAILURE_KINDS, ids=[c["description"] for c in FAILURE_KINDS])
def test_failure_kind(case: dict) -> None:
    assert failure_kind(case["error"]) == case["kind"]


def test_report_round_trips_through_json_form() -> None:
    report = TrafficReport(requests=5, succeeded=4, failures={"timeout": 1}, servers={"a": 4}, sources_used=2)
    again = TrafficReport.from_dict(report.to_dict())
    assert again == report and again.failed == 1
    assert "1 failed" in report.summary() and "timeout 1" in report.summary()
