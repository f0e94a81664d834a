"""Replay windows for sealed datagrams (overlay/auth.py): per sender key and lane, the counters accepted
so far — the highest, and which of the WINDOW below it. A counter seen before is `auth:replayed`, one
WINDOW or more below the highest `auth:too-old`; the caller checks only after the tag verified, so
forgeries never move a window.

Two kinds, one behaviour (tests/test_antireplay.py holds them to each other):

- `LocalWindows`: one packet loop's, in its own memory — a node with one loop.
- `SharedWindows`: one set for every packet loop of a node (`[node] workers` with `[auth]`). Whichever
  loop a datagram reaches — and a replay can be sent to any of a node's sockets, a UDP GRO train lands
  whole on one, a restarted loop rejoins with an empty memory — it meets the one window that saw the
  original. The windows live in a memfd the agent creates and hands to each worker (its descriptor over
  the control pipe), so they outlive any worker and leave nothing on a file system.

The shared layout (native byte order; every field 8-byte aligned):

    0   magic "OVLWIN01"     8  implementation (1: C atomics, 2: POSIX record lock)
    12  capacity (windows)   16 WINDOW              20  windows in use
    64  keys: capacity x u64, 0 = free; a sender key id and lane as (key_id << 7 | lane) + 1
        windows: capacity x (WINDOW + 1) x u64: [highest + 1, slot 0 .. slot WINDOW-1]

A slot holds the highest counter accepted in it, plus one (0: none yet), slot `counter % WINDOW`. A counter
is accepted by a compare-and-swap of its slot from a smaller value to its own, and a slot only ever grows:
so no counter is accepted twice, however the loops interleave — the second swap of the same counter finds
it there (replayed), and a counter whose slot a newer one took is more than WINDOW below that one (too old).
Within the window each slot stands for one counter, which makes this the same as one loop's ring
(`_Ring`). Keys are claimed by compare-and-swap of a free entry and never freed (a key removed by a reload
keeps its window: coming back, it cannot reopen a replay). The C implementation is lock-free
(`_fastio.window_accept`); the pure-Python fallback does the same under an exclusive `lockf` of the memfd,
and the header says which one a region is for, so the two never mix.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Container
from multiprocessing import reduction
from multiprocessing.connection import Connection

WINDOW = 4096   # a power of two: slots are counter & (WINDOW - 1)
_SLOT = WINDOW - 1
LAST_COUNTER = 2**64 - 1    # never sealed (a counter of 64 bits would end there); refused as too old by both

REPLAYED = "auth:replayed"                 # a counter already seen from that key and lane
TOO_OLD = "auth:too-old"                   # a counter below the replay window
NO_WINDOW = "auth:no-window"               # shared windows full: a new sender key or lane is refused

MAGIC = b"OVLWIN01"
MAX_CAPACITY = 1 << 20
IMPL_ATOMIC, IMPL_LOCKED = 1, 2
_HEADER = struct.Struct("=8sIIII")          # magic, implementation, capacity, window, in use
_KEYS = 64
_STRIDE = (WINDOW + 1) * 8
_U64 = struct.Struct("=Q")
_HASH = 0x9E3779B97F4A7C15                  # Fibonacci hashing: the probe start, the same in C


def window_key(sender: int, lane: int) -> int:
    return (sender << 7 | lane) + 1


def probe_start(key: int, capacity: int) -> int:
    return ((key * _HASH) & 0xFFFFFFFFFFFFFFFF) >> 32 & (capacity - 1)


class _Ring:
    """One loop's window of one sender: the highest counter, and a ring of WINDOW slots below it (slot
    `counter % WINDOW`). A ring of bytes costs O(1) per datagram in order — shifting a 4,096-bit integer
    cost ~0.4 µs a datagram (tests/bench_auth.py) — and a jump clears only the slots it passes."""

    __slots__ = ("highest", "seen")

    def __init__(self) -> None:
        self.highest = -1
        self.seen = bytearray(WINDOW)

    def check_and_set(self, counter: int) -> str | None:
        highest, seen = self.highest, self.seen
        if counter > highest:
            if counter == LAST_COUNTER:
                return TOO_OLD
            if counter - highest >= WINDOW:
                seen[:] = bytes(WINDOW)
            else:
                for stale in range(highest + 1, counter):   # slots of counters now below the window
                    seen[stale & _SLOT] = 0
            seen[counter & _SLOT] = 1
            self.highest = counter
            return None
        if highest - counter >= WINDOW:
            return TOO_OLD
        slot = counter & _SLOT
        if seen[slot]:
            return REPLAYED
        seen[slot] = 1
        return None


class LocalWindows:
    """A packet loop's own windows, per (sender key id, lane)."""

    shared = False

    def __init__(self) -> None:
        self._rings: dict[tuple[int, int], _Ring] = {}

    def ring(self, sender: int, lane: int) -> _Ring:
        """The window of one sender key and lane (`Authenticator.open` keeps it at hand)."""
        ring = self._rings.get((sender, lane))
        if ring is None:
            ring = self._rings[(sender, lane)] = _Ring()
        return ring

    def check(self, sender: int, lane: int, counter: int) -> str | None:
        """None when `counter` is new from that sender and lane (and now seen), else the reason."""
        return self.ring(sender, lane).check_and_set(counter)

    def kept(self, senders: Container[int]) -> LocalWindows:
        """For a reload: the windows of senders whose keys stay (the others' memory goes with their key)."""
        new = LocalWindows()
        new._rings = {key: ring for key, ring in self._rings.items() if key[0] in senders}
        return new


