"""A TUN device as a non-blocking file descriptor, read by draining on readiness.

Opened with TUNSETIFF through fcntl/ioctl, so no extra dependency is needed. `IFF_NO_PI` means every read
returns exactly one IP packet (IPv4 or IPv6, told apart by its version nibble) and every write takes one.
The device is not persistent: it disappears, with its addresses and routes, when the last descriptor is
closed — a crashed agent therefore never leaves a TUN behind, only policy rules (netsetup cleans those).

With offloads (`offload=True`, issue 10, runtime/offload.py) the TUN is opened with `IFF_VNET_HDR` and
CSUM|TSO4|TSO6: a read may be a TCP super-packet (up to 64 KB of one flow), handed on as the list of the
segments a plain TUN would have read (`on_train`, or packet by packet), and what is written is queued and
leaves at the end of the event-loop iteration, runs of one TCP flow as one super-packet each.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

from overlay.runtime import offload as vnet
from overlay.runtime.batchio import BATCH, COMPILED, read_batch, write_batch

TUN_PATH = "/dev/net/tun"

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100

IFNAMSIZ = 16
# Larger than any MTU we configure; a TUN read never returns more than the device MTU (+ nothing, NO_PI).
# Bounds one readiness callback so a flood on one fd cannot starve the other readers and the timers.
DRAIN_BUDGET = 256


def wants_offload(setting: str, role: str) -> bool:
    """`[tun] offload`: "auto" turns TSO offloads on where TUN traffic is bulk (a distributor's or an
    edge's, not a TM's management traffic) and the compiled `_fastio` cuts and joins super-packets (the
    pure-Python reference costs more than it saves)."""
    if setting == "auto":
        return role in ("distributor", "edge") and COMPILED
    return setting == "on"


class TunError(RuntimeError):
    """Opening the TUN failed for a reason an operator can fix; the message says how."""


def open_tun_fd(name: str, *, multi_queue: bool = False, offload: bool = False) -> tuple[int, str]:
    """Open (or attach a queue to) TUN `name`; returns the non-blocking fd and the name the kernel chose.
    `offload`: with a vnet header and TSO/checksum offloads (the flags are the device's: every queue of a
    multi-queue TUN must ask for the same)."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"TUN name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(
            f"{TUN_PATH} does not exist: load the tun module (modprobe tun) or, in a container, "
            f"pass the device (docker: --device /dev/net/tun, compose: devices: [/dev/net/tun])"
        ) from None
    except PermissionError:
        raise TunError(
            f"no permission to open {TUN_PATH}: run as root or grant CAP_NET_ADMIN "
            f"(docker: --cap-add NET_ADMIN, compose: cap_add: [NET_ADMIN])"
        ) from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0) | (vnet.IFF_VNET_HDR if offload else 0)
    ifreq = struct.pack("16sH22x", name.encode(), flags)
    try:
        result = fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as error:
        os.close(fd)
        if error.errno == errno.EPERM:
            raise TunError(
                f"creating TUN {name!r} needs CAP_NET_ADMIN: run as root or grant it "
                f"(docker: --cap-add NET_ADMIN, compose: cap_add: [NET_ADMIN])"
            ) from None
        if error.errno == errno.EBUSY:
            raise TunError(
                f"TUN {name!r} is in use by another process (or exists with other flags): "
                f"stop the other agent or choose another [tun] name"
            ) from None
        if error.errno == errno.EINVAL:
            raise TunError(
                f"an interface named {name!r} exists and is not a TUN of this kind "
                f"(multi-queue={multi_queue}): delete it or choose another [tun] name"
            ) from None
        raise TunError(f"TUNSETIFF {name!r} failed: {error.strerror}") from None
    chosen = result[:IFNAMSIZ].rstrip(b"\0").decode()
    if offload:
        try:
            fcntl.ioctl(fd, vnet.TUNSETVNETHDRSZ, struct.pack("i", vnet.VNET_HEADER_LEN))
            fcntl.ioctl(fd, vnet.TUNSETOFFLOAD, vnet.OFFLOADS)
        except OSError as error:
            os.close(fd)
            raise TunError(f"TUN {name!r}: the kernel refused TSO offloads ({error.strerror}): "
                           f"set [tun] offload = \"off\"") from None
    return fd, chosen


