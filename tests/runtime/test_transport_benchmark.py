"""Receive rate of the underlay endpoint vs a plain blocking socket, measured in the same run (reports only).

A sender process floods 64-byte datagrams at loopback for a fixed time; each receiver counts what it gets.
The ratio, not the absolute rate, is the result: ENVIRONMENT.md expects uvloop `add_reader` draining at
roughly the blocking socket's rate. Run with `pytest -m benchmark -s tests/runtime`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import socket
import time

import pytest
import uvloop

from overlay.runtime.udp import UnderlayEndpoint

SECONDS = 1.0
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


def with_flood(port: int, receive) -> int:
    process = multiprocessing.Process(target=flood, args=(port, SECONDS))
    process.start()
    try:
        return receive()
    finally:
        process.join(SECONDS + 5)


def blocking_baseline() -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    buffer = bytearray(2048)

    def receive() -> int:
        count = 0
        while True:
            size = sock.recv_into(buffer)  # truly blocking: one syscall per datagram
            if buffer[:size] == END:
                return count
            count += 1

    try:
        return with_flood(sock.getsockname()[1], receive) / SECONDS
    finally:
        sock.close()


def endpoint_rate() -> float:
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
        process = multiprocessing.Process(target=flood, args=(endpoint.port, SECONDS))
        process.start()
        await done
        endpoint.stop_reading()
        await loop.run_in_executor(None, process.join, SECONDS + 5)
        return received[0]

    try:
        return uvloop.run(run()) / SECONDS
    finally:
        endpoint.close()


@pytest.mark.benchmark
def test_endpoint_receive_rate_vs_blocking_socket() -> None:
    baseline = blocking_baseline()
    ours = endpoint_rate()
    print(f"\nblocking recv_into: {baseline:,.0f} pps; UnderlayEndpoint (uvloop add_reader, drain): {ours:,.0f} pps;"
          f" ratio {ours / baseline if baseline else float('nan'):.2f}")