def _accelerated() -> Callable[[mmap.mmap, int, int], int] | None:
    if os.environ.get("OVERLAY_PURE_PYTHON") == "1":
        return None
    try:
        from overlay import _fastio  # type: ignore[attr-defined]
    except ImportError:
        return None
    accept: Callable[[mmap.mmap, int, int], int] | None = getattr(_fastio, "window_accept", None)
    return accept


class SharedWindows:
    """The windows of all of a node's packet loops, in a memfd (`create` in the agent, `attach` in a worker
    to the descriptor it was handed)."""

    shared = True

    def __init__(self, fd: int, region: mmap.mmap, capacity: int) -> None:
        self._fd = fd
        self._region = region
        self.capacity = capacity
        accept = _accelerated()
        implementation = _HEADER.unpack_from(region, 0)[1]
        if implementation == IMPL_ATOMIC and accept is None:
            raise ValueError("these replay windows are for the compiled extension, which this process lacks")
        if implementation == IMPL_LOCKED and accept is not None:
            accept = None     # a region made by a pure-Python agent: take its lock, as it does
        self._accept = accept
        self._reasons = (None, REPLAYED, TOO_OLD, NO_WINDOW)

    @classmethod
    def create(cls, capacity: int = 1024) -> SharedWindows:
        """A new region for `capacity` windows (a power of two; at most three quarters are used)."""
        if not 4 <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two from 4 to {MAX_CAPACITY}")
        fd = os.memfd_create("overlay-replay-windows", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _size(capacity))   # sparse: a window's pages exist once a sender uses it
            region = mmap.mmap(fd, _size(capacity))
        except BaseException:
            os.close(fd)
            raise
        implementation = IMPL_ATOMIC if _accelerated() is not None else IMPL_LOCKED
        _HEADER.pack_into(region, 0, MAGIC, implementation, capacity, WINDOW, 0)
        return cls(fd, region, capacity)

    @classmethod
    def attach(cls, fd: int) -> SharedWindows:
        """The region behind `fd` (a worker's copy of the agent's descriptor; the windows own it now, and
        close it when they refuse it)."""
        region = None
        try:
            os.set_inheritable(fd, False)   # SCM_RIGHTS copies are inheritable: no child needs this one
            size = os.fstat(fd).st_size
            if size < _KEYS:
                raise ValueError("not a replay-window region: too short")
            region = mmap.mmap(fd, size)
            magic, _, capacity, window, _ = _HEADER.unpack_from(region, 0)
            if magic != MAGIC or window != WINDOW or not 4 <= capacity <= MAX_CAPACITY or capacity & (capacity - 1) \
                    or size < _size(capacity):
                raise ValueError("not a replay-window region of this version")
            return cls(fd, region, capacity)
        except BaseException:
            if region is not None:
                region.close()
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def send_to(self, connection: Connection, pid: int) -> None:
        """Hand the region to the process `pid` at the other end of a multiprocessing pipe (SCM_RIGHTS)."""
        reduction.send_handle(connection, self._fd, pid)

    @classmethod
    def receive(cls, connection: Connection) -> SharedWindows:
        """The region `send_to` handed over (the next thing on the pipe)."""
        return cls.attach(reduction.recv_handle(connection))

    def in_use(self) -> int:
        return _HEADER.unpack_from(self._region, 0)[4]

    def ring(self, sender: int, lane: int) -> _SharedWindow:
        return _SharedWindow(self, window_key(sender, lane))

    def check(self, sender: int, lane: int, counter: int) -> str | None:
        return self.check_key(window_key(sender, lane), counter)

    def check_key(self, key: int, counter: int) -> str | None:
        if self._accept is not None:
            return self._reasons[self._accept(self._region, key, counter)]
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            return self._reasons[_accept_locked(self._region, self.capacity, key, counter)]
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def kept(self, senders: Container[int]) -> SharedWindows:
        return self   # shared windows are never dropped (above)

    def close(self) -> None:
        if self._fd >= 0:
            self._region.close()
            os.close(self._fd)
            self._fd = -1


