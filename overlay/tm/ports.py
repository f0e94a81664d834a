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
    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self._free: deque[int] | None = None    # built on first use: most (address, protocol) pairs stay idle
        self._used: set[int] = set()
        self.exhausted = 0                      # allocations refused because the block was full

    @property
    def capacity(self) -> int:
        return self.high - self.low + 1

    @property
    def in_use(self) -> int:
        return len(self._used)

    def _queue(self) -> deque[int]:
        if self._free is None:
            self._free = deque(port for port in range(self.low, self.high + 1) if port not in self._used)
        return self._free

    def allocate(self) -> int | None:
        """A port nobody uses, or None when the block is exhausted."""
        free = self._queue()
        if not free:
            self.exhausted += 1
            return None
        port = free.popleft()
        self._used.add(port)
        return port

    def reserve(self, port: int) -> None:
        """Mark a port of a live connection as used (after a reconfiguration); it may lie outside the
        block if the block shrank — it is then never handed out again once released."""
        if port in self._used:
            return
        self._used.add(port)
        if self._free is not None and self.low <= port <= self.high:
            self._free.remove(port)   # O(n), but only during reconfiguration

    def release(self, port: int) -> None:
        if port not in self._used:
            return
        self._used.discard(port)
        if self.low <= port <= self.high:
            self._queue().append(port)

    def is_used(self, port: int) -> bool:
        return port in self._used
