"""Micro-benchmark of the distributor's per-packet steps: parse, classify, select, encapsulate — the plain
path the core uses (struct parser, prefix index, xxh64, list lookup, bytes concatenation) side by side
with a "tools" variant (dpkt parse, blake2b keyed hash, dpkt GRE). Reports ns per packet and ratios
against a baseline measured in the same run; it never asserts a timing.

    python -m tests.distributor.bench_decide [--rounds N]

The numbers quoted in docs/design-decision.md come from this script.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import dpkt

from overlay import gre
from overlay.decision import column_of, row_of
from overlay.distributor.core import Distributor
from overlay.packet import parse_flow
from tests.distributor import packets as P
from tests.distributor.configs import distributor, reference_text

# A realistic mix, every packet bound for a TM: client->VIP, server reply, outbound, reply to SNAT, IPv6,
# and an ICMP error about a reply (decided by the flow it quotes).
MIX = [
    P.tcp("198.51.100.10", 40000, "203.0.113.80", 80, flags=P.TCP_ACK, payload=b"x" * 64),
    P.tcp("203.0.113.10", 80, "198.51.100.10", 40000, flags=P.TCP_ACK, payload=b"y" * 512),
    P.udp("203.0.113.11", 5353, "198.51.100.20", 53, payload=b"q" * 32),
    P.udp("198.51.100.20", 53, "203.0.113.101", 40000, payload=b"a" * 48),
    P.tcp("2001:db8:1::10", 40000, "2001:db8:80::80", 80, flags=P.TCP_ACK, payload=b"x" * 64),
    P.icmp_error("198.51.100.1", P.tcp("203.0.113.80", 80, "198.51.100.10", 40000, df=True)),  # frag-needed about a reply
]


def _dpkt_flow(packet: bytes) -> tuple[int, bytes, bytes, int, int | None, int | None]:
    """The tools variant of the parser: dpkt objects, ICMP errors turned around through dpkt too."""
    ip = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    version = 4 if isinstance(ip, dpkt.ip.IP) else 6
    data = ip.data
    if isinstance(data, (dpkt.icmp.ICMP, dpkt.icmp6.ICMP6)) and data.type in (3, 11, 1, 2):
        inner = data.data.data
        segment = inner.data
        ports = (segment.dport, segment.sport) if isinstance(segment, (dpkt.tcp.TCP, dpkt.udp.UDP)) else (None, None)
        return version, inner.dst, inner.src, inner.p, *ports
    ports = (data.sport, data.dport) if isinstance(data, (dpkt.tcp.TCP, dpkt.udp.UDP)) else (None, None)
    return version, ip.src, ip.dst, ip.p, *ports


def steps(core: Distributor) -> dict[str, tuple[Callable[[bytes], object], Callable[[bytes], object]]]:
    """step -> (plain, tools variant), each a function of one packet."""
    flows = {packet: parse_flow(packet) for packet in MIX}
    blake_key = core.config.seed[:32]
    table_first, mask = core.table.first, core.table.rows - 1

    def classify(packet: bytes) -> object:
        flow = flows[packet]
        return core.config.decision.action(
            row_of(core.roles(flow.version, flow.src, flow.proto, flow.sport)),
            column_of(core.roles(flow.version, flow.dst, flow.proto, flow.dport)),
        )

    def select_plain(packet: bytes) -> object:
        return table_first[core.hash_endpoint(flows[packet].src, None, False)[1] & mask]

    def select_blake(packet: bytes) -> object:
        digest = hashlib.blake2b(flows[packet].src, key=blake_key, digest_size=8).digest()
        return table_first[int.from_bytes(digest, "big") & mask]

    def encapsulate_dpkt(packet: bytes) -> object:
        return bytes(dpkt.gre.GRE(p=0x0800, data=packet))

    return {
        "parse": (parse_flow, _dpkt_flow),
        "classify": (classify, classify),  # the same prefix index serves both variants
        "select": (select_plain, select_blake),
        "encapsulate": (gre.encapsulate, encapsulate_dpkt),
    }


def time_per_packet(function: Callable[[bytes], object], rounds: int, loops: int = 2000) -> float:
    """Best over `rounds` of the mean ns per call over the packet mix. The minimum, as timeit reports it:
    on a shared machine the other rounds measure the neighbours, not the code."""
    samples = []
    packets = MIX * (loops // len(MIX))
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for packet in packets:
            function(packet)
        samples.append((time.perf_counter_ns() - start) / len(packets))
    return min(samples)


def measure(rounds: int = 7) -> dict[str, tuple[float, float]]:
    core = distributor(reference_text())
    results: dict[str, tuple[float, float]] = {}
    results["baseline: call a no-op"] = (time_per_packet(lambda packet: None, rounds),) * 2
    for name, (plain, tools) in steps(core).items():
        results[name] = (time_per_packet(plain, rounds), time_per_packet(tools, rounds))
    results["whole: from_tun (decide + encapsulate)"] = (time_per_packet(core.from_tun, rounds), float("nan"))
    results["sum of the four steps"] = (
        sum(results[s][0] for s in ("parse", "classify", "select", "encapsulate")),
        sum(results[s][1] for s in ("parse", "classify", "select", "encapsulate")),
    )
    return results


def report(results: dict[str, tuple[float, float]]) -> str:
    baseline = results["baseline: call a no-op"][0]
    lines = [f"{'step':40} {'plain ns':>9} {'dpkt/blake2b ns':>16} {'tools/plain':>12} {'plain/no-op':>12}"]
    for name, (plain, tools) in results.items():
        ratio = f"{tools / plain:.1f}x" if tools == tools else "-"
        lines.append(f"{name:40} {plain:9.0f} {tools:16.0f} {ratio:>12} {plain / baseline:11.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    print(report(measure(parser.parse_args().rounds)))


if __name__ == "__main__":
    main()
