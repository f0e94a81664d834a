"""Full table builds off the event loop (issue 10: "table rebuilds must not stall the packet loop").

Most fleet changes derive the new table from a recent one in milliseconds (overlay/selection.py,
`cheap_table`), on the loop. The rest — several TMs down at once that shared rows, a worker catching up
on many changes — need a full build: about a second for a thousand TMs, most of it numpy and shake_256
(which release the GIL for their large buffers; with 2^22 rows the list conversion holds it ~0.1 s a
table). `TableBuilder` is the core's `prepare_tables`: it builds those tables in a thread and hands them
back on the loop (`Distributor.tables_prepared`); meanwhile the packets keep the table they have, and the
loop keeps moving them. One build at a time: changes that come meanwhile wait for it, and the rebuild it
ends is for the fleet state of then. A reload is not among them: its dry run and apply build on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import structlog

from overlay.selection import SelectionTable, TableKey, table_for, table_key

log = structlog.get_logger("overlay.tables")

Done = Callable[[dict[TableKey, SelectionTable] | None], None]


def build_all(wanted: list[dict[str, int]], seed: bytes, rows_log2: int) -> dict[TableKey, SelectionTable]:
    return {table_key(weights, seed, rows_log2): table_for(weights, seed, rows_log2) for weights in wanted}


class TableBuilder:
    """The core's `prepare_tables`: each build in a thread of its own (a daemon: an agent that exits does not
    wait for a build nobody needs), its result handed back on the loop. The core asks for one build at a
    time (`Distributor.building`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.builds = 0
        self._closed = False

    def __call__(self, wanted: list[dict[str, int]], seed: bytes, rows_log2: int, done: Done) -> None:
        if self._closed:
            return
        self.builds += 1
        threading.Thread(target=self._build, args=(wanted, seed, rows_log2, done), name="overlay-tables",
                         daemon=True).start()

    def _build(self, wanted: list[dict[str, int]], seed: bytes, rows_log2: int, done: Done) -> None:
        try:
            tables: dict[TableKey, SelectionTable] | None = build_all(wanted, seed, rows_log2)
        except Exception as error:   # a bug, not the input: build on the loop instead, and say so
            log.error("tables.build_failed", error=repr(error), building="on the loop instead")
            tables = None
        try:
            self.loop.call_soon_threadsafe(self._deliver, tables, done)
        except RuntimeError:
            pass   # the loop is closed: the agent is gone

    def _deliver(self, tables: dict[TableKey, SelectionTable] | None, done: Done) -> None:
        if not self._closed:
            done(tables)

    def close(self) -> None:
        self._closed = True
