"""A TUN device as a non-blocking file descriptor, read by draining on readiness.

Opened with TUNSETIFF through fcntl/ioctl, so no extra dependency is needed. `IFF_NO_PI` means every read
returns exactly one IP packet (IPv4 or IPv6, told apart by its version nibble) and every write takes one.
The device is not persistent: it disappears, with its addresses and routes, when the last descriptor is
closed — a crashed agent therefore never leaves a TUN behind, only policy rules (netsetup cleans those).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
from collections.abc import Callable

from overlay.runtime.batchio import BATCH, read_batch

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


class TunError(RuntimeError):
    """Opening the TUN failed for a reason an operator can fix; the message says how."""


def open_tun_fd(name: str, *, multi_queue: bool = False) -> tuple[int, str]:
    """Open (or attach a queue to) TUN `name`; returns the non-blocking fd and the name the kernel chose."""
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
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
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
    return fd, chosen


class TunDevice:
    """One queue of a TUN device, read with `loop.add_reader` into a preallocated buffer.

    `on_packet(packet)` gets each packet as `bytes` (a copy: the buffer is reused by the next read).
    Write failures are counted, never raised: a full or down device must not stop the agent.
    """

    def __init__(self, name: str, *, multi_queue: bool = False):
        self.fd, self.name = open_tun_fd(name, multi_queue=multi_queue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packet: Callable[[bytes], None] | None = None
        self._on_lost: Callable[[OSError], None] | None = None
        self.lost = False
        self.counters: dict[str, int] = {
            "tun_rx_packets": 0,
            "tun_rx_bytes": 0,
            "tun_tx_packets": 0,
            "tun_tx_bytes": 0,
            "tun_tx_errors": 0,
            "tun_rx_errors": 0,
        }

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_packet: Callable[[bytes], None],
        on_lost: Callable[[OSError], None] | None = None,
    ) -> None:
        """Read into `on_packet`; `on_lost(error)` once if the device goes away (e.g. `ip link del`)."""
        self._loop = loop
        self._on_packet = on_packet
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
        fd, on_packet, counters = self.fd, self._on_packet, self.counters
        handled = 0
        while handled < DRAIN_BUDGET:
            try:
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
            if not packets:
                break
            handled += len(packets)
            counters["tun_rx_packets"] += len(packets)
            counters["tun_rx_bytes"] += sum([len(packet) for packet in packets])
            if on_packet is not None:
                for packet in packets:
                    on_packet(packet)
            if len(packets) < BATCH:
                break
        return handled

    def write(self, packet: bytes) -> bool:
        try:
            os.write(self.fd, packet)
        except OSError:
            # EAGAIN (queue full), EINVAL (not an IP packet), EIO (device down): the packet is lost, counted.
            self.counters["tun_tx_errors"] += 1
            return False
        self.counters["tun_tx_packets"] += 1
        self.counters["tun_tx_bytes"] += len(packet)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            self.stop_reading()
            os.close(self.fd)
            self.fd = -1
