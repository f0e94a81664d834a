"""overlay.selection: the weighted rendezvous table — determinism, minimal disruption, weights, second
choice, and the build itself: bit for bit the table of a pure-Python reference build. Share deviations
measured here are the numbers in docs/design-selection.md."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Mapping

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from overlay import selection
from overlay.selection import MIN_ROWS_LOG2, SelectionTable, build_table
from tests.distributor.configs import CELLS, distributor

SEED = b"selection-test-seed"


def deviation(table: SelectionTable, weights: dict[str, int]) -> tuple[float, float]:
    """(largest |share - ideal| as a fraction of all rows, largest |share - ideal| / ideal)."""
    total = sum(weights.values())
    share = table.share()
    absolute = max(abs(share[name] - weight / total) for name, weight in weights.items())
    relative = max(abs(share[name] - weight / total) / (weight / total) for name, weight in weights.items() if weight)
    return absolute, relative


def firsts(table: SelectionTable) -> list[str | None]:
    return [table.names[i] if i >= 0 else None for i in table.first]


def seconds(table: SelectionTable) -> list[str | None]:
    return [table.names[i] if i >= 0 else None for i in table.second]


def fingerprint(table: SelectionTable) -> str:
    """A short digest of every row's first and second choice: pins the tables that shipped distributors build."""
    return hashlib.sha256(repr((table.first, table.second)).encode()).hexdigest()[:16]


fleets = st.dictionaries(st.text("abcdefghij0123456789-", min_size=1, max_size=8), st.integers(1, 3), min_size=1, max_size=5)


# -- determinism ------------------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(fleets, st.randoms(use_true_random=False))
def test_same_set_in_any_order_gives_the_same_table(weights: dict[str, int], rnd: random.Random) -> None:
    items = list(weights.items())
    rnd.shuffle(items)
    a, b = build_table(weights, SEED), build_table(dict(items), SEED)
    assert (firsts(a), seconds(a)) == (firsts(b), seconds(b))


def test_seed_changes_the_table() -> None:
    weights = {"tm1": 1, "tm2": 1, "tm3": 1}
    assert firsts(build_table(weights, SEED)) != firsts(build_table(weights, SEED + b"x"))


def test_config_order_does_not_matter_to_a_distributor() -> None:
    """Two configs listing the same TMs in another order decide every row alike."""
    head, *blocks = CELLS.split("[[tm]]")
    a, b = distributor(CELLS), distributor(head + "".join("[[tm]]" + block for block in reversed(blocks)))
    assert [tm.name for tm in a.config.tms] != [tm.name for tm in b.config.tms]
    assert (firsts(a.table), seconds(a.table)) == (firsts(b.table), seconds(b.table))


# -- disruption -------------------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(fleets.filter(lambda w: len(w) >= 2), st.data())
def test_removing_a_tm_moves_only_its_rows_to_their_second_choice(weights: dict[str, int], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(sorted(weights)))
    before = build_table(weights, SEED)
    after = build_table({name: w for name, w in weights.items() if name != gone}, SEED)
    for old_first, old_second, new_first in zip(firsts(before), seconds(before), firsts(after)):
        assert new_first == (old_second if old_first == gone else old_first)


@settings(max_examples=8, deadline=None)
@given(fleets, st.integers(1, 4))
def test_adding_a_tm_takes_only_rows_it_now_wins(weights: dict[str, int], weight: int) -> None:
    before = build_table(weights, SEED)
    after = build_table({**weights, "newcomer!": weight}, SEED)
    moved = [(old, new) for old, new in zip(firsts(before), firsts(after)) if old != new]
    assert moved and all(new == "newcomer!" for _, new in moved)


def test_weight_zero_never_wins_and_all_zero_has_no_choice() -> None:
    table = build_table({"tm1": 1, "tm2": 0, "tm3": 2}, SEED)
    assert "tm2" not in set(firsts(table)) | set(seconds(table))
    empty = build_table({"tm1": 0, "tm2": 0}, SEED)
    assert empty.choice(0) == (None, None) and set(empty.first) == {-1}


# -- second choice --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [{"a": 1, "b": 1}, {"a": 5, "b": 1}, {f"tm{i}": 1 + i % 3 for i in range(7)}])
def test_second_choice_never_equals_first(weights: dict[str, int]) -> None:
    table = build_table(weights, SEED)
    assert all(first != second and second >= 0 for first, second in zip(table.first, table.second))


def test_one_tm_has_no_second_choice() -> None:
    table = build_table({"only": 3}, SEED)
    assert set(table.first) == {0} and set(table.second) == {-1}


