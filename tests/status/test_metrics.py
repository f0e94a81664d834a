"""The status-dict → Prometheus mapping on awkward input: nothing raises, nothing is emitted twice."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlay.status.metrics import metric_name, render_metrics


def families(status: dict) -> dict[str, list]:
    text = render_metrics(lambda: status).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(status: dict, sample_name: str, **labels: str) -> float | None:
    for samples in families(status).values():
        for sample in samples:
            if sample.name == sample_name and sample.labels == labels:
                return sample.value
    return None


@pytest.mark.parametrize(
    "parts, expected",
    [(("rx_packets",), "overlay_rx_packets"), (("tun.rx-errors",), "overlay_tun_rx_errors"), (("a b/c",), "overlay_a_b_c")],
)
def test_metric_name_sanitises(parts: tuple[str, ...], expected: str) -> None:
    assert metric_name(*parts) == expected


BAD_VALUE_CASES = [
    {"description": "string counter", "status": {"counters": {"rx.packets": "12"}}, "skipped": 1},
    {"description": "dict where a number belongs", "status": {"drops": {"truncated": {"n": 1}}}, "skipped": 1},
    {"description": "flat counter clashing with a labelled family", "status": {"drops": {"a": 1}, "counters": {"drops": 5}}, "skipped": 1},
    {"description": "gauge clashing with a counter", "status": {"counters": {"x": 1}, "gauges": {"x": 2}}, "skipped": 1},
    {"description": "unknown RTT is not a bug", "status": {"health": {"tms": {"tm1": {"rtt_seconds": None}}}}, "skipped": 0},
    {"description": "sections of the wrong type are ignored", "status": {"tms": ["tm1"], "config": "v1", "conntrack": 5}, "skipped": 0},
]


@pytest.mark.parametrize("case", BAD_VALUE_CASES, ids=lambda case: case["description"])
def test_bad_values_are_counted_not_raised(case: dict) -> None:
    assert value(case["status"], "overlay_status_skipped_values") == case["skipped"]


@pytest.mark.parametrize(
    "status, exposed",
    [
        ({"cells": {"a>b": 1}, "counters": {"cell.a>b": 1}}, False),
        ({"tms": {}, "counters": {"tm.tm1": 1}}, False),
        ({"counters": {"tm.tm1": 1}}, True),  # no labelled section to carry it: keep it rather than lose it
    ],
    ids=["cell duplicate", "tm duplicate", "no section"],
)
def test_per_entity_flat_counters_are_left_to_their_section(status: dict, exposed: bool) -> None:
    assert any(name.startswith(("overlay_cell_a", "overlay_tm_tm1")) for name in families(status)) is exposed


def test_counter_names_ending_in_total_are_not_doubled() -> None:
    assert value({"counters": {"reloads_total": 3}}, "overlay_reloads_total") == 3.0


def test_empty_status_still_exposes_info_and_self_check() -> None:
    names = set(families({}))
    assert names == {"overlay_info", "overlay_status_skipped_values"}
    assert value({}, "overlay_info", name="", role="", version="") == 1.0


def test_tm_state_is_one_hot_over_all_states() -> None:
    status = {"tms": {"tm1": {"admin": "disabled"}}}
    states = {state: value(status, "overlay_tm_admin_state", tm="tm1", state=state) for state in ("enabled", "draining", "disabled")}
    assert states == {"enabled": 0.0, "draining": 0.0, "disabled": 1.0}
