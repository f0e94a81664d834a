"""The distributor's packet path for TUN batches, Python fast path against the compiled one, in one run:

    .venv/bin/python -m tests.distributor.bench_compiled

Busy batches (client → VIP and server → client, TCP and UDP, v4 and v6, 64 packets) through
`packet_path.from_tun` packet by packet and through `from_tun_batch` (`_fastio.distribute`), with the
endpoint and TUN replaced by recorders that only count; prints ns per packet (median of 7 rounds) and the
ratio. It reports, it never asserts (tests/distributor/test_compiled_path.py holds the two to each other)."""

from __future__ import annotations

import statistics
import time

import random

from overlay import compiled
from tests.distributor import packets as P
from tests.distributor.test_compiled_path import fleet, handlers


def fast_batches() -> list[list[bytes]]:
    """What the fast path serves: client → VIP and server → client, many flows, 64 to a batch."""
    rng = random.Random(1)
    pairs = [("198.51.100.10", "203.0.113.80"), ("203.0.113.10", "198.51.100.10"),
             ("2001:db8:1::10", "2001:db8:80::80"), ("2001:db8:2::10", "2001:db8:1::10")]
    batches = []
    for _ in range(48):
        batch = []
        for _ in range(64):
            src, dst = rng.choice(pairs)
            size = rng.choice((0, 64, 512, 1200))
            if rng.random() < 0.5:
                batch.append(P.tcp(src, rng.randrange(1024, 65536), dst, 80, P.TCP_ACK, bytes(size)))
            else:
                batch.append(P.udp(src, rng.randrange(1024, 65536), dst, 53, bytes(size)))
        batches.append(batch)
    return batches


def main() -> None:
    if compiled.distribute is None:
        print("overlay._fastio was not built: nothing to compare")
        return
    batches = fast_batches()
    packets = sum(len(batch) for batch in batches)
    core = fleet("reference")[0]
    _, from_tun, from_tun_batch = handlers(core)
    for batch in batches:          # warm the roles cache
        from_tun_batch(batch)  # type: ignore[operator]
    results: dict[str, list[float]] = {"python": [], "compiled": []}
    for _ in range(7):
        for name in ("python", "compiled"):
            core = fleet("reference")[0]
            _, from_tun, from_tun_batch = handlers(core)
            for batch in batches[:4]:
                from_tun_batch(batch)  # type: ignore[operator]
            start = time.perf_counter_ns()
            if name == "python":
                for batch in batches:
                    for packet in batch:
                        from_tun(packet)  # type: ignore[operator]
            else:
                for batch in batches:
                    from_tun_batch(batch)  # type: ignore[operator]
            results[name].append((time.perf_counter_ns() - start) / packets)
    python, native = statistics.median(results["python"]), statistics.median(results["compiled"])
    recorder, _, from_tun_batch = handlers(fleet("reference")[0])
    for batch in batches:
        from_tun_batch(batch)  # type: ignore[operator]
    print(f"{packets} packets a round, 7 rounds; {recorder.served / packets:.0%} of them served in C")
    print(f"python fast path (from_tun per packet): {python:7.0f} ns/packet")
    print(f"compiled (from_tun_batch):              {native:7.0f} ns/packet")
    print(f"ratio: {python / native:.1f}x")


if __name__ == "__main__":
    main()
