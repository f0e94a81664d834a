"""The fleet page in a real headless Chromium: it renders, its JavaScript runs and shows the provider's data."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from overlay.status.server import StatusServer, start_status_server

from .conftest import FakeDistributor, FakeTm

pytestmark = pytest.mark.browser

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


async def run_chromium(url: str, *mode: str) -> str:
    """Load `url` headless, let its scripts run for 3 s of virtual time, return stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
            "--window-size=1200,900", "--virtual-time-budget=3000", *mode, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


class TextById(HTMLParser):
    """Text of every element with an id (cells separated by spaces), and those elements' attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self._open: list[str | None] = []
        self.rects = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        if element_id:
            self.attrs[element_id] = dict(attrs)
            self.text.setdefault(element_id, "")
        if tag == "rect" and "share-chart" in self._open:
            self.rects += 1
        if tag in ("tr", "td", "th", "span"):
            self.handle_data(" ")  # the DOM dump has no whitespace between cells
        if tag not in ("meta", "link", "br", "rect", "line", "path"):
            self._open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "link", "br", "rect", "line", "path") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.text[element_id] += data


def parse_dom(html: str) -> TextById:
    parser = TextById()
    parser.feed(html)
    return parser


@pytest.fixture
async def serve() -> AsyncIterator:
    servers: list[StatusServer] = []

    async def start(provider: object) -> StatusServer:
        server = await start_status_server(provider, "127.0.0.1", 0, sample_interval=0.1)  # type: ignore[arg-type]
        servers.append(server)
        await asyncio.sleep(1.0)  # ten history samples before the page loads: it must show them at once
        return server

    yield start
    for server in servers:
        await server.close()


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@needs_chromium
async def test_distributor_page_renders_fleet_share_health_and_drops(serve) -> None:
    server = await serve(FakeDistributor())
    dom = parse_dom(await run_chromium(f"{server.url}/", "--dump-dom"))
    assert squash(dom.text["node-name"]) == "dist1"
    assert squash(dom.text["readiness"]) == "ready"
    assert "config gen 1" in dom.text["node-facts"]
    members = squash(dom.text["members"])
    # One row per TM: name, admin state, health, share of the last seconds.
    assert re.search(r"tm1 enabled up 50\.0%", members), members
    assert re.search(r"tm2 draining up 30\.0%", members), members
    assert re.search(r"tm3 enabled down 20\.0%", members), members
    assert dom.rects >= 3 * 5, "the share chart draws stacked bars from the history"
    assert int(dom.attrs["share-chart"]["data-bars"] or 0) >= 5
    assert squash(dom.text["legend"]) == "tm1 tm2 tm3"
    assert "truncated 3" in squash(dom.text["drops"])
    assert "unknown>virtual" in dom.text["cells"]
    assert "malformed:gre 3" in squash(dom.text["reasons"])
    assert "hidden" in dom.attrs["reload-error"]
    assert squash(dom.text["updated"]).startswith("updated ")


@needs_chromium
async def test_tm_page_shows_peers_and_connection_table(serve) -> None:
    server = await serve(FakeTm())
    dom = parse_dom(await run_chromium(f"{server.url}/", "--dump-dom"))
    assert squash(dom.text["members-title"]) == "Peers"
    assert squash(dom.text["members"]).count("dist1") == 1
    assert "peers" in (dom.attrs["members"].get("class") or "")  # admin/health/rtt columns hidden
    assert re.search(r"dist1 100\.0%", squash(dom.text["members"])), dom.text["members"]
    assert "hidden" not in dom.attrs["conntrack-section"]
    conntrack = squash(dom.text["conntrack"])
    for row in ("entries 42", "limit 65.5 k", "fullness 0.06%", "established 40", "web → 203.0.113.11:80 19"):
        assert row in conntrack, conntrack


@needs_chromium
async def test_page_shows_a_refused_reload(serve) -> None:
    distributor = FakeDistributor()
    distributor.reload_error = "config/dist1.toml:7: tm[1].weight: must be > 0"
    server = await serve(distributor)
    dom = parse_dom(await run_chromium(f"{server.url}/", "--dump-dom"))
    assert "hidden" not in dom.attrs["reload-error"]
    assert squash(dom.text["reload-error"]) == "last reload refused, generation 1 stays: config/dist1.toml:7: tm[1].weight: must be > 0"


@needs_chromium
async def test_page_shouts_when_every_tm_is_down(serve) -> None:
    distributor = FakeDistributor()
    distributor.up = {tm: False for tm in distributor.up}
    distributor.ready = False
    server = await serve(distributor)
    dom = parse_dom(await run_chromium(f"{server.url}/", "--dump-dom"))
    assert "hidden" not in dom.attrs["all-down"]
    assert squash(dom.text["readiness"]) == "not ready"
    assert "down" in (dom.attrs["readiness"].get("class") or "")
    assert squash(dom.text["members"]).count(" down ") == 3


@needs_chromium
async def test_page_screenshot(serve, tmp_path: Path) -> None:
    server = await serve(FakeDistributor())
    target = Path(os.environ.get("OVERLAY_SCREENSHOT_DIR", tmp_path)) / "status-page.png"
    await run_chromium(f"{server.url}/", f"--screenshot={target}")
    image = target.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(image) > 20_000, "a blank page compresses to a few KB"
