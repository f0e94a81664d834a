"""UDP request/response round trips for benchmarks/run.py: an echo server and a bounded client.

    python -m benchmarks.pingpong server ADDR:PORT [ADDR:PORT ...] [--seconds S]
    python -m benchmarks.pingpong client HOST:PORT --count N [--warmup W] [--timeout T] [--seconds S]

The server echoes every datagram from the socket it arrived on (one socket per address, so a reply leaves
from the address the request was sent to, which a NAT in between needs). The client sends one 16-byte
request at a time (a sequence number and its send time), waits for its echo (replies to earlier, timed-out
requests are skipped), and prints one JSON line: round trips, lost, p50/p90/p99/max in µs. Both are plain
Python, the same on every path measured, so the difference between two paths is the paths'.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys
import time

REQUEST = struct.Struct("!QQ")


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def serve(endpoints: list[str], seconds: float) -> None:
    selector = selectors.DefaultSelector()
    for text in endpoints:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(endpoint(text))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)  # what was registered
            while True:
                try:
                    data, peer = ready.recvfrom(2048)
                except BlockingIOError:
                    break
                ready.sendto(data, peer)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index] / 1000


def client(target: str, count: int, warmup: int, timeout: float, seconds: float) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(endpoint(target))
    rtts: list[int] = []
    lost = 0
    deadline = time.monotonic() + seconds
    clock = time.perf_counter_ns
    for sequence in range(warmup + count):
        if time.monotonic() > deadline:
            break
        sent_at = clock()
        sock.settimeout(timeout)
        sock.send(REQUEST.pack(sequence, sent_at))
        try:
            while True:
                data = sock.recv(64)
                if len(data) == REQUEST.size and REQUEST.unpack(data)[0] == sequence:
                    break
            rtt = clock() - sent_at
        except (TimeoutError, ConnectionRefusedError):
            if sequence >= warmup:
                lost += 1
            continue
        if sequence >= warmup:
            rtts.append(rtt)
    rtts.sort()
    return {"round_trips": len(rtts), "lost": lost, "p50_us": percentile(rtts, 0.50),
            "p90_us": percentile(rtts, 0.90), "p99_us": percentile(rtts, 0.99),
            "max_us": rtts[-1] / 1000 if rtts else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pingpong", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    server_parser = commands.add_parser("server")
    server_parser.add_argument("endpoints", nargs="+")
    server_parser.add_argument("--seconds", type=float, default=600)
    client_parser = commands.add_parser("client")
    client_parser.add_argument("target")
    client_parser.add_argument("--count", type=int, default=10000)
    client_parser.add_argument("--warmup", type=int, default=100)
    client_parser.add_argument("--timeout", type=float, default=0.2)
    client_parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args(argv)
    if args.command == "server":
        serve(args.endpoints, args.seconds)
    else:
        print(json.dumps(client(args.target, args.count, args.warmup, args.timeout, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