class TunDevice:
    """One queue of a TUN device, read with `loop.add_reader` into a preallocated buffer.

    `on_packet(packet)` gets each packet as `bytes` (a copy: the buffer is reused by the next read); with
    offloads, `on_train(segments)` gets the segments of one super-packet together (one decision can serve
    them all), or, without `on_train`, `on_packet` gets them one by one.
    Write failures are counted, never raised: a full or down device must not stop the agent.
    """

    def __init__(self, name: str, *, multi_queue: bool = False, offload: bool = False):
        self.fd, self.name = open_tun_fd(name, multi_queue=multi_queue, offload=offload)
        self.offload = offload
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packet: Callable[[bytes], None] | None = None
        self._on_train: Callable[[list[bytes]], None] | None = None
        self._on_batch: Callable[[list[bytes]], None] | None = None
        self._on_lost: Callable[[OSError], None] | None = None
        self._queue: list[bytes] = []
        self._flush_scheduled = False
        self.lost = False
        self.counters: dict[str, int] = {
            "tun_rx_packets": 0,
            "tun_rx_bytes": 0,
            "tun_tx_packets": 0,
            "tun_tx_bytes": 0,
            "tun_tx_errors": 0,
            "tun_rx_errors": 0,
        }
        if offload:
            self.counters.update(tun_rx_super_packets=0, tun_tx_writes=0)

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_packet: Callable[[bytes], None],
        on_lost: Callable[[OSError], None] | None = None,
        on_train: Callable[[list[bytes]], None] | None = None,
        on_batch: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        """Read into `on_packet` (and `on_train`); with `on_batch`, the packets of one read batch (but a
        super-packet's segments) come together instead, in order. `on_lost(error)` once if the device goes
        away (e.g. `ip link del`)."""
        self._loop = loop
        self._on_packet = on_packet
        self._on_train = on_train
        self._on_batch = on_batch
        self._on_lost = on_lost
        loop.add_reader(self.fd, self._drain)

    def stop_reading(self) -> None:
        if self._loop is not None and self.fd >= 0:
            self._loop.remove_reader(self.fd)

    def drain(self) -> int:
        """Read until EAGAIN (or the budget); returns how many packets were handed over."""
        return self._drain()

    def _drain(self) -> int:
        if self.lost:
            return 0
        fd, on_packet, counters, offload = self.fd, self._on_packet, self.counters, self.offload
        handled = 0
        while handled < DRAIN_BUDGET:
            try:
                if offload:
                    packets, dropped = read_batch(fd, BATCH, True)
                else:
                    packets = read_batch(fd, BATCH)   # up to a batch in one call into C (batchio)
            except OSError as error:
                # EBADFD when the device was deleted under us: the descriptor stays "readable" with an
                # error for ever, so keep reading it and the loop spins. Stop and tell the owner.
                counters["tun_rx_errors"] += 1
                self.lost = True
                self.stop_reading()
                if self._on_lost is not None:
                    self._on_lost(error)
                break
            reads = len(packets)
            if offload:
                if dropped:
                    reads += self._count_dropped(dropped)
                if not reads:
                    break
                handled += reads
                self._deliver_offloaded(packets)
            else:
                if not packets:
                    break
                handled += reads
                counters["tun_rx_packets"] += reads
                counters["tun_rx_bytes"] += sum([len(packet) for packet in packets])
                if self._on_batch is not None:
                    self._on_batch(packets)
                elif on_packet is not None:
                    for packet in packets:
                        on_packet(packet)
            if reads < BATCH:
                break
        return handled

    def _count_dropped(self, dropped: dict[str, int]) -> int:
        for reason, count in dropped.items():
            key = f"tun_rx_offload_{reason.replace('-', '_')}"
            self.counters[key] = self.counters.get(key, 0) + count
        return sum(dropped.values())

    def _deliver_offloaded(self, items: list[Any]) -> None:
        """A read batch with offloads: a packet (bytes) or a super-packet's segments (a list) each."""
        counters, on_packet, on_train, on_batch = self.counters, self._on_packet, self._on_train, self._on_batch
        plain: list[bytes] = []     # with on_batch: the packets since the last super-packet, in order
        for item in items:
            if item.__class__ is list:
                segments: list[bytes] = item
                counters["tun_rx_super_packets"] += 1
                counters["tun_rx_packets"] += len(segments)
                counters["tun_rx_bytes"] += sum([len(segment) for segment in segments])
                if plain:
                    on_batch(plain)  # type: ignore[misc]
                    plain = []
                if on_train is not None:
                    on_train(segments)
                elif on_packet is not None:
                    for segment in segments:
                        on_packet(segment)
            else:
                counters["tun_rx_packets"] += 1
                counters["tun_rx_bytes"] += len(item)
                if on_batch is not None:
                    plain.append(item)
                elif on_packet is not None:
                    on_packet(item)
        if plain:
            on_batch(plain)  # type: ignore[misc]

    def write(self, packet: bytes) -> bool:
        if self.offload and self._loop is not None:
            # Queued: what one loop iteration writes leaves together, runs of a TCP flow coalesced.
            self._queue.append(packet)
            if not self._flush_scheduled:
                try:
                    self._loop.call_soon(self.flush)
                    self._flush_scheduled = True
                except RuntimeError:   # the loop is closed (shutting down): write now
                    self.flush()
            return True
        if self.offload:
            packet = vnet.EMPTY_HEADER + packet
        try:
            os.write(self.fd, packet)
        except OSError:
            # EAGAIN (queue full), EINVAL (not an IP packet), EIO (device down): the packet is lost, counted.
            self.counters["tun_tx_errors"] += 1
            return False
        self.counters["tun_tx_packets"] += 1
        self.counters["tun_tx_bytes"] += len(packet) - (vnet.VNET_HEADER_LEN if self.offload else 0)
        return True

    def write_all(self, packets: list[bytes]) -> None:
        """`write` for each of `packets` (a run of one flow, in order): queued at once with offloads."""
        if self.offload and self._loop is not None and packets:
            self.write(packets[0])        # queues it and schedules the flush
            self._queue.extend(packets[1:])
            return
        for packet in packets:
            self.write(packet)

    def flush(self) -> None:
        """Write what is queued (offloads): one super-packet per run of one TCP flow, the rest one by one."""
        self._flush_scheduled = False
        queue = self._queue
        if not queue or self.fd < 0:
            queue.clear()
            return
        written, failed, writes, written_bytes = write_batch(self.fd, queue, True)
        queue.clear()
        counters = self.counters
        counters["tun_tx_packets"] += written
        counters["tun_tx_bytes"] += written_bytes
        counters["tun_tx_errors"] += failed
        counters["tun_tx_writes"] += writes

    def close(self) -> None:
        if self.fd >= 0:
            self.stop_reading()
            self.flush()
            os.close(self.fd)
            self.fd = -1
