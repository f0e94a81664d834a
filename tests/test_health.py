"""The health checker against a simulated clock: a fake fleet echoes keepalives (or does not)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.gre import KEEPALIVE_PROTOCOL
from overlay.health import (
    KEEPALIVE_SIZE,
    HealthChecker,
    HealthConfig,
    decode_keepalive,
    encode_keepalive,
    name_hash,
)

TMS = ("tm1", "tm2", "tm3")


class Fleet:
    """Drives a checker the way the asyncio adapter does: wake at next_deadline, send, echo, tick.

    `alive(tm, now)` says whether the TM echoes at that moment; echoes come back after `rtt`.
    Every state change is recorded with the simulated time it was reported at.
    """

    def __init__(self, checker: HealthChecker, alive: Callable[[str, float], bool], rtt: float = 0.01):
        self.checker = checker
        self.alive = alive
        self.rtt = rtt
        self.in_flight: list[tuple[float, bytes]] = []
        self.changes: list[tuple[float, str, bool]] = []

    def run(self, start: float, until: float) -> None:
        now = start
        for _ in range(100_000):  # bounded: a scheduling bug must fail the test, not hang it
            if now > until:
                return
            for tm, payload in self.checker.due_probes(now):
                if self.alive(tm, now):
                    self.in_flight.append((now + self.rtt, payload))
            for arrival, payload in [item for item in self.in_flight if item[0] <= now]:
                self.in_flight.remove((arrival, payload))
                self.checker.on_reply(payload, now)
            self.changes += [(now, tm, up) for tm, up in self.checker.tick(now)]
            wake = min([self.checker.next_deadline()] + [arrival for arrival, _ in self.in_flight])
            # Exactly at the next deadline, as the adapter wakes: the detection bound assumes it (a clock that
            # stepped at least 1 µs ticked late, past the bound). A deadline that stays put would spin.
            assert wake > now, f"next_deadline() {wake} is not after now {now}"
            now = wake
        raise AssertionError("simulation did not reach its end time")


def test_keepalive_wire_format_worked_example() -> None:
    # The byte example of docs/operations.md, field by field.
    assert name_hash("dist1") == 0xF69D042706E28A88
    payload = encode_keepalive(sequence=1, sent_ns=1_500_000_000, sender_hash=name_hash("dist1"))
    assert payload.hex() == (
        "4f564b41" "01" "000000" "0000000000000001" "0000000059682f00" "f69d042706e28a88"
    )
    assert len(payload) == KEEPALIVE_SIZE == 32


def test_keepalive_rides_gre_with_the_experimental_protocol_type() -> None:
    # What the agent puts on the wire: GRE (no flags) with protocol 0x88B5, then the payload.
    payload = encode_keepalive(7, 42, name_hash("dist1"))
    frame = dpkt.gre.GRE(p=KEEPALIVE_PROTOCOL, data=payload)
    parsed = dpkt.gre.GRE(bytes(frame))
    assert parsed.p == 0x88B5
    decoded = decode_keepalive(bytes(parsed.data))
    assert not isinstance(decoded, str)
    assert (decoded.sequence, decoded.sent_ns, decoded.sender_hash) == (7, 42, name_hash("dist1"))


DECODE_CASES = [
    {"description": "empty payload", "packet": b"", "expected": "bad_length"},
    {"description": "truncated by one byte", "packet": encode_keepalive(1, 2, 3)[:-1], "expected": "bad_length"},
    {"description": "trailing byte", "packet": encode_keepalive(1, 2, 3) + b"\0", "expected": "bad_length"},
    {"description": "wrong magic", "packet": b"XVKA" + encode_keepalive(1, 2, 3)[4:], "expected": "bad_magic"},
    {"description": "future version", "packet": b"OVKA\x02" + encode_keepalive(1, 2, 3)[5:], "expected": "bad_version"},
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda case: case["description"])
def test_decode_refuses_malformed_payloads(case: dict) -> None:
    assert decode_keepalive(case["packet"]) == case["expected"]


def test_tms_known_at_start_are_up_and_probed_at_once() -> None:
    checker = HealthChecker(HealthConfig(), TMS, now=0.0, sender="dist1")
    assert checker.up() == set(TMS)
    probes = checker.due_probes(0.0)
    assert sorted(tm for tm, _ in probes) == list(TMS)
    assert checker.due_probes(0.0) == []  # nothing twice
    assert checker.next_deadline() == pytest.approx(HealthConfig().timeout)


def test_healthy_fleet_stays_up_without_changes() -> None:
    checker = HealthChecker(HealthConfig(), TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: True)
    fleet.run(0.0, 30.0)
    assert fleet.changes == []
    snapshot = checker.snapshot()
    assert snapshot["tms"]["tm1"]["timeouts"] == 0
    assert snapshot["tms"]["tm1"]["replies"] >= 30
    assert snapshot["tms"]["tm1"]["rtt_seconds"] == pytest.approx(0.01)
    assert snapshot["rejected"] == {}


@pytest.mark.parametrize(
    "config",
    [HealthConfig(), HealthConfig(interval=0.5, timeout=0.3, fall=2), HealthConfig(interval=1.0, timeout=2.5, fall=3)],
    ids=["defaults", "fast", "timeout-longer-than-interval"],
)
@pytest.mark.parametrize("death", [10.0, 10.005, 10.02, 10.5, 10.99])
def test_dead_tm_is_detected_within_interval_times_fall_plus_timeout(config: HealthConfig, death: float) -> None:
    checker = HealthChecker(config, TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: tm != "tm2" or now < death)
    fleet.run(0.0, death + 3 * config.detection_time)
    assert [(tm, up) for _, tm, up in fleet.changes] == [("tm2", False)]
    detected_at = fleet.changes[0][0]
    assert death < detected_at <= death + config.detection_time + 1e-9
    assert checker.up() == {"tm1", "tm3"}
    assert not checker.is_up("tm2")


def test_one_lost_keepalive_is_not_a_failure_below_fall() -> None:
    checker = HealthChecker(HealthConfig(fall=3), TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: not (tm == "tm1" and 5.0 <= now < 7.0))  # two probes lost
    fleet.run(0.0, 20.0)
    assert fleet.changes == []
    assert checker.snapshot()["tms"]["tm1"]["timeouts"] == 2


def test_tm_returns_after_rise_successes() -> None:
    config = HealthConfig(rise=2, fall=3)
    checker = HealthChecker(config, TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: tm != "tm3" or not 5.0 <= now < 15.0)
    fleet.run(0.0, 30.0)
    assert [(tm, up) for _, tm, up in fleet.changes] == [("tm3", False), ("tm3", True)]
    back_at = fleet.changes[1][0]
    # Probes go out every interval; the rise-th echo after recovery brings it back.
    assert 15.0 < back_at <= 15.0 + config.rise * config.interval + fleet.rtt + 1e-9
    assert checker.snapshot()["tms"]["tm3"]["transitions"] == 2


def test_flapping_tm_that_never_manages_rise_in_a_row_stays_down() -> None:
    checker = HealthChecker(HealthConfig(rise=3, fall=1), ["tm1"], now=0.0)
    # Answers every other second: never three successes in a row.
    fleet = Fleet(checker, alive=lambda tm, now: int(now) % 2 == 1)
    fleet.run(0.0, 20.0)
    assert fleet.changes == [(1.0, "tm1", False)]
    assert checker.snapshot()["tms"]["tm1"]["replies"] >= 9


REPLY_CASES = [
    {"description": "garbage", "packet": lambda ka: b"\xff" * 32, "expected": "bad_magic"},
    {"description": "truncated", "packet": lambda ka: ka[:16], "expected": "bad_length"},
    {"description": "another distributor's", "packet": lambda ka: ka[:24] + struct.pack("!Q", name_hash("dist2")), "expected": "foreign_sender"},
    {"description": "never sent", "packet": lambda ka: ka[:8] + struct.pack("!Q", 999) + ka[16:], "expected": "unknown_sequence"},
    {"description": "send time altered", "packet": lambda ka: ka[:16] + struct.pack("!Q", 12345) + ka[24:], "expected": "timestamp_mismatch"},
]


@pytest.mark.parametrize("case", REPLY_CASES, ids=lambda case: case["description"])
def test_bad_replies_are_counted_and_never_count_as_success(case: dict) -> None:
    checker = HealthChecker(HealthConfig(fall=1), ["tm1"], now=0.0, sender="dist1")
    [(tm, keepalive)] = checker.due_probes(0.0)
    checker.on_reply(case["packet"](keepalive), 0.1)
    assert checker.snapshot()["rejected"] == {case["expected"]: 1}
    # The genuine probe is still unanswered, so it times out and the TM falls.
    assert checker.tick(1.0) == [("tm1", False)]


def test_duplicate_and_late_echoes_are_refused() -> None:
    checker = HealthChecker(HealthConfig(timeout=1.0, fall=1), ["tm1"], now=0.0)
    [(_, first)] = checker.due_probes(0.0)
    checker.on_reply(first, 0.2)
    checker.on_reply(first, 0.3)  # duplicated by the network
    assert checker.snapshot()["rejected"] == {"unknown_sequence": 1}
    [(_, second)] = checker.due_probes(1.0)
    checker.on_reply(second, 2.5)  # after its deadline, before tick noticed
    assert checker.tick(2.5) == [("tm1", False)]
    checker.on_reply(second, 2.6)  # after tick counted it lost
    assert checker.snapshot()["rejected"] == {"unknown_sequence": 1, "late": 2}
    assert not checker.is_up("tm1")


def test_replies_after_a_stall_do_not_burst_probes() -> None:
    checker = HealthChecker(HealthConfig(interval=1.0), ["tm1"], now=0.0)
    checker.due_probes(0.0)
    assert len(checker.due_probes(10.0)) == 1  # loop blocked for ten intervals: one probe, not ten
    checker.tick(10.0)
    assert checker.next_deadline() == pytest.approx(11.0)  # next slot and the new probe's timeout
    assert checker.due_probes(10.5) == []
    assert len(checker.due_probes(11.0)) == 1


def test_reload_keeps_survivors_forgets_leavers_and_proves_newcomers() -> None:
    config = HealthConfig(rise=2, fall=3)
    checker = HealthChecker(config, ["tm1", "tm2"], now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: tm != "tm2")
    fleet.run(0.0, 10.0)
    assert checker.up() == {"tm1"}
    before = checker.snapshot()["tms"]["tm1"]["replies"]
    checker.set_tms(["tm1", "tm4"], now=10.0)
    assert set(checker.snapshot()["tms"]) == {"tm1", "tm4"}
    assert checker.snapshot()["tms"]["tm1"]["replies"] == before  # survivor kept its history
    assert not checker.is_up("tm4")  # newcomer starts down
    assert not checker.is_up("tm2")  # leaver unknown
    fleet.run(10.0, 10.0 + config.rise * config.interval + 0.5)
    assert checker.up() == {"tm1", "tm4"}
    assert ("tm4", True) in [(tm, up) for _, tm, up in fleet.changes]


def test_reload_drops_probes_in_flight_to_removed_tms() -> None:
    checker = HealthChecker(HealthConfig(), ["tm1", "tm2"], now=0.0)
    probes = dict(checker.due_probes(0.0))
    checker.set_tms(["tm1"], now=0.1)
    checker.on_reply(probes["tm2"], 0.2)
    assert checker.snapshot()["rejected"] == {"unknown_sequence": 1}
    assert checker.tick(5.0) == []  # tm1 lost one probe (below fall); tm2's probe is forgotten, not expired
    assert "tm2" not in checker.snapshot()["tms"]


@pytest.mark.parametrize(
    "policy, expected",
    [("drop", set()), ("route", set()), ("keep-last", {"tm3"})],
)
def test_all_down_policy_decides_what_the_table_serves(policy: str, expected: set[str]) -> None:
    config = HealthConfig(fall=1, all_down=policy)
    checker = HealthChecker(config, TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: {"tm1": now < 3, "tm2": now < 6, "tm3": now < 9}[tm])
    fleet.run(0.0, 15.0)
    assert checker.all_down()
    assert checker.up() == set()
    assert checker.serving() == expected
    assert checker.snapshot()["all_down"] is True


def test_keep_last_serves_the_set_that_fell_together() -> None:
    checker = HealthChecker(HealthConfig(fall=1, all_down="keep-last"), TMS, now=0.0)
    fleet = Fleet(checker, alive=lambda tm, now: now < 5)  # a cut underlay: all fall at once
    fleet.run(0.0, 10.0)
    assert checker.serving() == set(TMS)


def test_http_confirmation_takes_a_tm_down_even_when_keepalives_pass() -> None:
    config = HealthConfig(http=True, fall=2, rise=2)
    checker = HealthChecker(config, ["tm1"], now=0.0)
    assert checker.due_http(0.0) == ["tm1"]
    assert checker.due_http(0.5) == []
    checker.on_http("tm1", False, 0.1)
    assert checker.tick(0.1) == []
    assert checker.due_http(1.0) == ["tm1"]
    checker.on_http("tm1", False, 1.1)
    assert checker.tick(1.1) == [("tm1", False)]
    assert checker.snapshot()["tms"]["tm1"]["keepalive_up"] is True
    assert checker.snapshot()["tms"]["tm1"]["http_up"] is False
    checker.on_http("tm1", True, 2.1)
    checker.on_http("tm1", True, 3.1)
    assert checker.tick(3.1) == [("tm1", True)]


def test_http_results_are_ignored_when_http_checks_are_off_or_tm_unknown() -> None:
    checker = HealthChecker(HealthConfig(http=False, fall=1), ["tm1"], now=0.0)
    assert checker.due_http(0.0) == []
    checker.on_http("tm1", False, 0.1)
    checker.on_http("ghost", False, 0.1)
    assert checker.tick(0.1) == []
    assert checker.is_up("tm1")
    assert checker.snapshot()["tms"]["tm1"]["http_up"] is None


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": 0}, {"timeout": -1}, {"rise": 0}, {"fall": 0}, {"all_down": "panic"}],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_invalid_config_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**kwargs)


def test_empty_fleet_has_no_deadline_and_is_not_all_down() -> None:
    checker = HealthChecker(HealthConfig(), [], now=0.0)
    assert checker.next_deadline() == float("inf")
    assert checker.due_probes(0.0) == []
    assert not checker.all_down()


@settings(max_examples=150, deadline=None)
@given(
    interval=st.floats(0.05, 5.0),
    timeout_ratio=st.floats(0.05, 3.0),
    fall=st.integers(1, 5),
    rise=st.integers(1, 5),
    death_phase=st.floats(0.0, 1.0),
    rtt_ratio=st.floats(0.0, 0.9),
)
def test_property_dead_tm_found_within_detection_time_and_no_false_alarms(
    interval: float, timeout_ratio: float, fall: int, rise: int, death_phase: float, rtt_ratio: float
) -> None:
    """For any timing config and any echo delay below the timeout: a healthy TM never falls, and a TM
    that dies at any moment is down within interval × fall + timeout."""
    config = HealthConfig(interval=interval, timeout=interval * timeout_ratio, fall=fall, rise=rise)
    checker = HealthChecker(config, ["alive", "dying"], now=0.0)
    death = 10 * interval + death_phase * interval
    fleet = Fleet(checker, alive=lambda tm, now: tm == "alive" or now < death, rtt=config.timeout * rtt_ratio)
    fleet.run(0.0, death + 2 * config.detection_time)
    assert [(tm, up) for _, tm, up in fleet.changes] == [("dying", False)]
    assert fleet.changes[0][0] <= death + config.detection_time + 1e-9
