"""Batched I/O for the agents' hot path, compiled or pure Python, one API (issue 10).

Per packet, a Python-level `recvfrom_into` costs ~2.7 µs and a `sendto` ~4–5 µs (PERFORMANCE-NOTES.md):
more than the distributor's decision. `recvmmsg`/`sendmmsg` move up to a batch per system call, and a
TUN queue is drained in one call into C. They are not in the standard library, so they live in a small
optional C extension (`overlay/_fastio.c`, built by `pip install` where a compiler and Python's headers
exist). Without it — or with `OVERLAY_PURE_PYTHON=1` — the same functions run in Python here, with
exactly the same results (tests/runtime/test_batchio.py runs both against the same sockets).

    recv_batch(sock, max) -> [(payload, (host, port))] [] when nothing waits; OSError on a socket error
    send_batch(sock, items, start) -> (sent, errno)     items[start:] as (payload, (host, port)); stops at
                                                        the first datagram refused, with its errno
    read_batch(fd, max) -> [packet]                     a non-blocking TUN queue until EAGAIN or max
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

Peer = tuple[str, int]
BATCH = 64

def py_recv_batch(sock: socket.socket, max_count: int = BATCH) -> list[tuple[bytes, Peer]]:
    result: list[tuple[bytes, Peer]] = []
    for _ in range(max_count):
        try:
            payload, peer = sock.recvfrom(65536)
        except BlockingIOError:
            break
        except OSError:
            if result:
                break       # the error shows on the next call, after these are handled
            raise
        result.append((payload, (peer[0], peer[1])))
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


def py_read_batch(fd: int, max_count: int = BATCH) -> list[bytes]:
    result: list[bytes] = []
    for _ in range(max_count):
        try:
            result.append(os.read(fd, 65536))
        except BlockingIOError:
            break
        except OSError:
            if result:
                break
            raise
    return result


recv_batch: Callable[..., list[tuple[bytes, Peer]]] = py_recv_batch
send_batch: Callable[..., tuple[int, int]] = py_send_batch
read_batch: Callable[..., list[bytes]] = py_read_batch
COMPILED = False

if os.environ.get("OVERLAY_PURE_PYTHON") != "1":
    try:
        from overlay import _fastio  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        recv_batch, send_batch, read_batch = _fastio.recv_batch, _fastio.send_batch, _fastio.read_batch
        COMPILED = True
