"""The one-minute traffic ring behind /api/history, with a simulated clock."""

from __future__ import annotations

import pytest

from overlay.status.history import TrafficHistory, traffic_counters


def dist_status(packets: dict[str, object], drops: dict[str, object] | None = None) -> dict:
    return {"role": "distributor", "tms": {tm: {"packets": count} for tm, count in packets.items()}, "drops": drops or {}}


COUNTER_CASES = [
    {"description": "distributor: per TM", "status": dist_status({"tm1": 5, "tm2": 7}, {"a": 1, "b": 2}), "expected": ({"tm1": 5, "tm2": 7}, 3)},
    {"description": "tm: per peer", "status": {"peers": {"dist1": {"packets": 9}}, "drops": {"no_state": 4}}, "expected": ({"dist1": 9}, 4)},
    {"description": "empty status", "status": {}, "expected": ({}, 0)},
    {"description": "non-numeric packets skipped", "status": dist_status({"tm1": "many", "tm2": None, "tm3": True, "tm4": 2}), "expected": ({"tm4": 2}, 0)},
    {"description": "member not a mapping", "status": {"tms": {"tm1": 5}}, "expected": ({}, 0)},
    {"description": "tms not a mapping", "status": {"tms": ["tm1"], "drops": "lots"}, "expected": ({}, 0)},
    {"description": "non-numeric drops skipped", "status": dist_status({}, {"a": "x", "b": 2}), "expected": ({}, 2)},
]


@pytest.mark.parametrize("case", COUNTER_CASES, ids=lambda case: case["description"])
def test_traffic_counters(case: dict) -> None:
    assert traffic_counters(case["status"]) == case["expected"]


def test_rates_between_samples_oldest_first() -> None:
    history = TrafficHistory(seconds=60)
    history.record(100.0, dist_status({"tm1": 0, "tm2": 0}, {"x": 0}))
    history.record(101.0, dist_status({"tm1": 100, "tm2": 50}, {"x": 2}))
    history.record(103.0, dist_status({"tm1": 300, "tm2": 50}, {"x": 2}))  # a late sample spans 2 s
    snapshot = history.snapshot()
    assert snapshot["series"] == ["tm1", "tm2"]
    assert snapshot["samples"] == [
        {"age": 2.0, "span": 1.0, "pps": {"tm1": 100.0, "tm2": 50.0}, "drops_pps": 2.0},
        {"age": 0.0, "span": 2.0, "pps": {"tm1": 100.0, "tm2": 0.0}, "drops_pps": 0.0},
    ]


def test_ring_keeps_only_the_last_minute() -> None:
    history = TrafficHistory(seconds=60)
    for second in range(200):
        history.record(float(second), dist_status({"tm1": second * 10}))
    samples = history.snapshot()["samples"]
    assert len(samples) == 60
    assert samples[0]["age"] == 59.0
    assert all(sample["pps"] == {"tm1": 10.0} for sample in samples)


def test_counter_reset_and_new_tm_give_no_rate_instead_of_a_wrong_one() -> None:
    history = TrafficHistory()
    history.record(0.0, dist_status({"tm1": 1000}, {"x": 50}))
    history.record(1.0, dist_status({"tm1": 10, "tm4": 5}, {"x": 1}))  # agent restarted; tm4 added
    history.record(2.0, dist_status({"tm1": 20, "tm4": 15}, {"x": 1}))
    samples = history.snapshot()["samples"]
    assert samples[0]["pps"] == {} and samples[0]["drops_pps"] is None
    assert samples[1]["pps"] == {"tm1": 10.0, "tm4": 10.0}


@pytest.mark.parametrize("second_time", [5.0, 4.0], ids=["same instant", "clock went back"])
def test_a_clock_that_does_not_advance_records_nothing(second_time: float) -> None:
    history = TrafficHistory()
    history.record(5.0, dist_status({"tm1": 0}))
    history.record(second_time, dist_status({"tm1": 100}))
    assert history.snapshot()["samples"] == []


def test_empty_history() -> None:
    assert TrafficHistory().snapshot() == {"series": [], "samples": []}
