"""Source-NAT port allocation: one allocator per (xlate address, protocol), confined to the TM's block.

Several TMs may share one xlate address, each owning a disjoint port block (the distributor delivers
replies to the owner of the block), so an allocator only ever hands out ports of its block. A port in use
is never handed out again until it is released; freed ports go to the back of the queue, so a port is
reused as late as possible (the remote side may still hold TIME_WAIT state for it). Allocate and release
are O(1). For ICMP echo the "port" is the echo identifier.
"""

from __future__ import annotations

from collections import deque


class PortAllocator:
    """Never-used ports of the block come first, in ascending order (a cursor: nothing is built up front,
    which matters because every TM starts with idle allocators); released ports follow, oldest release
    first. That is one FIFO queue of the whole block, kept in O(1) space until ports come back."""

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self._cursor = low                      # the block's ports from here up were never handed out
        self._released: deque[int] = deque()    # handed out and given back, in the order they came back
        # Ports ahead of the cursor that already went through `_released` (reserved after a reconfiguration,
        # then given back): the cursor skips them, so they are reused as late as every other released port.
        self._behind: set[int] = set()
        self._used: set[int] = set()
        self.exhausted = 0                      # allocations refused because the block was full

    @property
    def capacity(self) -> int:
        return self.high - self.low + 1

    @property
    def in_use(self) -> int:
        return len(self._used)

    def allocate(self) -> int | None:
        """A port nobody uses, or None when the block is exhausted."""
        used = self._used
        while self._cursor <= self.high:
            port = self._cursor
            self._cursor += 1
            if port not in used and port not in self._behind:   # reserved after a reconfiguration: skipped
                used.add(port)
                return port
        if not self._released:
            self.exhausted += 1
            return None
        port = self._released.popleft()
        used.add(port)
        return port

    def reserve(self, port: int) -> None:
        """Mark a port of a live connection as used (after a reconfiguration); it may lie outside the
        block if the block shrank — it is then never handed out again once released."""
        if port in self._used:
            return
        self._used.add(port)
        if self.low <= port <= self.high:
            try:
                self._released.remove(port)     # O(n), but only during reconfiguration
            except ValueError:
                pass

    def release(self, port: int) -> None:
        if port not in self._used:
            return
        self._used.discard(port)
        if self.low <= port <= self.high:
            if port >= self._cursor:
                self._behind.add(port)
            self._released.append(port)

    def is_used(self, port: int) -> bool:
        return port in self._used
