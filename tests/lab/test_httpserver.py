"""The lab's HTTP server, in process on loopback: every endpoint, and its refusals."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from overlay.lab.httpserver import build_app


@pytest.fixture
async def client():
    async with TestClient(TestServer(build_app("server9"))) as test_client:
        yield test_client


@pytest.fixture
async def remote():
    """A second server standing in for the remote host, on a loopback port of its own."""
    runner = web.AppRunner(build_app("remote"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_index_names_the_server(client) -> None:
    response = await client.get("/")
    assert (response.status, await response.text()) == (200, "server9\n")


async def test_whoami_reports_the_peer_address(client) -> None:
    response = await client.get("/whoami")
    assert await response.json() == {"server": "server9", "peer": "127.0.0.1"}


async def test_upload_counts_the_body(client) -> None:
    response = await client.post("/upload", data=b"x" * 300_000)
    assert await response.json() == {"server": "server9", "bytes": 300_000}


async def test_slow_streams_lines_until_done(client) -> None:
    response = await client.get("/slow", params={"seconds": "0.3", "interval": "0.1"})
    lines = (await response.text()).splitlines()
    assert 2 <= len(lines) <= 5
    assert lines[0] == "server9 1" and lines[-1].startswith("server9 done")


async def test_outbound_reports_what_the_remote_saw(client, remote) -> None:
    response = await client.get("/outbound", params={"url": f"{remote}/whoami"})
    answer = await response.json()
    assert response.status == 200
    assert answer == {"server": "server9", "status": 200, "remote": {"server": "remote", "peer": "127.0.0.1"}}


BAD_REQUESTS = [
    {"description": "outbound without url", "path": "/outbound", "params": {}, "status": 400},
    {"description": "outbound to a closed port", "path": "/outbound",
     "params": {"url": "CLOSED"}, "status": 502},
    {"description": "slow with a non-number", "path": "/slow", "params": {"seconds": "soon"}, "status": 400},
    {"description": "unknown path", "path": "/nothing", "params": {}, "status": 404},
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c["description"] for c in BAD_REQUESTS])
async def test_bad_requests_are_refused_with_a_status(client, case: dict) -> None:
    params = {k: (f"http://127.0.0.1:{free_port()}/" if v == "CLOSED" else v) for k, v in case["params"].items()}
    response = await asyncio.wait_for(client.get(case["path"], params=params), timeout=15)
    assert response.status == case["status"]
    if response.content_type == "application/json":
        assert json.loads(await response.text())["server"] == "server9"
