"""pytest-benchmark variant of bench_tm.py: `pytest -m benchmark --benchmark-enable tests/tm`.

Reports ns per packet; asserts only that each benchmarked call did its job (never a timing).
"""

from __future__ import annotations

import itertools

import pytest

from overlay.tm.core import TrafficManager

from .bench_tm import DISTRIBUTOR, established_node, established_tm, syn_packets
from .conftest import lab_config

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("path", [
    "established dnat (client → VIP)",
    "established reverse dnat (server → client)",
    "established snat udp (server → remote)",
])
def test_established_flow(benchmark, path: str) -> None:
    tm, packets = established_tm()
    result = benchmark(tm.receive, packets[path], 1.0)
    assert result.action == "overlay"


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "full path"])
@pytest.mark.parametrize("path", ["established dnat (client → VIP)", "established snat udp (server → remote)"])
def test_established_flow_through_the_node(benchmark, path: str, fast_path: bool) -> None:
    node, datagrams = established_node(fast_path)
    result = benchmark(node.from_overlay, datagrams[path], DISTRIBUTOR, 1.0)
    assert result[0] == 1 and result[2] == DISTRIBUTOR     # SEND, to the distributor


def test_new_connection(benchmark) -> None:
    tm = TrafficManager(lab_config())
    packets = iter(syn_packets(100_000))
    counter = itertools.count()

    def open_one():
        next(counter)
        return tm.receive(next(packets), 1.0)

    result = benchmark(open_one)
    assert result.reason == "dnat"
    assert tm.snapshot()["connections"]["total"] == next(counter)


def test_benchmark_syns_are_real_distinct_openers() -> None:
    from .packets import checksum_problems
    packets = syn_packets(300)
    assert len(set(packets)) == 300
    assert all(checksum_problems(packet) == [] for packet in packets)
