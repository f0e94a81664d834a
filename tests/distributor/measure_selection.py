"""Measure the selection table for docs/design-selection.md: share deviation, disruption and build cost
for fleets of 3, 10, 100 and 1,000 TMs. Reports only.

    python -m tests.distributor.measure_selection [--sizes 3,10,100,1000] [--rows-log2 16]
"""

from __future__ import annotations

import argparse
import random
import time

from overlay.selection import build_table
from tests.test_selection import deviation, firsts

SEED = b"measure-selection-seed"


def measure(size: int, rows_log2: int, weighted: bool) -> str:
    rng = random.Random(size)
    weights = {f"tm{i:04d}": (rng.randint(1, 4) if weighted else 1) for i in range(size)}
    start = time.perf_counter()
    table = build_table(weights, SEED, rows_log2)
    build = time.perf_counter() - start
    absolute, relative = deviation(table, weights)
    line = f"{size:5} {'1-4' if weighted else '1':>7} {table.rows:8} {build:8.2f} s {absolute:10.5f} {relative:9.1%}"
    if size >= 2 and size <= 100:
        # Disruption: remove the first TM, then add a newcomer; count rows whose first choice changed.
        gone = next(iter(weights))
        without = build_table({n: w for n, w in weights.items() if n != gone}, SEED, rows_log2)
        removed = sum(a != b for a, b in zip(firsts(table), firsts(without))) / table.rows
        added_weights = {**weights, "newcomer": 1}
        added = build_table(added_weights, SEED, rows_log2)
        gained = sum(a != b for a, b in zip(firsts(table), firsts(added))) / table.rows
        line += f" {removed:8.4f} (share {table.share()[gone]:.4f}) {gained:8.4f} (ideal {1 / sum(added_weights.values()):.4f})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3,10,100,1000")
    parser.add_argument("--rows-log2", type=int, default=16)
    arguments = parser.parse_args()
    print(f"{'TMs':>5} {'weights':>7} {'rows':>8} {'build':>10} {'max|d|':>10} {'max rel':>9}  moved on removal / addition")
    for size in (int(s) for s in arguments.sizes.split(",")):
        for weighted in (False, True) if size <= 100 else (False,):
            print(measure(size, arguments.rows_log2, weighted), flush=True)


if __name__ == "__main__":
    main()
