"""A rebuild that needs a full table build runs off the event loop (issue 10): the core hands the agent's
`TableBuilder` the fleets it needs, keeps the table it has meanwhile, and swaps when they come back —
equal to the table built on the spot. Cheap rebuilds (derived tables) stay immediate. With the real
builder the loop keeps running during the build (negative control: without it the build blocks it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay import selection
from overlay.config import parse_node_config
from overlay.distributor.core import Distributor
from overlay.runtime.tables import TableBuilder, build_all
from tests.distributor.bench_rebuild import CONFIG, fleet_config

TMS = 60
DOWN = [f"tm{i:04}" for i in range(10, 20)]   # ten at once: more than a table can derive (2 x LEVELS)


@pytest.fixture(autouse=True)
def no_recent_tables() -> Iterator[None]:
    """The process keeps recent tables: a fleet an earlier test built would be derived, not built."""
    selection._recent.clear()
    yield
    selection._recent.clear()


def core_of(tms: int = TMS) -> Distributor:
    node = parse_node_config(fleet_config(tms), "rebuild", Path(CONFIG).parent)
    assert node.distributor is not None
    return Distributor(node.distributor)


def reference(state: tuple[dict[str, str], dict[str, bool], frozenset[str]]) -> Distributor:
    """The same fleet state, built on the spot."""
    core = core_of()
    core.apply_fleet_state(*state)
    return core


def down(core: Distributor, names: list[str]) -> tuple[dict[str, str], dict[str, bool], frozenset[str]]:
    admin, up, returning = core.fleet_state()
    return admin, {**up, **dict.fromkeys(names, False)}, returning


def test_a_full_build_is_handed_off_and_the_old_table_serves_until_it_comes_back() -> None:
    core = core_of()
    asked: list[tuple] = []
    core.prepare_tables = lambda wanted, seed, rows_log2, done: asked.append((wanted, seed, rows_log2, done))
    before = core.table
    core.set_tm_up("tm0003", False)           # one TM: derived, at once
    assert asked == [] and core.table is not before and "tm0003" not in core.table.names
    current = core.table
    state = down(core, DOWN)
    core.apply_fleet_state(*state)
    assert len(asked) == 1 and core.rebuilds_deferred == 1
    assert core.table is current, "the packets keep the table they have meanwhile"
    assert core.tm_states()["tm0010"]["serving"], "and the status says what the packets see"
    wanted, seed, rows_log2, done = asked[0]
    assert [set(weights) for weights in wanted] == [set(current.names) - set(DOWN)]
    done(build_all(wanted, seed, rows_log2))
    expected = reference(state)
    assert core.table.names == expected.table.names and core.table.first == expected.table.first
    assert core.table.second == expected.table.second and not core.tm_states()["tm0010"]["serving"]


def test_changes_during_a_build_wait_for_it_then_the_fleet_of_then_is_built_and_a_failed_build_is_done_here() -> None:
    core = core_of()
    asked: list[tuple] = []
    core.prepare_tables = lambda wanted, seed, rows_log2, done: asked.append((wanted, seed, rows_log2, done))
    core.apply_fleet_state(*down(core, DOWN))
    moved = down(core, [*DOWN, *(f"tm{i:04}" for i in range(30, 40))])
    core.apply_fleet_state(*moved)           # while the first build runs: ten more down
    assert len(asked) == 1, "one build at a time: the change waits for it"
    assert core.snapshot()["table_pending"] is True
    assert not core.tm_states()["tm0035"]["reachable"], "who is reachable follows at once (owner replies)"
    first = asked[0]
    first[3](build_all(*first[:3]))          # the first comes back: not what the fleet needs now
    assert len(asked) == 2, "the rebuild asked again, for the fleet of now"
    asked[1][3](None)                        # that build failed: the core builds here, now
    assert core.snapshot()["table_pending"] is False
    expected = reference(moved)
    assert core.table.first == expected.table.first and core.table.names == expected.table.names


def test_with_the_builder_the_loop_keeps_running_during_the_build() -> None:
    async def ticks_during(apply_off_loop: bool) -> tuple[int, Distributor]:
        loop = asyncio.get_running_loop()
        selection._recent.clear()
        core = core_of()
        builder = TableBuilder(loop)
        if apply_off_loop:
            core.prepare_tables = builder
        ticks = [0]

        def tick() -> None:
            ticks[0] += 1
            loop.call_soon(tick)

        loop.call_soon(tick)
        await asyncio.sleep(0)
        start_ticks, before = ticks[0], core.table
        core.apply_fleet_state(*down(core, DOWN))
        for _ in range(20_000):
            if core.table is not before:
                break
            await asyncio.sleep(0.001)
        builder.close()
        return ticks[0] - start_ticks, core

    off_loop, core = asyncio.run(ticks_during(True))
    on_loop, _ = asyncio.run(ticks_during(False))
    assert off_loop > 0, "the loop ran callbacks while the table was built"
    assert on_loop == 0, "the negative control: built on the loop, nothing else ran until it was done"
    expected = reference(down(core, DOWN))
    assert core.table.first == expected.table.first


def test_one_health_pass_is_one_rebuild() -> None:
    """`set_tms_up`: the TMs one health pass reports, one rebuild (one derivation or one build), the same
    table as one change after another."""
    core, one_by_one = core_of(), core_of()
    asked: list[tuple] = []
    core.prepare_tables = lambda wanted, seed, rows_log2, done: asked.append((wanted, seed, rows_log2, done))
    core.set_tms_up(dict.fromkeys(DOWN, False))
    assert len(asked) == 1 and core.rebuilds_deferred == 1
    asked[0][3](build_all(*asked[0][:3]))
    for name in DOWN:
        one_by_one.set_tm_up(name, False)
    assert core.table.first == one_by_one.table.first and core.table.names == one_by_one.table.names
