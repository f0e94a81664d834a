"""TM selection: a table of 2^k rows (k ≥ 16), each row holding a first and a second choice of TM, filled
by weighted rendezvous (highest-random-weight) hashing from the fleet's {name: weight} set and the
fleet's secret seed.

Why rendezvous: each row ranks every TM by a score that depends only on (seed, TM name, row), so
- the table is a pure function of the set — never of config order — and every distributor with the
  same config builds the same table;
- removing a TM changes exactly the rows whose first choice it was (every other row's winner is
  unchanged), and adding one takes only the rows it now wins;
- a TM of integer weight w competes with w independent replicas; the row goes to the best replica, so
  each TM wins a row with probability w / Σw exactly. The realised share deviates from the ideal by
  sampling noise only (≈ sqrt(share·rows)/rows; measured and documented in docs/design-selection.md).

The scores are shake_256 streams; numpy turns each stream into one 64-bit score per row and keeps the
running best four per row (whole-array max/min), so the build costs one shake_256 stream plus a few
vector passes per replica (measured in docs/design-selection.md): ~0.9 ms a TM, ~1 s for 1,000 TMs.

Rebuilds off the hot path (issue 10): `table_for` derives a table from a recent one instead of building it
— a TM that goes down, is drained, comes back or changes weight costs one TM's stream or a few vector
passes (~1 ms, whatever the fleet's size), not the whole build. That is exact: a table keeps the best four
scores of every row, removing a TM shifts its row's lower scores up (the row then knows one fewer), adding
one inserts its scores, and where a row would no longer know its best two, the table is built in full.
Derived tables equal full builds bit for bit (tests/test_selection.py), and the recent tables are shared
by the process, so a reload's dry run builds what the reload then uses.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

MIN_ROWS_LOG2 = 16
MAX_WEIGHT = 1000
MAX_TMS = 65535  # the low 16 bits of a score carry the TM's index

_NONE = -1
_RANDOM_BYTES = 6  # 48 random bits per row and replica, above the 16-bit index
_RANDOM_MASK = np.uint64(0xFFFF_FFFF_FFFF_0000)
_INDEX_MASK = np.uint64(0xFFFF)
LEVELS = 4        # best scores kept per row: how many TMs can leave before a row must be built again
CACHED_TABLES = 8


def _scores(seed: bytes, name: str, replica: int, rows: int, index: int) -> np.ndarray:
    """One replica's score per row: 48 random bits from shake_256(seed, name, replica), then the TM's
    16-bit index in the low bits, so `max` over scores also says who won (ties are impossible between
    different TMs)."""
    stream = hashlib.shake_256(b"overlay-rendezvous\0" + seed + b"\0" + name.encode() + b"\0" + str(replica).encode())
    # Row i's word is the 8 big-endian bytes from offset 6·i: its own 6 random bytes, then 2 of the next
    # row's, which the mask swaps for the index (2 bytes of padding let the last row read its word).
    random_bytes = stream.digest(rows * _RANDOM_BYTES) + b"\0\0"
    words = np.ndarray((rows,), dtype=">u8", buffer=random_bytes, strides=(_RANDOM_BYTES,))
    score = words.astype(np.uint64)
    score &= _RANDOM_MASK
    score |= np.uint64(index)
    return score


def _choices(scores: np.ndarray) -> list[int]:
    """Winning scores → TM indexes, -1 where no TM scored (the score 0 stands for "none")."""
    return np.where(scores != 0, (scores & np.uint64(0xFFFF)).astype(np.int64), _NONE).tolist()


@dataclass(frozen=True)
class SelectionTable:
    """Row → (first, second) choice. `first[row]` / `second[row]` index into `names` (-1: none).
    `levels` (the best LEVELS scores per row) and `depth` (how many of them are known) let `table_for`
    derive the next table from this one."""

    names: tuple[str, ...]
    first: list[int]
    second: list[int]
    levels: np.ndarray | None = field(default=None, compare=False, repr=False)
    depth: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return len(self.first)

    def choice(self, row: int) -> tuple[str | None, str | None]:
        first, second = self.first[row], self.second[row]
        return (self.names[first] if first >= 0 else None, self.names[second] if second >= 0 else None)

    @functools.cached_property
    def _shares(self) -> dict[str, float]:
        first = np.asarray(self.first, dtype=np.int64)
        counts = np.bincount(first[first >= 0], minlength=len(self.names)).tolist()
        return {name: counts[i] / self.rows for i, name in enumerate(self.names)}

    def share(self) -> dict[str, float]:
        """Each TM's fraction of the rows (computed once per table: status asks for it every scrape)."""
        return dict(self._shares)


def build_table(weights: Mapping[str, int], seed: bytes, rows_log2: int = MIN_ROWS_LOG2) -> SelectionTable:
    """Fill the table from {name: weight}. TMs of weight 0 never win a row; an empty (or all-zero) set
    gives a table with no choices."""
    _check(weights, rows_log2)
    rows = 1 << rows_log2
    # Sorted names give indexes that do not depend on the caller's order; the scores never did.
    names = tuple(sorted(weights))
    levels = np.zeros((LEVELS, rows), dtype=np.uint64)
    for index, name in enumerate(names):
        if weights[name] > 0:
            _insert(levels, _tm_scores(seed, name, weights[name], rows, index))
    return _table(names, levels, np.full(rows, LEVELS, dtype=np.int8))


def _check(weights: Mapping[str, int], rows_log2: int) -> None:
    if rows_log2 < MIN_ROWS_LOG2:
        raise ValueError(f"the table needs at least 2^{MIN_ROWS_LOG2} rows")
    if len(weights) > MAX_TMS:
        raise ValueError(f"at most {MAX_TMS} TMs")
    for name, weight in weights.items():
        if weight > MAX_WEIGHT:
            raise ValueError(f"weight of {name} exceeds {MAX_WEIGHT}")