# -- weights --------------------------------------------------------------------------------------------------------
def fleet(size: int, rng: random.Random, max_weight: int) -> dict[str, int]:
    return {f"tm{i:04d}": rng.randint(1, max_weight) for i in range(size)}


@pytest.mark.parametrize(("size", "max_weight"), [(3, 5), (10, 5), (100, 1)])
def test_weights_honoured_within_one_percent(size: int, max_weight: int) -> None:
    weights = fleet(size, random.Random(size), max_weight)
    table = build_table(weights, SEED)
    assert table.rows >= 65536
    absolute, relative = deviation(table, weights)
    print(f"{size} TMs: max |share - ideal| = {absolute:.5f} of all rows, max relative {relative:.3%}")
    assert absolute <= 0.01


def test_weights_honoured_for_a_thousand_tms() -> None:
    """The one 1,000-TM build (about a second): equal weights, the largest fleet promised, and the very
    table the pure-Python build gave (a minute of it: fingerprint only)."""
    weights = {f"tm{i:04d}": 1 for i in range(1000)}
    table = build_table(weights, SEED)
    absolute, relative = deviation(table, weights)
    print(f"1000 TMs: max |share - ideal| = {absolute:.6f} of all rows, max relative {relative:.2%}")
    assert absolute <= 0.01
    assert len(set(table.first)) == 1000  # every TM holds rows
    assert fingerprint(table) == "1dfb49d12a34e3b2"


def test_weights_are_ratios() -> None:
    """A weight-3 TM holds three times the rows of a weight-1 TM (to sampling noise, ±2 %)."""
    table = build_table({"big": 3, "small": 1}, SEED)
    share = table.share()
    assert share["big"] == pytest.approx(0.75, abs=0.02) and share["small"] == pytest.approx(0.25, abs=0.02)


# -- the build is exact: every row as the reference computes it ------------------------------------------------------
def reference_scores(seed: bytes, name: str, replica: int, rows: int, index: int) -> list[int]:
    """The score definition, row by row: 6 bytes per row from shake_256, big-endian, above the TM's index."""
    stream = hashlib.shake_256(b"overlay-rendezvous\0" + seed + b"\0" + name.encode() + b"\0" + str(replica).encode())
    random_bytes = stream.digest(rows * 6)
    return [int.from_bytes(random_bytes[6 * row:6 * row + 6], "big") << 16 | index for row in range(rows)]


def reference_build(weights: Mapping[str, int], seed: bytes, rows_log2: int) -> tuple[list[int], list[int]]:
    """The oracle: (first, second) per row in plain Python, the algorithm distributors ran before numpy
    built the table. A fleet mixing both versions must decide every row alike."""
    rows = 1 << rows_log2
    best, runner_up = [0] * rows, [0] * rows
    for index, name in enumerate(sorted(weights)):
        if weights[name] <= 0:
            continue
        replicas = [reference_scores(seed, name, replica, rows, index) for replica in range(weights[name])]
        score = [max(row) for row in zip(*replicas)]
        runner_up = [max(second, min(first, mine)) for first, second, mine in zip(best, runner_up, score)]
        best = [max(first, mine) for first, mine in zip(best, score)]
    return [v & 0xFFFF if v else -1 for v in best], [v & 0xFFFF if v else -1 for v in runner_up]


@settings(max_examples=6)
@given(
    st.dictionaries(st.text("abé-01", min_size=1, max_size=6), st.integers(0, 5), max_size=5),
    st.binary(max_size=24),
)
@example({"tm1": 0, "tm2": 0}, SEED)  # no choices at all: -1 in every row
@example({"only": 5}, b"")  # one TM: no second choice
def test_build_equals_the_reference_build_bit_for_bit(weights: dict[str, int], seed: bytes) -> None:
    table = build_table(weights, seed)
    assert (table.first, table.second) == reference_build(weights, seed, MIN_ROWS_LOG2)
    assert all(type(value) is int for value in table.first[:8] + table.second[:8])  # lists of ints, per packet


def test_a_larger_table_equals_the_reference_build() -> None:
    table = build_table({"a": 2, "b": 1, "c": 0}, SEED, MIN_ROWS_LOG2 + 1)
    assert (table.first, table.second) == reference_build({"a": 2, "b": 1, "c": 0}, SEED, MIN_ROWS_LOG2 + 1)


