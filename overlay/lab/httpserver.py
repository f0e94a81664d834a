"""The lab's HTTP servers (server1, server2, the plain inside host and the remote host).

Every answer names the server, so a test knows which server (and through the peer it reports, which
source address) a request really reached. Endpoints:

- `GET /`            the server's name, as text
- `GET /whoami`      `{"server", "peer"}`: who answered and the source address it saw
- `GET /outbound?url=U` the server opens a connection of its own to U (the remote host's /whoami) and
                     returns `{"server", "remote": <U's JSON>}`: a server-initiated connection through SNAT
- `GET /slow?seconds=S&interval=I` streams one line every I seconds for S seconds (a long-lived connection)
- `POST /upload`     reads the body; `{"server", "bytes"}` (large bodies exercise PMTU discovery)

Run: `python -m overlay.lab.httpserver --name server1 [--port 80]` (listens on 0.0.0.0 and ::).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket

import aiohttp
import uvloop
from aiohttp import web

MAX_SLOW_SECONDS = 120.0
OUTBOUND_TIMEOUT = 10.0


def build_app(name: str) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"{name}\n")

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"server": name, "peer": request.remote})

    async def outbound(request: web.Request) -> web.Response:
        url = request.query.get("url")
        if not url:
            return web.json_response({"server": name, "error": "url parameter missing"}, status=400)
        timeout = aiohttp.ClientTimeout(total=OUTBOUND_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url) as response:
                    body = await response.text()
                    status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            return web.json_response({"server": name, "error": f"{type(error).__name__}: {error}"}, status=502)
        try:
            remote = json.loads(body)
        except ValueError:
            remote = body
        return web.json_response({"server": name, "status": status, "remote": remote})

    async def slow(request: web.Request) -> web.StreamResponse:
        try:
            seconds = min(float(request.query.get("seconds", "5")), MAX_SLOW_SECONDS)
            interval = max(float(request.query.get("interval", "0.5")), 0.01)
        except ValueError:
            return web.json_response({"server": name, "error": "seconds/interval must be numbers"}, status=400)
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        sent = 0
        while loop.time() < end:
            sent += 1
            await response.write(f"{name} {sent}\n".encode())
            await asyncio.sleep(interval)
        await response.write(f"{name} done {sent}\n".encode())
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"server": name, "bytes": size})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/whoami", whoami),
            web.get("/outbound", outbound),
            web.get("/slow", slow),
            web.post("/upload", upload),
        ]
    )
    return app


async def serve(name: str, port: int) -> None:
    runner = web.AppRunner(build_app(name), access_log=None)
    await runner.setup()
    # Two sockets, one per family: binding "::" alone would depend on the namespace's bindv6only.
    for host in ("0.0.0.0", "::"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"{name} listening on port {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlay.lab.httpserver", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.name, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
