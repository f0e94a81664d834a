"""The source-NAT port allocator: confined to its block, never a port in use, exhaustion reported."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from overlay.tm.ports import PortAllocator


def test_hands_out_every_port_of_the_block_once_then_reports_exhaustion() -> None:
    allocator = PortAllocator(5000, 5003)
    assert sorted(allocator.allocate() for _ in range(4)) == [5000, 5001, 5002, 5003]  # type: ignore[type-var]
    assert allocator.allocate() is None
    assert (allocator.in_use, allocator.capacity, allocator.exhausted) == (4, 4, 1)


def test_released_ports_are_reused_last() -> None:
    allocator = PortAllocator(5000, 5002)
    first = allocator.allocate()
    allocator.release(first)  # type: ignore[arg-type]
    assert [allocator.allocate() for _ in range(3)] == [5001, 5002, 5000]


def test_reserved_ports_are_skipped_and_ports_outside_a_shrunk_block_never_return() -> None:
    allocator = PortAllocator(5000, 5001)
    allocator.reserve(5000)
    allocator.reserve(6000)         # a live connection's port from an older, larger block
    assert allocator.allocate() == 5001
    assert allocator.allocate() is None
    allocator.release(6000)
    assert allocator.allocate() is None
    allocator.release(5000)
    assert allocator.allocate() == 5000


def test_releasing_a_free_port_changes_nothing() -> None:
    allocator = PortAllocator(5000, 5001)
    allocator.release(5000)
    assert [allocator.allocate(), allocator.allocate(), allocator.allocate()] == [5000, 5001, None]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=200))
def test_never_hands_out_a_port_in_use(operations: list[tuple[bool, int]]) -> None:
    allocator = PortAllocator(1000, 1015)
    live: list[int] = []
    for allocate, pick in operations:
        if allocate or not live:
            port = allocator.allocate()
            if port is None:
                assert len(live) == 16
                continue
            assert port not in live and 1000 <= port <= 1015
            live.append(port)
        else:
            allocator.release(live.pop(pick % len(live)))
        assert allocator.in_use == len(live)


class _QueueModel:
    """The allocator as a plain FIFO of the whole block: an independent model of the hand-out order."""

    def __init__(self, low: int, high: int) -> None:
        from collections import deque
        self.low, self.high = low, high
        self.free = deque(range(low, high + 1))
        self.used: set[int] = set()

    def allocate(self) -> int | None:
        if not self.free:
            return None
        port = self.free.popleft()
        self.used.add(port)
        return port

    def release(self, port: int) -> None:
        if port in self.used:
            self.used.discard(port)
            if self.low <= port <= self.high:
                self.free.append(port)

    def reserve(self, port: int) -> None:
        if port not in self.used:
            self.used.add(port)
            if port in self.free:
                self.free.remove(port)


@settings(max_examples=1000)
@given(st.lists(st.tuples(st.sampled_from(["allocate", "release", "reserve"]), st.integers(1000, 1012)), max_size=120))
@example([("reserve", 1005), ("release", 1005)] + [("allocate", 0)] * 11)   # a reserved port goes to the back
def test_hand_out_order_is_the_fifo_of_the_whole_block(operations: list[tuple[str, int]]) -> None:
    allocator, model = PortAllocator(1000, 1009), _QueueModel(1000, 1009)
    for operation, port in operations:
        if operation == "allocate":
            assert allocator.allocate() == model.allocate()
        else:
            getattr(allocator, operation)(port)
            getattr(model, operation)(port)
        assert allocator.in_use == len(model.used)
