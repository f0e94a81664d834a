"""A bounded HTTP traffic generator: many client source addresses, one new TCP connection per request.

Each request binds one of the given source addresses (round robin) and uses a fresh connection, so every
request is a new flow with a new 5-tuple — what the distributor hashes and a TM tracks. The run stops at
`count` requests or after `duration` seconds, whichever comes first, and reports successes, failures by
kind, latency and which server answered (the lab's servers answer `GET /` with their name).

Library: `await generate(plan)` with a `TrafficPlan`. In a namespace:
`ip netns exec ovl-client python -m overlay.lab.traffic --v4 100 --v6 100 --count 3000 --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp
import uvloop

from overlay.lab import topology


@dataclass(frozen=True)
class TrafficPlan:
    sources: tuple[str, ...]        # client source addresses; IPv6 ones go to url_v6, IPv4 ones to url_v4
    url_v4: str = f"http://{topology.VIP_V4}/"
    url_v6: str = f"http://[{topology.VIP_V6}]/"
    count: int = 1000               # at most this many requests ...
    duration: float = 30.0          # ... and for at most this many seconds
    concurrency: int = 32
    timeout: float = 5.0            # per request, connect included


@dataclass
class TrafficReport:
    requests: int = 0
    succeeded: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    servers: dict[str, int] = field(default_factory=dict)
    sources_used: int = 0
    elapsed: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max

    @property
    def failed(self) -> int:
        return self.requests - self.succeeded

    def to_dict(self) -> dict:
        return {**asdict(self), "failed": self.failed}

    @classmethod
    def from_dict(cls, data: dict) -> TrafficReport:
        return cls(**{key: value for key, value in data.items() if key != "failed"})

    def summary(self) -> str:
        rate = self.requests / self.elapsed if self.elapsed else 0.0
        lines = [
            f"requests {self.requests} in {self.elapsed:.1f}s ({rate:.0f}/s) from {self.sources_used} source"
            f" addresses: {self.succeeded} succeeded, {self.failed} failed",
            "answered by: " + ", ".join(f"{name} {n}" for name, n in sorted(self.servers.items())),
        ]
        if self.failures:
            lines.append("failures: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.failures.items())))
        if self.latency_ms:
            lines.append("latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in self.latency_ms.items()))
        return "\n".join(lines)


def failure_kind(error: BaseException) -> str:
    """A short stable name for why a request failed (what the report counts)."""
    if isinstance(error, asyncio.TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "server-disconnected"
    os_error = getattr(error, "os_error", None) if isinstance(error, aiohttp.ClientConnectorError) else error
    number = getattr(os_error, "errno", None)
    if isinstance(number, int) and number in errno.errorcode:
        return errno.errorcode[number].lower()
    return type(error).__name__


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99), "max": ordered[-1]}


async def generate(plan: TrafficPlan) -> TrafficReport:
    if not plan.sources:
        raise ValueError("traffic needs at least one source address")
    timeout = aiohttp.ClientTimeout(total=plan.timeout)
    sessions = {
        source: aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True, limit=0),
            timeout=timeout,
        )
        for source in plan.sources
    }
    report = TrafficReport()
    failures: Counter[str] = Counter()
    servers: Counter[str] = Counter()
    latencies: list[float] = []
    used: set[str] = set()
    next_source = itertools.cycle(plan.sources)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + plan.duration

    async def one(source: str) -> None:
        url = plan.url_v6 if ":" in source else plan.url_v4
        begun = loop.time()
        try:
            async with sessions[source].get(url) as response:
                body = await response.text()
                if response.status != 200:
                    failures[f"http-{response.status}"] += 1
                    return
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            failures[failure_kind(error)] += 1
            return
        latencies.append((loop.time() - begun) * 1000.0)
        servers[body.strip() or "?"] += 1
        report.succeeded += 1

    async def worker() -> None:
        while report.requests < plan.count and loop.time() < deadline:
            report.requests += 1
            source = next(next_source)
            used.add(source)
            await one(source)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(plan.concurrency, plan.count)))))
    finally:
        await asyncio.gather(*(session.close() for session in sessions.values()))
    report.elapsed = loop.time() - started
    report.failures = dict(failures)
    report.servers = dict(servers)
    report.sources_used = len(used)
    report.latency_ms = _percentiles(latencies)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlay.lab.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--v4", type=int, default=100, help="how many of the lab's IPv4 client addresses")
    parser.add_argument("--v6", type=int, default=100, help="how many of the lab's IPv6 client addresses")
    parser.add_argument("--source", action="append", default=[], help="explicit source address (repeatable)")
    parser.add_argument("--url-v4", default=TrafficPlan.url_v4)
    parser.add_argument("--url-v6", default=TrafficPlan.url_v6)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    sources = tuple(args.source) or (
        topology.CLIENT_SOURCES_V4[: args.v4] + topology.CLIENT_SOURCES_V6[: args.v6]
    )
    # Interleave families so a short run still exercises both.
    v4 = [s for s in sources if ":" not in s]
    v6 = [s for s in sources if ":" in s]
    interleaved = tuple(s for pair in itertools.zip_longest(v4, v6) for s in pair if s is not None)
    plan = TrafficPlan(
        sources=interleaved, url_v4=args.url_v4, url_v6=args.url_v6, count=args.count,
        duration=args.duration, concurrency=args.concurrency, timeout=args.timeout,
    )
    started = time.monotonic()
    report = uvloop.run(generate(plan))
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
        print(f"wall {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