class _SharedWindow:
    """One sender key and lane's window in a node's region: the same interface as one loop's `_Ring`."""

    __slots__ = ("_windows", "_key")

    def __init__(self, windows: SharedWindows, key: int) -> None:
        self._windows = windows
        self._key = key

    def check_and_set(self, counter: int) -> str | None:
        return self._windows.check_key(self._key, counter)


def _size(capacity: int) -> int:
    return _KEYS + capacity * 8 + capacity * _STRIDE


def _accept_locked(region: mmap.mmap, capacity: int, key: int, counter: int) -> int:
    """`_fastio.window_accept` in Python, for a caller holding the region's lock: 0 accepted, 1 replayed,
    2 too old, 3 no free window."""
    index = _find(region, capacity, key)
    if index < 0:
        return 3
    base = _KEYS + capacity * 8 + index * _STRIDE
    highest = _U64.unpack_from(region, base)[0]
    value = counter + 1
    if counter == LAST_COUNTER or (value <= highest and highest - value >= WINDOW):
        return 2
    slot = base + 8 + (counter & _SLOT) * 8
    seen = _U64.unpack_from(region, slot)[0]
    if seen == value:
        return 1
    if seen > value:
        return 2
    _U64.pack_into(region, slot, value)
    if value > highest:
        _U64.pack_into(region, base, value)
    return 0


def _find(region: mmap.mmap, capacity: int, key: int) -> int:
    start = probe_start(key, capacity)
    for probe in range(capacity):
        index = (start + probe) & (capacity - 1)
        found = _U64.unpack_from(region, _KEYS + index * 8)[0]
        if found == key:
            return index
        if found == 0:
            in_use = _HEADER.unpack_from(region, 0)[4]
            if in_use >= capacity // 4 * 3:
                return -1
            _U64.pack_into(region, _KEYS + index * 8, key)
            struct.pack_into("=I", region, 20, in_use + 1)
            return index
    return -1


__all__ = ["LocalWindows", "SharedWindows", "WINDOW", "REPLAYED", "TOO_OLD", "NO_WINDOW"]
