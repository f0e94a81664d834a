"""Micro-benchmark of the TM core: ns per packet for the established-flow and new-connection paths.

Run: `python3 tests/tm/bench_tm.py` (or the pytest-benchmark variant in test_benchmark.py with
`pytest -m benchmark --benchmark-enable tests/tm`). It reports; it never asserts timings. Ratios are
against baselines measured in the same run: copying the packet into a bytearray and back (the floor of
any rewrite), and a dpkt parse of the same packet (what the hot path avoids).

The "node" rows are what the agent calls per datagram, `TMNode.from_overlay` of the GRE-in-UDP payload
the distributor sends (decapsulate, the core, encapsulate), on the established-flow fast path and forced
onto the full path (`fast_path=False`), the same datagrams in the same run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import dpkt

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tm.conftest import lab_config            # type: ignore[no-redef]
    from tm.packets import ACK, SYN, tcp, udp     # type: ignore[no-redef]
else:
    from .conftest import lab_config
    from .packets import ACK, SYN, tcp, udp

from overlay import gre
from overlay.checksum import update_field
from overlay.tm.core import TrafficManager
from overlay.tm.node import SEND, TMNode

CLIENT, VIP, SERVER1 = "198.51.100.10", "203.0.113.80", "203.0.113.10"
REMOTE = "198.51.100.20"


def established_tm() -> tuple[TrafficManager, dict[str, bytes]]:
    """A TM with one established DNAT connection and one SNAT UDP flow, and packets of each."""
    tm = TrafficManager(lab_config())
    tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 0.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), 0.0)
    tm.receive(tcp(CLIENT, 40000, VIP, 80, ACK), 0.0)
    tm.receive(udp(SERVER1, 6000, REMOTE, 53), 0.0)
    payload = b"x" * 64
    return tm, {
        "established dnat (client → VIP)": tcp(CLIENT, 40000, VIP, 80, ACK, payload),
        "established reverse dnat (server → client)": tcp(SERVER1, 80, CLIENT, 40000, ACK, payload),
        "established snat udp (server → remote)": udp(SERVER1, 6000, REMOTE, 53, payload),
    }


DISTRIBUTOR = ("192.0.2.2", 4754)


def established_node(fast_path: bool) -> tuple[TMNode, dict[str, bytes]]:
    """`established_tm`'s connections in a TM node, and the GRE-in-UDP datagrams of their packets."""
    node = TMNode(TrafficManager(lab_config()), {"dist1": DISTRIBUTOR}, None, fast_path=fast_path)
    for packet in (tcp(CLIENT, 40000, VIP, 80, SYN), tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK),
                   tcp(CLIENT, 40000, VIP, 80, ACK), udp(SERVER1, 6000, REMOTE, 53)):
        node.from_overlay(gre.encapsulate(packet), DISTRIBUTOR, 0.0)
    _, packets = established_tm()
    datagrams = {name: gre.encapsulate(packet) for name, packet in packets.items()}
    for datagram in datagrams.values():
        assert node.from_overlay(datagram, DISTRIBUTOR, 1.0)[0] == SEND   # each is really forwarded
    return node, datagrams


def syn_packets(count: int) -> list[bytes]:
    """SYNs of distinct connections (client address and port vary), each opening a new connection.

    One SYN is built with dpkt; the others patch its client address and port and fix the checksums
    with an incremental update (building 100,000 packets with dpkt would take longer than the run).
    """
    template = tcp(CLIENT, 1024, VIP, 80, SYN)
    ip_checksum = int.from_bytes(template[10:12], "big")
    tcp_checksum = int.from_bytes(template[36:38], "big")
    old = template[12:16] + template[20:22]
    packets = []
    for i in range(count):
        new = bytes((198, 51, 100, 100 + i % 100)) + (1024 + i // 100).to_bytes(2, "big")
        ip_sum = update_field(ip_checksum, old[:4], new[:4]).to_bytes(2, "big")
        tcp_sum = update_field(tcp_checksum, old, new).to_bytes(2, "big")
        packets.append(template[:10] + ip_sum + new[:4] + template[16:20] + new[4:] + template[22:36] + tcp_sum
                       + template[38:])
    return packets


def ns_per_call(function: Callable[[], object], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        function()
    return (time.perf_counter_ns() - start) / calls


def ns_per_new_connection(packets: list[bytes]) -> float:
    tm = TrafficManager(lab_config())
    receive = tm.receive
    start = time.perf_counter_ns()
    for packet in packets:
        receive(packet, 1.0)
    elapsed = (time.perf_counter_ns() - start) / len(packets)
    assert tm.snapshot()["connections"]["total"] == len(packets)   # every SYN really opened a connection
    return elapsed


def measure(rounds: int = 15, calls: int = 10_000, connections: int = 5_000) -> dict[str, float]:
    """Best ns per packet of each path. Rounds interleave all paths and baselines, so a noisy neighbour
    slows them alike and the ratios stay meaningful even when the absolutes do not."""
    tm, packets = established_tm()
    sample = packets["established dnat (client → VIP)"]
    syns = syn_packets(connections)
    paths: dict[str, Callable[[], float]] = {
        name: (lambda p=packet: ns_per_call(lambda: tm.receive(p, 1.0), calls)) for name, packet in packets.items()
    }
    paths["new connection (SYN → DNAT, table grows)"] = lambda: ns_per_new_connection(syns)
    for fast_path, label in ((False, "full path"), (True, "fast path")):
        node, datagrams = established_node(fast_path)
        for name in ("established dnat (client → VIP)", "established snat udp (server → remote)"):
            datagram, from_overlay = datagrams[name], node.from_overlay
            paths[f"node, {label}: {name.split(' (')[0]}"] = \
                lambda d=datagram, f=from_overlay: ns_per_call(lambda: f(d, DISTRIBUTOR, 1.0), calls)
    paths[COPY] = lambda: ns_per_call(lambda: bytes(bytearray(sample)), calls)
    paths[DPKT] = lambda: ns_per_call(lambda: dpkt.ip.IP(sample), calls // 5)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, run in paths.items():
            best[name] = min(best[name], run())
    return best


COPY = "baseline: copy into bytearray and back"
DPKT = "baseline: dpkt.ip.IP(packet)"


def main() -> None:
    best = measure()
    print(f"{'path':48} {'ns/packet':>10} {'× copy':>8} {'× dpkt parse':>13}")
    for name, ns in best.items():
        print(f"{name:48} {ns:10.0f} {ns / best[COPY]:8.1f} {ns / best[DPKT]:13.2f}")
    for name in ("established dnat", "established snat udp"):
        full, fast = best[f"node, full path: {name}"], best[f"node, fast path: {name}"]
        print(f"node {name}: fast path {full / fast:.2f}× the full path ({full:.0f} → {fast:.0f} ns)")


if __name__ == "__main__":
    main()
