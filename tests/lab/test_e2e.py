"""The reference lab with the real agents: real TCP connections through distributor and TMs, end to end.

One lab per module (it takes a few seconds to come up); every test talks to it from the client namespace
the way a user would, and reads the agents' own `/status` for what only they can tell (per-TM packets,
invalid drops, translated ICMP errors).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Callable

import aiohttp
import pytest

from overlay.lab import nsnet, topology
from overlay.lab.lab import Lab
from overlay.lab.report import invalid_drops, tm_packets

from .conftest import needs_lab

pytestmark = [pytest.mark.lab, needs_lab]

XLATE_ADDRESSES = {*topology.XLATE_V4.values(), *topology.XLATE_V6.values()}
CLIENT_ADDRESSES = {
    topology.CLIENT_V4, topology.CLIENT_V6, *topology.CLIENT_SOURCES_V4, *topology.CLIENT_SOURCES_V6
}


@pytest.fixture(scope="module")
def lab(make_lab: Callable[..., Lab]) -> Lab:
    lab = make_lab()
    try:
        lab.up()
    except Exception:
        print(lab.agent_logs())
        raise
    return lab


@pytest.fixture
def logs(lab: Lab, show_logs_on_failure: Callable[[Lab], None]) -> Lab:
    show_logs_on_failure(lab)
    return lab


def host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def in_client(lab: Lab, function: Callable[[], object]) -> object:
    return nsnet.in_namespace(lab.ns("client"), function)


async def get_from(source: str, url: str, timeout: float = 10.0, **kwargs: object) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        method = "POST" if "data" in kwargs else "GET"
        async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
            return response.status, await response.text()


def total_invalid(lab: Lab) -> dict[str, dict[str, int]]:
    return {tm: invalid_drops(lab.status(tm)) for tm in topology.TMS}


def test_thousands_of_requests_from_many_clients_all_succeed_and_reach_every_tm(logs: Lab) -> None:
    lab = logs
    before = tm_packets(lab.status("dist"))
    report = lab.traffic(v4=100, v6=100, count=3000, duration=60, concurrency=48)
    after = tm_packets(lab.status("dist"))
    assert report.failed == 0, report.failures
    assert report.requests == 3000 and report.sources_used == 200
    assert set(report.servers) == {"server1", "server2"}
    assert all(after[tm] - before.get(tm, 0) > 0 for tm in topology.TMS), (before, after)
    assert total_invalid(lab) == {tm: {} for tm in topology.TMS}


def test_long_lived_connections_stay_up_while_other_traffic_runs(logs: Lab) -> None:
    lab = logs
    sources = [*topology.CLIENT_SOURCES_V4[:4], *topology.CLIENT_SOURCES_V6[:4]]

    async def streams() -> list[str]:
        async def one(source: str) -> str:
            url = f"http://{host(topology.VIP_V6 if ':' in source else topology.VIP_V4)}/slow?seconds=6&interval=0.3"
            status, text = await get_from(source, url, timeout=30)
            return text if status == 200 else f"HTTP {status}"

        return list(await asyncio.gather(*(one(s) for s in sources), return_exceptions=True))  # type: ignore[arg-type]

    results: list[object] = []
    streaming = threading.Thread(target=lambda: results.extend(in_client(lab, lambda: asyncio.run(streams()))))  # type: ignore[arg-type]
    streaming.start()
    report = lab.traffic(v4=50, v6=50, count=1000, duration=30, concurrency=32)
    streaming.join(timeout=60)
    assert report.failed == 0, report.failures
    assert len(results) == len(sources)
    for source, text in zip(sources, results):
        assert isinstance(text, str) and re.search(r"server[12] done \d+\n$", text), (source, text)
        assert int(text.rsplit(" ", 1)[1]) >= 15  # ~20 lines in 6 s at 0.3 s: the stream never stalled


@pytest.mark.parametrize(
    "description, sources, vip, remote",
    [
        ("IPv4: servers reach the remote host through SNAT",
         topology.CLIENT_SOURCES_V4[10:18], topology.VIP_V4, topology.REMOTE_V4),
        ("IPv6: servers reach the remote host through SNAT",
         topology.CLIENT_SOURCES_V6[10:18], topology.VIP_V6, topology.REMOTE_V6),
    ],
)
def test_server_initiated_connections_leave_from_a_tm_xlate_address(
    logs: Lab, description: str, sources: tuple[str, ...], vip: str, remote: str
) -> None:
    lab = logs
    url = f"http://{host(vip)}/outbound?url=http://{host(remote)}/whoami"

    async def several() -> list[tuple[int, str]]:
        # Several clients, so both servers make outbound connections.
        return list(await asyncio.gather(*(get_from(s, url) for s in sources)))

    answers = in_client(lab, lambda: asyncio.run(several()))
    for status, text in answers:  # type: ignore[union-attr]
        answer = json.loads(text)
        assert status == 200, answer
        assert answer["remote"]["server"] == "remote"
        assert answer["remote"]["peer"] in XLATE_ADDRESSES, answer


@pytest.mark.parametrize("tm", topology.TMS)
def test_management_address_reaches_that_tm(logs: Lab, tm: str) -> None:
    lab = logs
    url = f"http://{topology.MANAGEMENT_V4[tm]}:{topology.STATUS_PORT}/status"
    status = nsnet.http_json(lab.ns("client"), url)
    assert status["name"] == tm


@pytest.mark.parametrize(
    "description, target",
    [
        ("IPv4: client to the plain inside host is routed, not translated", topology.PLAIN_V4),
        ("IPv6: client to the plain inside host is routed, not translated", topology.PLAIN_V6),
    ],
)
def test_traffic_between_unknown_addresses_is_routed(logs: Lab, description: str, target: str) -> None:
    lab = logs
    cells_before = lab.status("dist")["cells"]
    try:
        status, body = nsnet.http_request(lab.ns("client"), f"http://{host(target)}/whoami", timeout=3.0)
    except OSError as error:
        cells = {cell: n - cells_before.get(cell, 0) for cell, n in lab.status("dist")["cells"].items()}
        decided = {cell: n for cell, n in cells.items() if n}
        pytest.fail(f"no answer from {target} ({error}); the distributor decided {decided} meanwhile")
    answer = json.loads(body)
    assert (status, answer["server"]) == (200, "plain")
    assert answer["peer"] in CLIENT_ADDRESSES
    cells_after = lab.status("dist")["cells"]
    # The reply crossed the distributor's TUN and was decided "unknown > unknown" = route.
    assert cells_after.get("unknown>unknown", 0) > cells_before.get("unknown>unknown", 0)


def route_mtu(lab: Lab, destination: str, source: str) -> int | None:
    output = lab.exec("client", ["ip", "route", "get", destination, "from", source]).stdout
    match = re.search(r"\bmtu (\d+)", output)
    return int(match.group(1)) if match else None


def icmp_translated(lab: Lab) -> int:
    return sum(
        count for tm in topology.TMS for reason, count in lab.status(tm).get("counters", {}).items()
        if reason == "translated.icmp_related" and isinstance(count, int)
    )


def icmp_invalid(lab: Lab) -> dict[str, int]:
    """ICMP errors a TM dropped because it holds no state for the flow they quote (or they are misaddressed)."""
    return {
        f"{tm} {reason}": count for tm, reasons in total_invalid(lab).items() for reason, count in reasons.items()
        if reason.startswith("invalid.icmp_error")
    }


@pytest.mark.parametrize("family", [4, 6])
def test_fragmentation_needed_reaches_the_flows_tm_and_the_client_adapts(logs: Lab, family: int) -> None:
    lab = logs
    vip = topology.VIP_V4 if family == 4 else topology.VIP_V6
    pool = topology.CLIENT_SOURCES_V4 if family == 4 else topology.CLIENT_SOURCES_V6
    body = os.urandom(200_000)
    translated_before = icmp_translated(lab)
    icmp_invalid_before = icmp_invalid(lab)

    async def uploads() -> list[tuple[int, str]]:
        return list(await asyncio.gather(*(get_from(s, f"http://{host(vip)}/upload", timeout=20, data=body)
                                           for s in pool[40:56])))

    answers = [json.loads(text) for status, text in in_client(lab, lambda: asyncio.run(uploads()))]  # type: ignore[union-attr]
    assert all(answer["bytes"] == len(body) for answer in answers), answers
    assert "server2" in {answer["server"] for answer in answers}  # the one behind the 1280-byte hop
    assert route_mtu(lab, vip, pool[40]) == topology.PMTU_BOTTLENECK
    assert icmp_translated(lab) > translated_before
    # Translated, never "icmp-error-no-state": each error reached the TM that holds the flow it quotes.
    assert icmp_invalid(lab) == icmp_invalid_before
