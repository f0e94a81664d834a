"""Full table builds off the event loop (issue 10: "table rebuilds must not stall the packet loop").

Most fleet changes derive the new table from a recent one in milliseconds (overlay/selection.py,
`cheap_table`), on the loop. The rest — several TMs down at once that shared rows, a worker catching up
on many changes, a fleet store view that moved a lot — need a full build: about a second for a thousand
TMs, most of it numpy and shake_256 (which release the GIL for their large buffers). `TableBuilder` is the
core's `prepare_tables`: it builds those tables in a thread of its own and hands them back on the loop
(`Distributor.tables_prepared`); meanwhile the packets keep the table they have, and the loop keeps
moving them. One thread: builds run in the order asked, and a rebuild asks again if the fleet moved on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

import structlog

from overlay.selection import SelectionTable, TableKey, table_for, table_key

log = structlog.get_logger("overlay.tables")

Done = Callable[[dict[TableKey, SelectionTable] | None], None]


def build_all(wanted: list[dict[str, int]], seed: bytes, rows_log2: int) -> dict[TableKey, SelectionTable]:
    return {table_key(weights, seed, rows_log2): table_for(weights, seed, rows_log2) for weights in wanted}


class TableBuilder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="overlay-tables")
        self.builds = 0
        self._closed = False

    def __call__(self, wanted: list[dict[str, int]], seed: bytes, rows_log2: int, done: Done) -> None:
        if self._closed:
            return
        self.builds += 1
        future = self.loop.run_in_executor(self._executor, build_all, wanted, seed, rows_log2)
        future.add_done_callback(lambda finished: self._finished(finished, done))

    def _finished(self, future: asyncio.Future[dict[TableKey, SelectionTable]], done: Done) -> None:
        if self._closed or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("tables.build_failed", error=repr(error), building="on the loop instead")
            done(None)
            return
        done(future.result())

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
