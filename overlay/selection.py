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

Building is done with C-level primitives (shake_256 streams, bytearray slice assignment, `map(max)`),
so a 65,536-row table for 3 TMs costs a few milliseconds and for 1,000 TMs about a second.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass

MIN_ROWS_LOG2 = 16
MAX_WEIGHT = 1000
MAX_TMS = 65535  # the low 16 bits of a score carry the TM's index

_NONE = -1


def _scores(seed: bytes, name: str, replica: int, rows: int, index: int) -> list[int]:
    """One replica's score per row: 48 random bits from shake_256(seed, name, replica), then the TM's
    16-bit index in the low bits, so `max` over scores also says who won (ties are impossible between
    different TMs)."""
    stream = hashlib.shake_256(b"overlay-rendezvous\0" + seed + b"\0" + name.encode() + b"\0" + str(replica).encode())
    random_bytes = stream.digest(rows * 6)
    packed = bytearray(rows * 8)
    for byte in range(6):
        packed[byte::8] = random_bytes[byte::6]
    packed[6::8] = bytes([index >> 8]) * rows
    packed[7::8] = bytes([index & 0xFF]) * rows
    scores = array("Q")
    scores.frombytes(bytes(packed))
    if sys.byteorder == "little":
        scores.byteswap()
    return scores.tolist()


@dataclass(frozen=True)
class SelectionTable:
    """Row → (first, second) choice. `first[row]` / `second[row]` index into `names` (-1: none)."""

    names: tuple[str, ...]
    first: list[int]
    second: list[int]

    @property
    def rows(self) -> int:
        return len(self.first)

    def choice(self, row: int) -> tuple[str | None, str | None]:
        first, second = self.first[row], self.second[row]
        return (self.names[first] if first >= 0 else None, self.names[second] if second >= 0 else None)

    def share(self) -> dict[str, float]:
        counts = [0] * len(self.names)
        for index in self.first:
            if index >= 0:
                counts[index] += 1
        return {name: counts[i] / self.rows for i, name in enumerate(self.names)}


def build_table(weights: Mapping[str, int], seed: bytes, rows_log2: int = MIN_ROWS_LOG2) -> SelectionTable:
    """Fill the table from {name: weight}. TMs of weight 0 never win a row; an empty (or all-zero) set
    gives a table with no choices."""
    if rows_log2 < MIN_ROWS_LOG2:
        raise ValueError(f"the table needs at least 2^{MIN_ROWS_LOG2} rows")
    if len(weights) > MAX_TMS:
        raise ValueError(f"at most {MAX_TMS} TMs")
    rows = 1 << rows_log2
    # Sorted names give indexes that do not depend on the caller's order; the scores never did.
    names = tuple(sorted(weights))
    best = [0] * rows
    runner_up = [0] * rows
    for index, name in enumerate(names):
        weight = weights[name]
        if weight <= 0:
            continue
        if weight > MAX_WEIGHT:
            raise ValueError(f"weight of {name} exceeds {MAX_WEIGHT}")
        score = _scores(seed, name, 0, rows, index)
        for replica in range(1, weight):
            score = list(map(max, score, _scores(seed, name, replica, rows, index)))
        runner_up = list(map(max, runner_up, map(min, best, score)))
        best = list(map(max, best, score))
    first = [(value & 0xFFFF) if value else _NONE for value in best]
    second = [(value & 0xFFFF) if value else _NONE for value in runner_up]
    return SelectionTable(names, first, second)
