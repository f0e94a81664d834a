"""The decision table of FIG. 9 as data: a source row × destination column → an action.

Rows classify the source, columns the destination (see docs/design-decision.md):

| source \\ destination | xlate+virtual | virtual  | xlate   | unknown  |
|----------------------|---------------|----------|---------|----------|
| nat-able+node        | to-dest       | hash-src | to-dest | hash-dst |
| nat-able             | to-dest       | hash-src | to-dest | hash-dst |
| node                 | to-dest       | hash-src | to-dest | hash-dst |
| unknown              | hash-src      | hash-src | hash-src| route    |

Why it is symmetric through NAT: the endpoint that is hashed is the one a TM never rewrites — the client
of an inbound connection (source towards the VIP, destination of the reply) or the remote server of an
outbound one (destination of the node's packets, source of the replies, which arrive addressed to an
xlate address and are delivered to its owner, the TM that chose it).

Operators may override any cell (`[decision.overrides]`, "ROW>COLUMN" = ACTION), for instance to route
traffic between unknown addresses elsewhere or to drop a class outright.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS = ("nat-able+node", "nat-able", "node", "unknown")
COLUMNS = ("xlate+virtual", "virtual", "xlate", "unknown")
HASH_SRC = "hash-src"
HASH_DST = "hash-dst"
TO_DEST = "to-dest"
ROUTE = "route"
DROP = "drop"
CELL_ACTIONS = (HASH_SRC, HASH_DST, TO_DEST, ROUTE, DROP)

# Role bits of an address (a source may be several at once).
VIRTUAL = 1
NODE = 2
NAT_ABLE = 4
XLATE = 8

FIGURE_9: dict[tuple[str, str], str] = {
    **{(row, "xlate+virtual"): TO_DEST for row in ROWS[:3]},
    **{(row, "virtual"): HASH_SRC for row in ROWS[:3]},
    **{(row, "xlate"): TO_DEST for row in ROWS[:3]},
    **{(row, "unknown"): HASH_DST for row in ROWS[:3]},
    ("unknown", "xlate+virtual"): HASH_SRC,
    ("unknown", "virtual"): HASH_SRC,
    ("unknown", "xlate"): HASH_SRC,
    ("unknown", "unknown"): ROUTE,
}


def row_of(roles: int) -> str:
    """The source row for an address's role bits. Virtual/xlate sources have no row of their own:
    such packets come from TMs (handled before the table) or are spoofed, so they classify as unknown."""
    nat_able = roles & NAT_ABLE
    node = roles & NODE
    if nat_able and node:
        return "nat-able+node"
    if nat_able:
        return "nat-able"
    if node:
        return "node"
    return "unknown"


def column_of(roles: int) -> str:
    virtual = roles & VIRTUAL
    xlate = roles & XLATE
    if virtual and xlate:
        return "xlate+virtual"
    if virtual:
        return "virtual"
    if xlate:
        return "xlate"
    return "unknown"


@dataclass(frozen=True)
class DecisionTable:
    cells: dict[tuple[str, str], str]
    overridden: frozenset[tuple[str, str]]

    @classmethod
    def with_overrides(cls, overrides: dict[tuple[str, str], str]) -> DecisionTable:
        cells = dict(FIGURE_9)
        cells.update(overrides)
        return cls(cells, frozenset(overrides))

    def action(self, row: str, column: str) -> str:
        return self.cells[(row, column)]

    def render(self) -> str:
        """The table as text, overridden cells marked with '*'."""
        width = max(len(c) for c in COLUMNS) + 2
        lines = ["source \\ dest".ljust(16) + "".join(c.ljust(width) for c in COLUMNS)]
        for row in ROWS:
            cells = []
            for column in COLUMNS:
                mark = "*" if (row, column) in self.overridden else ""
                cells.append((self.cells[(row, column)] + mark).ljust(width))
            lines.append(row.ljust(16) + "".join(cells))
        return "\n".join(lines)
