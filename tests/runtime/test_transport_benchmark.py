"""Receive rate of the underlay endpoint vs a plain blocking socket, measured in the same run (reports only).

A sender process floods 64-byte datagrams at loopback for a fixed time; each receiver counts what it gets.
The ratio, not the absolute rate, is the result: ENVIRONMENT.md expects uvloop `add_reader` draining at
roughly the blocking socket's rate. Run with `pytest -m benchmark --benchmark-enable -s tests/runtime`.
Without --benchmark-enable (the default, as for the pytest-benchmark tests) the flood is a short smoke
run: the code path is checked, the numbers mean nothing, the fast suite does not wait a second per side.

Every wait is bounded: a receiver that never sees END (all lost) stops at its deadline with its count.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import multiprocessing
import socket
import time
from collections.abc import Iterator

import pytest
import uvloop

from overlay.runtime.udp import UnderlayEndpoint

MEASURE_SECONDS = 1.0
SMOKE_SECONDS = 0.05
GRACE = 5.0  # after the flood: the ENDs, and a sender that is slow to exit
PAYLOAD = b"\x00\x00\x08\x00" + b"\x45" + b"\x00" * 59  # GRE + a 60-byte inner IPv4 header stub
END = b"END"


def flood(port: int, seconds: float) -> None:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    deadline = time.monotonic() + seconds
    target = ("127.0.0.1", port)
    while time.monotonic() < deadline:
        for _ in range(64):
            try:
                sender.sendto(PAYLOAD, target)
            except OSError:
                pass
    for _ in range(20):  # the receivers stop at the first END that is not lost
        time.sleep(0.01)
        sender.sendto(END, target)


@contextlib.contextmanager
def flooding(port: int, seconds: float) -> Iterator[None]:
    """A sender process flooding `port` for `seconds`; never outlives the block."""
    process = multiprocessing.Process(target=flood, args=(port, seconds))
    process.start()
    try:
        yield
    finally:
        process.join(seconds + GRACE)
        if process.is_alive():
            process.kill()
            process.join()


def blocking_baseline(seconds: float) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(seconds + GRACE)  # every END lost: stop with what arrived
    buffer = bytearray(2048)
    count = 0
    try:
        with flooding(sock.getsockname()[1], seconds):
            while True:
                size = sock.recv_into(buffer)  # blocking: one syscall per datagram
                if buffer[:size] == END:
                    break
                count += 1
    except TimeoutError:
        pass
    finally:
        sock.close()
    return count / seconds


def endpoint_rate(seconds: float) -> float:
    endpoint = UnderlayEndpoint(ipaddress.ip_address("127.0.0.1"), 0, source_ports=1)
    received = [0]

    async def run() -> int:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_datagram(payload: bytes, peer: tuple[str, int]) -> None:
            if payload == END:
                if not done.done():
                    done.set_result(None)
                return
            received[0] += 1

        endpoint.start(loop, on_datagram)
        with flooding(endpoint.port, seconds):
            with contextlib.suppress(TimeoutError):  # every END lost: stop with what arrived
                await asyncio.wait_for(done, seconds + GRACE)
            endpoint.stop_reading()
        return received[0]

    try:
        return uvloop.run(run()) / seconds
    finally:
        endpoint.close()


@pytest.mark.benchmark
def test_endpoint_receive_rate_vs_blocking_socket(request: pytest.FixtureRequest) -> None:
    config = request.config
    measuring = config.getoption("benchmark_enable") or not config.getoption("benchmark_disable")
    seconds = MEASURE_SECONDS if measuring else SMOKE_SECONDS
    baseline = blocking_baseline(seconds)
    ours = endpoint_rate(seconds)
    print(f"\nblocking recv_into: {baseline:,.0f} pps; UnderlayEndpoint (uvloop add_reader, drain): {ours:,.0f} pps;"
          f" ratio {ours / baseline if baseline else float('nan'):.2f}")
