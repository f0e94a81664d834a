"""The authentication micro-benchmark under pytest-benchmark (`pytest -m benchmark --benchmark-enable
tests/test_bench_auth.py`). It reports; it never asserts a timing — only that each benchmarked call did its
job. The side-by-side table is `python3 tests/bench_auth.py`.

With the suite's default `--benchmark-disable` every test runs its call once: a quick check that the bench
code still works against the cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from overlay import auth, gre
from overlay.tm.node import SEND
from tests import bench_auth
from tests.test_fleet_in_memory import VIP

pytestmark = pytest.mark.benchmark
PACKET = bench_auth.inner_packet(1400, bench_auth.CLIENT, bench_auth.CLIENT_PORT, VIP, 80)


@pytest.fixture(scope="module")
def setup() -> Iterator[bench_auth.Setup]:
    built = bench_auth.build()
    yield built
    built.close()


@pytest.mark.parametrize("mode", bench_auth.SEALED)
def test_seal(benchmark, setup: bench_auth.Setup, mode: str) -> None:
    sender, receiver = setup.pairs[mode]
    payload = gre.encapsulate(PACKET, key=setup.gre_key)
    sealed = benchmark(sender.seal, payload, setup.tm)
    assert len(sealed) == len(payload) + auth.OVERHEAD
    assert receiver.open(sealed) == ("dist1", payload)


@pytest.mark.parametrize("mode", bench_auth.SEALED)
def test_open(benchmark, setup: bench_auth.Setup, mode: str) -> None:
    """Each round opens a datagram sealed just before it (untimed): a counter seen before is refused."""
    sender, receiver = setup.pairs[mode]
    payload = gre.encapsulate(PACKET, key=setup.gre_key)
    opened = benchmark.pedantic(receiver.open, setup=lambda: ((sender.seal(payload, setup.tm),), {}), rounds=2000)
    assert opened == ("dist1", payload)


@pytest.mark.parametrize("mode", bench_auth.MODES)
def test_distributor_from_tun(benchmark, setup: bench_auth.Setup, mode: str) -> None:
    verdict = benchmark(setup.fleets[mode].distributor.from_tun, PACKET)
    assert (verdict.action, verdict.tm) == ("tm", setup.tm)


@pytest.mark.parametrize("mode", bench_auth.MODES)
def test_tm_from_overlay(benchmark, setup: bench_auth.Setup, mode: str) -> None:
    fleet = setup.fleets[mode]
    node = fleet.nodes[setup.tm]

    def datagram() -> tuple[tuple[bytes, tuple[str, int], float], dict[str, object]]:
        return (fleet.distributor.from_tun(PACKET).packet, fleet.dist_underlay, fleet.now), {}

    action, _, peer = benchmark.pedantic(node.from_overlay, setup=datagram, rounds=2000)
    assert (action, peer) == (SEND, fleet.dist_underlay) and not node.drops


def test_the_script_reports_every_case() -> None:
    """The script end to end with one round of a few packets: every case returns a number, and the report
    names every size and both paths (the table's layout is the script's business)."""
    results = bench_auth.measure(rounds=1, calls=5)
    assert all(len(samples) == 1 and samples[0] > 0 for samples in results.samples.values())
    text = bench_auth.report(results)
    for needle in ("Distributor.from_tun", "TMNode.from_overlay", *map(str, bench_auth.SIZES)):
        assert needle in text
    assert {sealed - plain for plain, sealed in bench_auth.sealed_lengths().values()} == {auth.OVERHEAD}
