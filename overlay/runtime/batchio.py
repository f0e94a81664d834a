"""Batched I/O for the agents' hot path, compiled or pure Python, one API (issue 10).

Per packet, a Python-level `recvfrom_into` costs ~2.7 µs and a `sendto` ~4–5 µs (PERFORMANCE-NOTES.md):
more than the distributor's decision. `recvmmsg`/`sendmmsg` move up to a batch per system call, and a
TUN queue is drained in one call into C. They are not in the standard library, so they live in a small
optional C extension (`overlay/_fastio.c`, built by `pip install` where a compiler and Python's headers
exist). Without it — or with `OVERLAY_PURE_PYTHON=1` — the same functions run in Python here, with
exactly the same results (tests/runtime/test_batchio.py runs both against the same sockets).

    recv_batch(sock, max) -> [(payload, (host, port))] [] when nothing waits; OSError on a socket error;
                                                        a UDP GRO train comes back as its datagrams —
                                                        with recv_batch(sock, max, True) as one item,
                                                        ([payload, ...], peer)
    send_batch(sock, items, start) -> (sent, errno)     items[start:] as (payload, (host, port)); stops at
                                                        the first datagram refused, with its errno
    read_batch(fd, max) -> [packet]                     a non-blocking TUN queue until EAGAIN or max
    read_batch(fd, max, True) -> (items, dropped)       a TUN with a vnet header (runtime/offload.py): an
                                                        item is a packet or a super-packet's segments
                                                        (a list); dropped counts unusable reads by reason
    write_batch(fd, packets, vnet) -> (written, failed, writes, bytes)   each packet into a TUN; with a
                                                        vnet header, runs of one TCP flow as super-packets
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from overlay.runtime import offload

Peer = tuple[str, int]
BATCH = 64
SOL_UDP, UDP_GRO = 17, 104
_GRO_CONTROL = socket.CMSG_SPACE(4)


def py_recv_batch(sock: socket.socket, max_count: int = BATCH, group: bool = False) -> list[tuple[Any, Peer]]:
    result: list[tuple[Any, Peer]] = []
    for _ in range(max_count):
        try:
            payload, controls, _, peer = sock.recvmsg(65536, _GRO_CONTROL)
        except BlockingIOError:
            break
        except OSError:
            if result:
                break       # the error shows on the next call, after these are handled
            raise
        source = (peer[0], peer[1])
        segment = 0
        for level, kind, data in controls:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                segment = struct.unpack("=i", data[:4])[0]
        if 0 < segment < len(payload) and group:
            result.append(([payload[start:start + segment] for start in range(0, len(payload), segment)], source))
        elif 0 < segment < len(payload):
            result += [(payload[start:start + segment], source) for start in range(0, len(payload), segment)]
        else:
            result.append((payload, source))
    return result


def py_send_batch(sock: socket.socket, items: list[tuple[bytes, Peer]], start: int = 0) -> tuple[int, int]:
    sent = 0
    for payload, peer in items[start:]:
        try:
            sock.sendto(payload, peer)
        except OSError as error:
            return sent, error.errno or errno.EIO
        sent += 1
    return sent, 0


def py_read_batch(fd: int, max_count: int = BATCH, vnet: bool = False) -> Any:
    result: list[Any] = []
    dropped: dict[str, int] = {}
    for _ in range(max_count):
        try:
            read = os.read(fd, 65536 + 16)    # a 64 KiB packet behind a vnet header fits (_fastio's SLOT)
        except BlockingIOError:
            break
        except OSError:
            if result:
                break
            raise
        if not vnet:
            result.append(read)
            continue
        packets = offload.split(read[:offload.VNET_HEADER_LEN], read[offload.VNET_HEADER_LEN:])
        if isinstance(packets, str):
            dropped[packets] = dropped.get(packets, 0) + 1
        elif len(packets) == 1:
            result.append(packets[0])
        else:
            result.append(packets)
    return (result, dropped) if vnet else result


def py_write_batch(fd: int, packets: list[bytes], vnet: bool = False) -> tuple[int, int, int, int]:
    writes = offload.coalesce_counted(packets) if vnet else [(packet, 1) for packet in packets]
    written = failed = written_bytes = 0
    for data, count in writes:
        try:
            os.write(fd, data)
        except OSError:
            failed += count
        else:
            written_bytes += sum(len(packet) for packet in packets[written + failed:written + failed + count])
            written += count
    return written, failed, len(writes), written_bytes


recv_batch: Callable[..., list[tuple[bytes, Peer]]] = py_recv_batch
send_batch: Callable[..., tuple[int, int]] = py_send_batch
read_batch: Callable[..., Any] = py_read_batch
write_batch: Callable[..., tuple[int, int, int, int]] = py_write_batch
COMPILED = False

if os.environ.get("OVERLAY_PURE_PYTHON") != "1":
    try:
        from overlay import _fastio  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        recv_batch, send_batch, read_batch = _fastio.recv_batch, _fastio.send_batch, _fastio.read_batch
        write_batch = _fastio.write_batch
        COMPILED = True
