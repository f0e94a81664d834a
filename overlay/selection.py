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
running best and runner-up per row (whole-array max/min), so the build costs one shake_256 stream plus a
few vector passes per replica (measured in docs/design-selection.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MIN_ROWS_LOG2 = 16
MAX_WEIGHT = 1000
MAX_TMS = 65535  # the low 16 bits of a score carry the TM's index

_NONE = -1
_RANDOM_BYTES = 6  # 48 random bits per row and replica, above the 16-bit index
_RANDOM_MASK = np.uint64(0xFFFF_FFFF_FFFF_0000)


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
    best = np.zeros(rows, dtype=np.uint64)
    runner_up = np.zeros(rows, dtype=np.uint64)
    for index, name in enumerate(names):
        weight = weights[name]
        if weight <= 0:
            continue
        if weight > MAX_WEIGHT:
            raise ValueError(f"weight of {name} exceeds {MAX_WEIGHT}")
        score = _scores(seed, name, 0, rows, index)
        for replica in range(1, weight):
            np.maximum(score, _scores(seed, name, replica, rows, index), out=score)
        # The runner-up is the best of: the old runner-up, and whichever of (old best, this TM) lost.
        np.maximum(runner_up, np.minimum(best, score), out=runner_up)
        np.maximum(best, score, out=best)
    # Lists, not arrays: the distributor indexes them once per packet, and a list index is the faster one.
    return SelectionTable(names, _choices(best), _choices(runner_up))