@pytest.mark.parametrize(
    ("weights", "rows_log2", "expected"),
    [
        ({"tm1": 1, "tm2": 1, "tm3": 1}, 16, "20d8a7eee5bb9544"),
        ({"a": 5, "b": 1}, 16, "f34769fadca60a89"),
        ({f"tm{i}": 1 + i % 3 for i in range(7)}, 16, "2ce24dad571e5644"),
        ({"tm1": 1, "tm2": 0, "tm3": 2}, 16, "8f5c467d2b62d586"),
        ({"a": 2, "b": 1}, 17, "890a8ee2cafe880a"),
    ],
)
def test_tables_are_those_shipped_distributors_build(weights: dict[str, int], rows_log2: int, expected: str) -> None:
    """Fingerprints taken from the pure-Python build before numpy replaced it: a change to the score
    definition (or to the reference above along with it) fails here."""
    assert fingerprint(build_table(weights, SEED, rows_log2)) == expected


# -- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weights", "rows_log2", "message"),
    [({"a": 1}, MIN_ROWS_LOG2 - 1, "at least 2\\^16 rows"), ({"a": 1001}, MIN_ROWS_LOG2, "exceeds 1000")],
)
def test_refusals(weights: dict[str, int], rows_log2: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_table(weights, SEED, rows_log2)


# -- derived tables (table_for): equal to full builds, bit for bit ---------------------------------------------------
@settings(max_examples=25 if os.environ.get("CI") == "true" else 8, deadline=None, derandomize=True)
@given(st.data())
def test_derived_tables_equal_full_builds(data: st.DataObject) -> None:
    """A fleet's life — TMs going down and up, drained, re-weighted, added — through `table_for`, each
    table compared with a fresh `build_table` of the same set."""
    selection._recent.clear()
    fleet = {f"tm{i}": data.draw(st.integers(0, 3), label=f"weight{i}") for i in range(data.draw(st.integers(1, 7)))}
    current = dict(fleet)
    derived_any = False
    for _ in range(data.draw(st.integers(1, 6))):
        action = data.draw(st.sampled_from(["down", "up", "weight", "add"]))
        names = sorted(current)
        if action == "down" and len(current) > 1:
            current.pop(data.draw(st.sampled_from(names)))
        elif action == "up":
            missing = sorted(set(fleet) - set(current))
            if missing:
                name = data.draw(st.sampled_from(missing))
                current[name] = fleet[name]
        elif action == "weight":
            current[data.draw(st.sampled_from(names))] = data.draw(st.integers(0, 4))
        else:
            name = f"new{len(fleet)}"
            fleet[name] = current[name] = data.draw(st.integers(1, 3))
        before = len(selection._recent)
        table = selection.table_for(current, SEED)
        derived_any |= len(selection._recent) > before
        full = build_table(current, SEED)
        assert (table.names, table.first, table.second) == (full.names, full.first, full.second), (action, current)
    assert derived_any


def test_a_large_fleet_losing_and_regaining_tms_is_derived_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane off the hot path: after the first build, a TM down, drained or back costs a
    few vector passes or one TM's scores, never a whole build (reported: the times; asserted: no build)."""
    selection._recent.clear()
    fleet = {f"tm{i:04}": 1 for i in range(1000 if os.environ.get("CI") == "true" else 200)}
    start = time.perf_counter()
    selection.table_for(fleet, SEED)
    full = time.perf_counter() - start
    builds: list[int] = []
    real_build = selection.build_table
    monkeypatch.setattr(selection, "build_table", lambda *args: builds.append(1) or real_build(*args))
    start = time.perf_counter()
    down = selection.table_for({name: w for name, w in fleet.items() if name != "tm0042"}, SEED)
    back = selection.table_for(fleet, SEED)                   # recent: no work at all
    drained = selection.table_for({name: w for name, w in fleet.items() if name not in ("tm0042", "tm0007")}, SEED)
    returned = selection.table_for({**fleet, "tm-new": 2}, SEED)
    derived = time.perf_counter() - start
    print(f"\n{len(fleet)} TMs: full build {full * 1000:.0f} ms; down, back, two down, one new: {derived * 1000:.1f} ms")
    assert builds == [], "derived from the recent tables, never built again"
    monkeypatch.undo()
    for table, weights in ((down, {n: w for n, w in fleet.items() if n != "tm0042"}), (back, fleet),
                           (drained, {n: w for n, w in fleet.items() if n not in ("tm0042", "tm0007")}),
                           (returned, {**fleet, "tm-new": 2})):
        full_table = build_table(weights, SEED)
        assert (table.first, table.second) == (full_table.first, full_table.second)
