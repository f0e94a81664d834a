"""The decision micro-benchmark under pytest-benchmark (`pytest -m benchmark --benchmark-enable`). It
reports; it never asserts a timing. The side-by-side table is `python -m tests.distributor.bench_decide`."""

from __future__ import annotations

import pytest

from tests.distributor import bench_decide
from tests.distributor.configs import distributor, reference_text


@pytest.mark.benchmark
@pytest.mark.parametrize("step", ["parse", "classify", "select", "encapsulate"])
@pytest.mark.parametrize("variant", ["plain", "dpkt+blake2b"])
def test_step(benchmark, step: str, variant: str) -> None:
    function = bench_decide.steps(distributor(reference_text()))[step][variant != "plain"]
    benchmark(lambda: [function(packet) for packet in bench_decide.MIX])


@pytest.mark.benchmark
def test_from_tun(benchmark) -> None:
    core = distributor(reference_text())
    verdicts = benchmark(lambda: [core.from_tun(packet) for packet in bench_decide.MIX])
    assert [v.action for v in verdicts] == ["tm", "tm", "tm", "tm", "tm", "tm"]


@pytest.mark.benchmark
def test_report_names_every_step() -> None:
    """The script runs end to end (one short round) and reports every step with both variants."""
    text = bench_decide.report(bench_decide.measure(rounds=1))
    for step in ("parse", "classify", "select", "encapsulate", "from_tun"):
        assert step in text
