"""The underlay endpoint: GRE-in-UDP sockets read by draining on readiness.

One socket is bound to the node's underlay address and port (4754, RFC 8086) and is where peers send to.
`source_ports` more sockets send: RFC 8086 asks the outer UDP source port to carry flow entropy, so each
inner flow leaves from the socket its flow hash picks. That spreads the overlay over ECMP paths and, on
the receiving side, over `SO_REUSEPORT` processes — one fixed source port would be one flow and one core.
Peers may answer to the port a datagram came from (TM keepalive echoes, NATs in between), so every socket
is read, and everything read goes to the same callback.

ENVIRONMENT.md measured `add_reader` + `recvfrom_into` a preallocated buffer ~15 % faster than uvloop's
DatagramProtocol, and asyncio's default transport allocates 256 KiB per datagram; hence no protocol here.

Batching (issue 10, overlay/runtime/batchio.py): a readable socket is drained with `recvmmsg`, up to 64
datagrams a system call; once the endpoint is started, what is sent is queued per socket and leaves with
`sendmmsg` at the end of the event-loop iteration — a datagram that a drained batch produced leaves in the
same iteration, in order, one system call per 64. Before `start` (and in unit tests) sends are immediate.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

from overlay import auth
from overlay.runtime.batchio import BATCH, SOL_UDP, UDP_GRO, recv_batch, send_batch

DRAIN_BUDGET = 256
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Peer = tuple[str, int]


SO_ATTACH_REUSEPORT_CBPF = 51
# Classic BPF (linux/filter.h) opcodes used by `steering_program`.
_LD_B_ABS, _LD_W_ABS, _LD_W_IND, _LDX_MEM, _LDX_B_MSH, _ST = 0x30, 0x20, 0x40, 0x61, 0xB1, 0x02
_AND_K, _RSH_K, _XOR_X, _MOD_K, _MUL_K, _TAX, _RET_A = 0x54, 0x74, 0xAC, 0x94, 0x24, 0x07, 0x16
_JEQ_K, _JA = 0x15, 0x05


def steering_program(sockets: int) -> list[tuple[int, int, int, int]]:
    """A classic BPF program for a SO_REUSEPORT group of `sockets` receive sockets (one per worker): pick
    the socket by a hash of the *inner* packet's addresses and ports, not of the outer 4-tuple — a TM sends
    every datagram from one port to one port, so the default hash would hand all of them to one worker.
    The program sees the UDP payload: the GRE header (4 bytes, 8 with a key), then the inner IP header
    (sealed datagrams: below).
    (Ports are read where TCP and UDP keep them: for other packets that word is whatever is there, which
    still picks a worker; a malformed packet reads out of bounds, and the kernel then picks socket 0.)

    Each worker then writes its flows' packets into its own TUN queue, and the TUN steers packets of the
    same flow (its symmetric hash) read from the device to that queue: a flow stays with one worker."""
    program: list[tuple[int, int, int, int]] = []
    jumps: list[tuple[int, str]] = []     # (instruction index, label): patched below
    labels: dict[str, int] = {}

    def emit(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> None:
        program.append((code, jt, jf, k))

    def jump(label: str) -> None:
        jumps.append((len(program), label))
        emit(_JA)

    emit(_LD_B_ABS, 0)                    # the GRE flags' high byte, or a sealed datagram's marker
    emit(_JEQ_K, auth.MARKER, jt=0, jf=1)
    jump("sealed")
    emit(_AND_K, 0x20)                    # the key bit
    emit(_JEQ_K, 0, jt=0, jf=1)           # no key: the body for offset 4, else the one for offset 8
    jump("body4")
    jump("body8")
    # Sealed (overlay/auth.py): authenticated only, the GRE payload is in the clear after the 18-byte
    # header — the same inner flow, further on; encrypted, the sender's key id and lane (the flags byte)
    # are all there is to go by: one sending loop's datagrams to one worker. Either way the choice is a
    # function of bytes the tag covers, so a replayed copy meets the window that saw the original.
    labels["sealed"] = len(program)
    emit(_LD_B_ABS, 1)                    # flags: bit 0 encrypted
    emit(_AND_K, auth.FLAG_ENCRYPTED)
    emit(_JEQ_K, 0, jt=0, jf=1)
    jump("sealed-clear")
    for load in ((_LD_W_ABS, 2), (_ST, 0), (_LD_B_ABS, 1), (_LDX_MEM, 0), (_XOR_X, 0)):
        emit(*load)
    jump("mix")
    labels["sealed-clear"] = len(program)
    emit(_LD_B_ABS, auth.HEADER_SIZE)     # the GRE flags' high byte behind the header
    emit(_AND_K, 0x20)
    emit(_JEQ_K, 0, jt=0, jf=1)
    jump(f"body{auth.HEADER_SIZE + 4}")
    jump(f"body{auth.HEADER_SIZE + 8}")
    for offset in (4, 8, auth.HEADER_SIZE + 4, auth.HEADER_SIZE + 8):
        labels[f"body{offset}"] = len(program)
        emit(_LD_B_ABS, offset)           # the inner version
        emit(_RSH_K, 4)
        emit(_JEQ_K, 6, jt=0, jf=1)
        jump(f"v6-{offset}")
        # IPv4: source ^ destination, then the ports after a header of IHL words.
        for load in ((_LD_W_ABS, offset + 12), (_ST, 0), (_LD_W_ABS, offset + 16), (_LDX_MEM, 0), (_XOR_X, 0),
                     (_ST, 0), (_LDX_B_MSH, offset), (_LD_W_IND, offset), (_LDX_MEM, 0), (_XOR_X, 0)):
            emit(*load)
        jump("mix")
        labels[f"v6-{offset}"] = len(program)
        # IPv6: the addresses' last words, then the ports after the fixed header.
        for load in ((_LD_W_ABS, offset + 20), (_ST, 0), (_LD_W_ABS, offset + 36), (_LDX_MEM, 0), (_XOR_X, 0),
                     (_ST, 0), (_LD_W_ABS, offset + 40), (_LDX_MEM, 0), (_XOR_X, 0)):
            emit(*load)
        jump("mix")
    labels["mix"] = len(program)
    emit(_TAX)                            # A ^= A >> 16, keeping the low half: source and destination
    emit(_RSH_K, 16)                      # alike in it, so both directions of a flow pick one socket;
    emit(_XOR_X)                          # then a multiply spreads its bits upwards, and the high bits
    emit(_AND_K, 0xFFFF)                  # pick the socket (Linux gives connect() even ports: the low
    emit(_MUL_K, 0x9E3779B1)              # bits alone would not spread)
    emit(_RSH_K, 16)
    emit(_MOD_K, sockets)
    emit(_RET_A)
    for index, label in jumps:
        code, jt, jf, _ = program[index]
        program[index] = (code, jt, jf, labels[label] - index - 1)
    return program


def attach_steering(sock: socket.socket, sockets: int) -> None:
    """Attach `steering_program` to `sock`'s SO_REUSEPORT group (it applies to every socket of it)."""
    program = steering_program(sockets)
    filters = (ctypes.c_uint64 * len(program))(*[
        code | (jt << 16) | (jf << 24) | (k << 32) for code, jt, jf, k in program])
    fprog = struct.pack("HL", len(program), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _bind_udp(address: Address, port: int) -> socket.socket:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # Several agent processes may share the port to use more cores (Nebula's `routines`).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:
                pass  # capped by net.core.*mem_max; the default still works, just drops earlier under bursts
        try:
            # UDP GRO: a peer's GSO train (or what the NIC coalesced) arrives whole, not cut into skbs by
            # the kernel; recv_batch cuts it into its datagrams (batchio).
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass      # an old kernel: datagrams come one by one, as before
        sock.bind((str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


CONSECUTIVE_ATTEMPTS = 32


def _bind_consecutive(address: Address, count: int) -> list[socket.socket]:
    """`count` sockets on consecutive ports the kernel considers free: the first port is ephemeral, the
    others follow it. Consecutive ports make one firewall range; if other sockets keep taking ports in
    the middle, fall back to any free ports rather than fail."""
    if count == 0:
        return []
    for _ in range(CONSECUTIVE_ATTEMPTS if count > 1 else 1):
        sockets: list[socket.socket] = []
        try:
            sockets.append(_bind_udp(address, 0))
            first = sockets[0].getsockname()[1]
            if first + count - 1 > 65535:
                raise OSError(errno.EADDRINUSE, "no room after the first port")
            for offset in range(1, count):
                sockets.append(_bind_udp(address, first + offset))
            return sockets
        except OSError as error:
            for sock in sockets:
                sock.close()
            if error.errno != errno.EADDRINUSE:
                raise
    return [_bind_udp(address, 0) for _ in range(count)]


class UnderlayEndpoint:
    """The receive socket plus the flow-entropy send sockets of one node.

    `on_datagram(payload, peer)` gets each UDP payload as `bytes` and the sender as (host, port).
    `send(payload, peer, flow_hash)` never raises: EAGAIN/ENOBUFS/unreachable are counted by errno name.
    `source_port_base` binds the send sockets to consecutive ports from there; None lets the kernel pick
    the first (ephemeral) port and takes the ones after it, so a firewall can allow them as one range. With `source_ports=0` everything is sent from
    the well-known port (a TM: the distributor knows it by that port).
    """

    def __init__(
        self,
        address: Address,
        port: int,
        *,
        source_ports: int = 8,
        source_port_base: int | None = None,
    ):
        if source_ports < 0:
            raise ValueError("source_ports must be 0 (send from the well-known port) or more")
        self.address = address
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_sockets: list[socket.socket] = []
        self.receive_socket = _bind_udp(address, port)
        self.port = self.receive_socket.getsockname()[1]
        try:
            if source_port_base is None:
                self.send_sockets = _bind_consecutive(address, source_ports)
            else:
                for index in range(source_ports):
                    self.send_sockets.append(_bind_udp(address, source_port_base + index))
        except BaseException:
            self.close()
            raise
        self.source_ports = [sock.getsockname()[1] for sock in self.send_sockets]
        self._queues: dict[socket.socket, list[tuple[bytes, Peer]]] = {}
        self._flush_scheduled = False
        self._on_datagram: Callable[[bytes, Peer], None] | None = None
        self._on_train: Callable[[list[bytes], Peer], None] | None = None
        self._on_batch: Callable[[list[tuple[bytes, Peer]]], None] | None = None
        self.counters: dict[str, int] = {
            "udp_rx_datagrams": 0,
            "udp_rx_bytes": 0,
            "udp_tx_datagrams": 0,
            "udp_tx_bytes": 0,
            "udp_rx_errors": 0,
        }

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.receive_socket, *self.send_sockets]

    def start(self, loop: asyncio.AbstractEventLoop, on_datagram: Callable[[bytes, Peer], None],
              on_train: Callable[[list[bytes], Peer], None] | None = None,
              on_batch: Callable[[list[tuple[bytes, Peer]]], None] | None = None) -> None:
        """Read into `on_datagram`; with `on_train`, a UDP GRO train (a peer's GSO send: datagrams of
        one size, in order) comes as one call with its datagrams, which the node may handle together;
        with `on_batch`, the other datagrams of a receive batch come together, [(payload, peer)], in order."""
        self._loop = loop
        self._on_datagram = on_datagram
        self._on_train = on_train
        self._on_batch = on_batch
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._drain, sock)

    def stop_reading(self) -> None:
        if self._loop is None:
            return
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def drain_all(self) -> int:
        """One final pass over every socket, e.g. to handle what already arrived before shutting down."""
        handled = sum(self._drain(sock) for sock in self.sockets)
        self.flush()
        return handled

    def _drain(self, sock: socket.socket) -> int:
        on_datagram, on_train, counters = self._on_datagram, self._on_train, self.counters
        group = on_train is not None
        handled = 0
        while handled < DRAIN_BUDGET:
            try:
                batch = recv_batch(sock, BATCH, group)
            except OSError:
                # ICMP errors from earlier sends surface here as ECONNREFUSED etc.: not fatal, keep reading
                # (within the budget: an error that repeats must not hold the loop).
                counters["udp_rx_errors"] += 1
                handled += 1
                continue
            if not batch:
                break
            handled += len(batch)
            if group:
                self._deliver_grouped(batch)
            else:
                counters["udp_rx_datagrams"] += len(batch)
                counters["udp_rx_bytes"] += sum([len(payload) for payload, _ in batch])
                if self._on_batch is not None:
                    self._on_batch(batch)
                elif on_datagram is not None:
                    for payload, peer in batch:
                        on_datagram(payload, peer)
            if len(batch) < BATCH:
                break        # that was all of it: no empty read to find out
        return handled

    def _deliver_grouped(self, batch: list[tuple[Any, Peer]]) -> None:
        on_datagram, on_train, on_batch, counters = self._on_datagram, self._on_train, self._on_batch, self.counters
        plain: list[tuple[bytes, Peer]] = []     # with on_batch: the datagrams since the last train
        for item in batch:
            payload, peer = item
            if payload.__class__ is list:
                train: list[bytes] = payload
                counters["udp_rx_trains"] = counters.get("udp_rx_trains", 0) + 1
                counters["udp_rx_datagrams"] += len(train)
                counters["udp_rx_bytes"] += sum([len(each) for each in train])
                if plain:
                    on_batch(plain)  # type: ignore[misc]
                    plain = []
                on_train(train, peer)  # type: ignore[misc]
            else:
                counters["udp_rx_datagrams"] += 1
                counters["udp_rx_bytes"] += len(payload)
                if on_batch is not None:
                    plain.append(item)
                elif on_datagram is not None:
                    on_datagram(payload, peer)
        if plain:
            on_batch(plain)  # type: ignore[misc]

    def send(self, payload: bytes, peer: Peer, flow_hash: int = 0) -> bool:
        """Send from the socket `flow_hash` picks (so one inner flow keeps one outer source port); a
        negative `flow_hash` pins the well-known port (a peer behind NAT answers only what comes from it).
        Once started: queued, and False only if the datagram is refused at once (not started)."""
        sockets = self.send_sockets
        sock = sockets[flow_hash % len(sockets)] if sockets and flow_hash >= 0 else self.receive_socket
        return self._send(sock, payload, peer)

    def send_all(self, payloads: list[bytes], peer: Peer, flow_hash: int = 0) -> None:
        """`send` for each of `payloads` (one flow's: one socket), queued at once when started."""
        sockets = self.send_sockets
        sock = sockets[flow_hash % len(sockets)] if sockets and flow_hash >= 0 else self.receive_socket
        if self._loop is None:
            for payload in payloads:
                self._send(sock, payload, peer)
            return
        self._send(sock, payloads[0], peer)      # creates the queue and schedules the flush
        self._queues[sock].extend([(payload, peer) for payload in payloads[1:]])

    def queue_all(self, queues: list[list[tuple[bytes, Peer]]]) -> None:
        """Queue (payload, peer) items per send socket, as `send` with a flow hash of that index would
        (the compiled distributor fast path sorts them so); started endpoints only."""
        sockets = self.send_sockets or [self.receive_socket]
        for index, items in enumerate(queues):
            if items:
                payload, peer = items[0]
                self._send(sockets[index], payload, peer)    # creates the queue and schedules the flush
                self._queues[sockets[index]].extend(items[1:])

    def reply(self, payload: bytes, peer: Peer) -> bool:
        """Send from the well-known port (keepalive echoes, control traffic)."""
        return self._send(self.receive_socket, payload, peer)

    def _send(self, sock: socket.socket, payload: bytes, peer: Peer) -> bool:
        if self._loop is not None:
            queue = self._queues.get(sock)
            if queue is None:
                queue = self._queues[sock] = []
            queue.append((payload, peer))
            if not self._flush_scheduled:
                try:
                    self._loop.call_soon(self.flush)
                    self._flush_scheduled = True
                except RuntimeError:   # the loop is closed (shutting down): send now
                    self.flush()
            return True
        try:
            sock.sendto(payload, peer)
        except OSError as error:
            self._count_error(error.errno)
            return False
        self.counters["udp_tx_datagrams"] += 1
        self.counters["udp_tx_bytes"] += len(payload)
        return True

    def flush(self) -> None:
        """Send what is queued: one `sendmmsg` per 64 datagrams per socket. A datagram the kernel refuses
        is counted by errno and skipped; the rest still go."""
        self._flush_scheduled = False
        counters = self.counters
        for sock, queue in self._queues.items():
            if not queue:
                continue
            start, total = 0, len(queue)
            while start < total:
                sent, error = send_batch(sock, queue, start)
                if sent:
                    counters["udp_tx_datagrams"] += sent
                    counters["udp_tx_bytes"] += sum([len(payload) for payload, _ in queue[start:start + sent]])
                    start += sent
                if error:
                    self._count_error(error)
                    start += 1
            queue.clear()

    def _count_error(self, code: int | None) -> None:
        # EAGAIN/ENOBUFS (queue full), EHOSTUNREACH/ENETUNREACH, EMSGSIZE: lose this datagram, keep going.
        key = f"udp_tx_error_{errno.errorcode.get(code or 0, 'other').lower()}"
        self.counters[key] = self.counters.get(key, 0) + 1

    def close(self) -> None:
        self.stop_reading()
        if self._loop is not None and not self._loop.is_closed():
            self.flush()
        for sock in self.sockets:
            sock.close()


def errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, "other").lower()
