"""The numbers the demo prints, computed from agents' `/status` documents (no lab needed)."""

from __future__ import annotations

import pytest

from overlay.lab.report import invalid_drops, shares, tm_packets

TM_PACKETS = [
    {"description": "per-TM packets of a distributor status",
     "status": {"tms": {"tm1": {"packets": 5, "up": True}, "tm2": {"packets": 0}}}, "expected": {"tm1": 5, "tm2": 0}},
    {"description": "a TM entry without packets counts zero", "status": {"tms": {"tm3": {"up": False}}},
     "expected": {"tm3": 0}},
    {"description": "negative: no tms section", "status": {"role": "tm"}, "expected": {}},
    {"description": "negative: a malformed TM entry is skipped", "status": {"tms": {"tm1": 7}}, "expected": {}},
]


@pytest.mark.parametrize("case", TM_PACKETS, ids=[c["description"] for c in TM_PACKETS])
def test_tm_packets(case: dict) -> None:
    assert tm_packets(case["status"]) == case["expected"]


INVALID = [
    {"description": "invalid counters are picked, zero ones left out",
     "status": {"counters": {"invalid.no_state": 3, "invalid.tcp_flags": 0, "translated.dnat": 9}},
     "expected": {"invalid.no_state": 3}},
    {"description": "negative: other drop categories are not invalid drops",
     "status": {"counters": {"dropped.no_service": 4, "malformed.truncated_tcp": 1}}, "expected": {}},
    {"description": "negative: no counters at all", "status": {}, "expected": {}},
]


@pytest.mark.parametrize("case", INVALID, ids=[c["description"] for c in INVALID])
def test_invalid_drops(case: dict) -> None:
    assert invalid_drops(case["status"]) == case["expected"]


def test_shares_are_differences_and_include_new_tms() -> None:
    assert shares({"tm1": 10, "tm2": 4}, {"tm1": 15, "tm2": 4, "tm3": 2}) == {"tm1": 5, "tm2": 0, "tm3": 2}
