"""The status service every node runs: JSON status, Prometheus metrics, health, the fleet page, admin.

A thin aiohttp adapter. The agent owns the numbers (`StatusProvider`) and, on a distributor, the control
actions (`AdminController`); this module only serves them, keeps a one-minute history of per-TM packet
counters for the page (sampled here, once a second, so every provider gets it for free), and guards the
admin routes with a bearer token. Endpoints and fields: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from overlay.status.admin import TM_ACTIONS, bearer_matches
from overlay.status.history import TrafficHistory
from overlay.status.metrics import render_metrics

STATIC_DIR = Path(__file__).parent / "static"

log = structlog.get_logger("overlay.status")


class StatusProvider(Protocol):
    @property
    def role(self) -> str:  # "distributor" | "tm"
        ...

    @property
    def name(self) -> str:
        ...

    def status(self) -> dict:
        """The full JSON-able status; its shape is documented in docs/operations.md."""
        ...

    def healthy(self) -> tuple[bool, dict]:
        """Readiness for /healthz (503 when not ready) and the details that explain it."""
        ...


class AdminController(Protocol):
    """Distributor control actions. Either method may also return an awaitable of the dict."""

    def set_tm_state(self, name: str, state: str) -> dict:
        """Set a TM to "enabled", "draining" or "disabled"; KeyError for an unknown TM."""
        ...

    def reload(self) -> dict:
        """Re-read and apply the config: {"ok": bool, "error": str | None, "generation": int}."""
        ...


_dumps = functools.partial(json.dumps, default=str)  # tolerate IP addresses and the like in status dicts
_NO_STORE = {"Cache-Control": "no-store"}

PROVIDER_KEY = web.AppKey("provider", StatusProvider)
HISTORY_KEY = web.AppKey("history", TrafficHistory)
ADMIN_KEY = web.AppKey("admin", AdminController)
TOKEN_KEY = web.AppKey("admin_token", str)
SAMPLER_KEY = web.AppKey("sampler", dict)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps, headers={**_NO_STORE, **(headers or {})})


async def _resolve(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


# -- read-only endpoints ----------------------------------------------------------------------------------


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=_NO_STORE)


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[PROVIDER_KEY].status())


async def _healthz(request: web.Request) -> web.Response:
    ok, detail = request.app[PROVIDER_KEY].healthy()
    return _json({"ok": bool(ok), **detail}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = render_metrics(request.app[PROVIDER_KEY].status)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_STORE})


async def _history(request: web.Request) -> web.Response:
    sampler = request.app[SAMPLER_KEY]
    return _json({"interval": sampler["interval"], "errors": sampler["errors"], **request.app[HISTORY_KEY].snapshot()})


# -- admin ------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _authenticated(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def check(request: web.Request) -> web.Response:
        if not bearer_matches(request.headers.get("Authorization"), request.app[TOKEN_KEY]):
            log.warning("admin.unauthorized", path=request.path, remote=request.remote)
            return _json(
                {"ok": False, "error": "missing or wrong admin token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="overlay"'},
            )
        return await handler(request)

    return check


@_authenticated
async def _set_tm_state(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    state = TM_ACTIONS[action]
    try:
        result = await _resolve(request.app[ADMIN_KEY].set_tm_state(name, state))
    except KeyError:
        return _json({"ok": False, "error": f"unknown TM {name!r}"}, status=404)
    except ValueError as error:   # refused by the agent: e.g. its admin states live in a fleet store
        return _json({"ok": False, "error": str(error)}, status=409)
    log.info("admin.tm_state", tm=name, state=state, remote=request.remote)
    return _json({"ok": True, "tm": name, "state": state, **result})


@_authenticated
async def _reload(request: web.Request) -> web.Response:
    result = await _resolve(request.app[ADMIN_KEY].reload())
    log.info("admin.reload", ok=result.get("ok"), error=result.get("error"), remote=request.remote)
    # 422: the new config was refused and the running one stays.
    return _json(result, status=200 if result.get("ok") else 422)


# -- history sampling -------------------------------------------------------------------------------------


async def _sample_forever(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    provider, history, sampler = app[PROVIDER_KEY], app[HISTORY_KEY], app[SAMPLER_KEY]
    interval: float = sampler["interval"]
    next_at = loop.time()
    while True:
        try:
            history.record(loop.time(), provider.status())
        except Exception:  # a provider bug must not stop the page's history; it is counted and logged
            sampler["errors"] += 1
            log.exception("status.sample_failed")
        next_at = max(next_at + interval, loop.time())
        await asyncio.sleep(next_at - loop.time())


async def _sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_sample_forever(app), name="status-history-sampler")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


# -- assembly ---------------------------------------------------------------------------------------------


def build_app(
    provider: StatusProvider,
    *,
    admin: AdminController | None = None,
    admin_token: str | None = None,
    sample_interval: float = 1.0,
    history_seconds: int = 60,
) -> web.Application:
    """The aiohttp application; admin routes exist only with both a controller and a token."""
    app = web.Application()
    app[PROVIDER_KEY] = provider
    app[HISTORY_KEY] = TrafficHistory(round(history_seconds / sample_interval))
    app[SAMPLER_KEY] = {"interval": sample_interval, "errors": 0}
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/status", _status)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/history", _history)
    if admin is not None and admin_token:
        app[ADMIN_KEY] = admin
        app[TOKEN_KEY] = admin_token
        actions = "|".join(TM_ACTIONS)
        app.router.add_post("/admin/tm/{name}/{action:(" + actions + ")}", _set_tm_state)
        app.router.add_post("/admin/reload", _reload)
    app.cleanup_ctx.append(_sampler_ctx)
    return app


class StatusServer:
    """A running status service; `close()` stops listening and the sampler."""

    def __init__(self, runner: web.AppRunner):
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port: int = int(port)  # the bound port, useful when started with port 0
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_status_server(
    provider: StatusProvider,
    host: str,
    port: int,
    *,
    admin: AdminController | None = None,
    admin_token: str | None = None,
    sample_interval: float = 1.0,
) -> StatusServer:
    """Serve `provider` on host:port; the socket is bound when this returns (OSError if it cannot be)."""
    app = build_app(provider, admin=admin, admin_token=admin_token, sample_interval=sample_interval)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    if admin is not None and not admin_token:
        log.warning("status.admin_disabled", reason="no admin token configured", host=host, port=port)
    return StatusServer(runner)
