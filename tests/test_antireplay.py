"""overlay.antireplay: one loop's replay windows and a node's shared ones behave alike (a model of what a
window accepts, the same sequences through every implementation), and the shared ones hold across
processes — loops racing over the same counters accept each exactly once (negative control: loops with
windows of their own accept each once per loop), a loop that starts later meets what the others saw."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import antireplay, auth, gre
from overlay.antireplay import WINDOW, LocalWindows, SharedWindows
from overlay.auth import AuthConfig, Authenticator

HAS_C = antireplay._accelerated() is not None
KINDS = ["local", "shared-locked", *(["shared-atomic"] if HAS_C else [])]


def windows_of(kind: str, monkeypatch: pytest.MonkeyPatch | None = None) -> LocalWindows | SharedWindows:
    if kind == "local":
        return LocalWindows()
    if kind == "shared-locked":
        os.environ["OVERLAY_PURE_PYTHON"] = "1"
        try:
            return SharedWindows.create(64)
        finally:
            del os.environ["OVERLAY_PURE_PYTHON"]
    return SharedWindows.create(64)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


def test_the_shared_kinds_are_what_they_say() -> None:
    assert windows_of("shared-locked")._accept is None
    if HAS_C:
        assert windows_of("shared-atomic")._accept is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3 * WINDOW)), min_size=1, max_size=300),
       st.sampled_from(KINDS))
def test_a_window_accepts_each_counter_once_and_nothing_below_it(events: list[tuple[int, int]], kind: str) -> None:
    """The model: per sender and lane, a counter is accepted when it was never accepted and lies within
    WINDOW of the highest accepted; refused as replayed when accepted before (within the window), else too
    old. Senders are independent."""
    windows = windows_of(kind)
    accepted: dict[int, set[int]] = {}
    for sender, counter in events:
        seen = accepted.setdefault(sender, set())
        highest = max(seen, default=-1)
        if counter <= highest - WINDOW:
            expected = auth.TOO_OLD
        elif counter in seen:
            expected = auth.REPLAYED
        else:
            expected = None
        got = windows.check(1000 + sender, sender % 2, counter)
        assert got == expected, (kind, sender, counter, highest)
        if got is None:
            seen.add(counter)


def test_jumps_and_the_edges_of_the_window(kind: str) -> None:
    windows = windows_of(kind)
    assert windows.check(1, 0, 0) is None, "counter 0 is a counter like any other"
    assert windows.check(1, 0, 0) == auth.REPLAYED
    assert windows.check(1, 0, 10 * WINDOW) is None
    assert windows.check(1, 0, 9 * WINDOW) == auth.TOO_OLD, "exactly WINDOW below the highest"
    assert windows.check(1, 0, 9 * WINDOW + 1) is None, "WINDOW - 1 below: still inside"
    assert windows.check(1, 1, 9 * WINDOW) is None, "another lane: another window"
    assert windows.check(2, 0, 5) is None, "another sender: another window"
    assert windows.check(1, 0, antireplay.LAST_COUNTER) == auth.TOO_OLD


def test_a_full_shared_region_fails_closed() -> None:
    windows = SharedWindows.create(4)      # three quarters usable: 3 windows
    assert [windows.check(sender, 0, 1) for sender in range(3)] == [None] * 3
    assert windows.in_use() == 3
    assert windows.check(99, 0, 1) == auth.NO_WINDOW, "no window for a new sender: refused, never unchecked"
    assert windows.check(0, 0, 1) == auth.REPLAYED, "the senders that have one keep it"


def test_a_region_of_the_compiled_kind_is_refused_by_a_pure_python_process(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path) -> None:
    if not HAS_C:
        pytest.skip("the compiled extension is not built")
    atomic = SharedWindows.create(8)
    monkeypatch.setenv("OVERLAY_PURE_PYTHON", "1")
    with pytest.raises(ValueError, match="compiled extension"):
        SharedWindows.attach(os.dup(atomic.fileno()))
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a replay-window region"):
        SharedWindows.attach(os.open(junk, os.O_RDWR))


# -- several processes ------------------------------------------------------------------------------------

COUNTERS = 4000    # under WINDOW: in any order, none is too old
SENDERS = tuple((sender, lane) for sender in (11, 12, 13) for lane in (0, 1))   # 6 windows


def _race(control: Connection, shared: bool, start: Any, offset: int) -> None:
    windows = SharedWindows.receive(control) if shared else LocalWindows()
    # The same order in every loop (offset 0): they contend for the same slot at the same moment, the
    # hardest case for the compare-and-swap and the lock. From different offsets, each starts on counters
    # of its own, then runs into the others'. Counters stay within WINDOW: none is too old.
    work = [(sender, lane, counter) for counter in range(1, COUNTERS + 1) for sender, lane in SENDERS]
    work = work[offset:] + work[:offset]
    control.send("ready")
    while not start.value:     # spin, not sleep: every loop leaves the line within microseconds
        pass
    control.send([item for item in work if windows.check(*item) is None])


def race(windows: SharedWindows | None, loops: int = 3, rotate: bool = True) -> list[list[tuple[int, int, int]]]:
    """`loops` processes (spawned, as workers are) check the same counters at once."""
    context = multiprocessing.get_context("spawn")
    start = context.Value("i", 0, lock=False)
    pipes, processes = [], []
    for index in range(loops):
        ours, theirs = context.Pipe()
        offset = index * COUNTERS * len(SENDERS) // loops if rotate else 0
        process = context.Process(target=_race, args=(theirs, windows is not None, start, offset))
        process.start()
        if windows is not None:
            windows.send_to(ours, process.pid)
        pipes.append(ours)
        processes.append(process)
    try:
        assert all(pipe.poll(30) and pipe.recv() == "ready" for pipe in pipes)
        start.value = 1
        return [pipe.recv() if pipe.poll(60) else pytest.fail("a racing loop did not answer") for pipe in pipes]
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "local"])
def test_loops_racing_over_one_region_accept_each_counter_exactly_once(kind: str) -> None:
    for rotate in (False, True):
        windows = windows_of(kind)
        assert isinstance(windows, SharedWindows)
        accepted = race(windows, rotate=rotate)
        everything = [item for loop in accepted for item in loop]
        assert len(everything) == len(set(everything)) == COUNTERS * len(SENDERS), "each counter once, in all"
        # How the work fell (not asserted: a loop the scheduler starts late may find its share taken — the
        # check above holds either way). With the lock removed, this test failed 4 runs of 5 (by hand).
        print(f"\n{kind}, {'from offsets' if rotate else 'same order'}: accepted per loop {[len(loop) for loop in accepted]}")


def test_the_negative_control_loops_with_their_own_windows_accept_each_counter_once_per_loop() -> None:
    accepted = race(None)
    assert [len(loop) for loop in accepted] == [COUNTERS * len(SENDERS)] * 3


# -- through the authenticator ------------------------------------------------------------------------------

KEYS = {name: auth.generate_private_key() for name in ("dist", "tm1")}
PAYLOAD = gre.encapsulate(bytes(28))


def loop_of(name: str, lane: int, windows: LocalWindows | SharedWindows | None = None) -> Authenticator:
    other = "tm1" if name == "dist" else "dist"
    config = AuthConfig("encrypt", (KEYS[name],), {other: (auth.public_key_of(KEYS[other]),)})
    return Authenticator(config, 1_700_000_000_000_000_000, lane, windows)


def test_a_datagram_opened_by_one_loop_is_a_replay_at_every_other_and_at_a_restarted_one() -> None:
    tm = loop_of("tm1", 0)
    sealed = [tm.seal(PAYLOAD, "dist") for _ in range(3)]
    region = SharedWindows.create(16)
    loops = [loop_of("dist", lane, region) for lane in (0, 1)]
    assert loops[0].open(sealed[0]) == ("tm1", PAYLOAD)
    assert loops[1].open(sealed[0]) == auth.REPLAYED, "the other loop shares the window"
    assert loops[1].open(sealed[1]) == ("tm1", PAYLOAD)
    restarted = loop_of("dist", 1, SharedWindows.attach(os.dup(region.fileno())))
    assert restarted.open(sealed[1]) == auth.REPLAYED, "a restarted loop attaches to the same windows"
    assert restarted.reconfigure(restarted.config).open(sealed[0]) == auth.REPLAYED, "and a reload keeps them"
    assert restarted.open(sealed[2]) == ("tm1", PAYLOAD)
    separate = [loop_of("dist", lane) for lane in (0, 1)]
    assert [loop.open(sealed[0]) for loop in separate] == [("tm1", PAYLOAD)] * 2, \
        "the negative control: loops with windows of their own both take the replay"