def _tm_scores(seed: bytes, name: str, weight: int, rows: int, index: int) -> np.ndarray:
    score = _scores(seed, name, 0, rows, index)
    for replica in range(1, weight):
        np.maximum(score, _scores(seed, name, replica, rows, index), out=score)
    return score


def _insert(levels: np.ndarray, score: np.ndarray) -> None:
    """Insert one TM's scores into every row's sorted best-LEVELS (in place; `score` is consumed)."""
    for level in levels:
        lower = np.minimum(level, score)
        np.maximum(level, score, out=level)
        score = lower


def _table(names: tuple[str, ...], levels: np.ndarray, depth: np.ndarray) -> SelectionTable:
    # Lists, not arrays: the distributor indexes them once per packet, and a list index is the faster one.
    return SelectionTable(names, _choices(levels[0]), _choices(levels[1]), levels, depth)


# -- derived tables ----------------------------------------------------------------------------------------
CACHED_BYTES = 64 << 20


def _cached_bytes() -> int:
    return sum(table.levels.nbytes for table in _recent.values() if table.levels is not None)


TableKey = tuple[bytes, int, frozenset[tuple[str, int]]]   # (seed, rows_log2, the fleet's weights)

_lock = threading.Lock()    # `_recent` is shared with the table builder's thread
_recent: OrderedDict[TableKey, SelectionTable] = OrderedDict()


def table_key(weights: Mapping[str, int], seed: bytes, rows_log2: int) -> TableKey:
    return (seed, rows_log2, frozenset(weights.items()))


def table_for(weights: Mapping[str, int], seed: bytes, rows_log2: int = MIN_ROWS_LOG2) -> SelectionTable:
    """The table `build_table` would build, derived from a recent table of the same seed when one differs
    by a few TMs (cheap), else built; recent tables are kept for the next call (the process's last
    CACHED_TABLES). Safe to call from a thread while the event loop calls `cheap_table`."""
    return cheap_table(weights, seed, rows_log2) or _keep(table_key(weights, seed, rows_log2),
                                                          build_table(weights, seed, rows_log2))


def cheap_table(weights: Mapping[str, int], seed: bytes, rows_log2: int = MIN_ROWS_LOG2) -> SelectionTable | None:
    """`table_for`'s table where that is cheap — kept, or derived from a recent one (~1-12 ms, whatever the
    fleet's size) — else None: it needs a full build (a second or two for a thousand TMs), which an agent
    runs off its event loop (overlay/runtime/tables.py)."""
    _check(weights, rows_log2)
    key = table_key(weights, seed, rows_log2)
    with _lock:
        table = _recent.get(key)
        if table is not None:
            _recent.move_to_end(key)
            return table
        recent = list(_recent.items())
    derived = _derive(weights, seed, rows_log2, recent)
    return None if derived is None else _keep(key, derived)


def _keep(key: TableKey, table: SelectionTable) -> SelectionTable:
    with _lock:
        _recent[key] = table
        _recent.move_to_end(key)
        # Bounded in count and in bytes (a 2^22-row table's scores are 128 MiB), keeping at least two: a
        # drain needs the tables with and without the draining TM.
        while len(_recent) > CACHED_TABLES or (len(_recent) > 2 and _cached_bytes() > CACHED_BYTES):
            _recent.popitem(last=False)
    return table


def _derive(weights: Mapping[str, int], seed: bytes, rows_log2: int,
            recent: list[tuple[TableKey, SelectionTable]]) -> SelectionTable | None:
    wanted = frozenset(weights.items())
    candidates = [(len(wanted ^ items), items, table) for (s, r, items), table in recent
                  if s == seed and r == rows_log2]
    if not candidates:
        return None
    changes, items, base = min(candidates, key=lambda candidate: candidate[0])
    if changes > 2 * LEVELS or base.levels is None or base.depth is None:
        return None
    old = dict(zip(base.names, range(len(base.names))))
    old_weights = dict(items)
    leaving = [name for name, weight in old_weights.items() if weights.get(name) != weight]
    joining = [name for name, weight in weights.items() if old_weights.get(name) != weight and weight > 0]
    levels, depth = base.levels.copy(), base.depth.copy()
    for name in leaving:
        if old_weights[name] > 0:
            _remove(levels, depth, old[name])
    names = tuple(sorted(weights))
    # Indexes follow the sorted names: renumber the scores that stay (their order is unchanged).
    remap = np.zeros(max(len(base.names), 1), dtype=np.uint64)
    new = {name: index for index, name in enumerate(names)}
    for name, index in old.items():
        if name in new:
            remap[index] = new[name]
    known = levels != 0
    levels[known] = (levels[known] & _RANDOM_MASK) | remap[(levels[known] & _INDEX_MASK).astype(np.int64)]
    rows = 1 << rows_log2
    for name in joining:
        _insert(levels, _tm_scores(seed, name, weights[name], rows, new[name]))
    # Every row must still know its best two (or every TM, when there are fewer than that).
    if int(depth.min()) < min(2, sum(1 for weight in weights.values() if weight > 0)):
        return None
    return _table(names, levels, depth)


def _remove(levels: np.ndarray, depth: np.ndarray, index: int) -> None:
    """Take TM `index` out of every row it is among the best of: the scores below it move up, and the
    row knows one fewer (its lowest level is now unknown)."""
    for level in range(LEVELS):
        rows = np.nonzero((levels[level] != 0) & ((levels[level] & _INDEX_MASK) == np.uint64(index)))[0]
        if rows.size:
            levels[level:-1, rows] = levels[level + 1:, rows]
            levels[-1, rows] = 0
            depth[rows] -= 1
