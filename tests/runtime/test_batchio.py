"""The compiled batch I/O (overlay/_fastio.c) and its pure-Python fallback (overlay/runtime/batchio.py)
give the same results on the same real sockets: datagrams and peers received, datagrams sent and the
errno of one refused, packets read from a packet-boundary descriptor (a TUN queue reads like one)."""

from __future__ import annotations

import errno
import random
import socket

import pytest

from overlay.runtime import batchio

IMPLEMENTATIONS = {"python": (batchio.py_recv_batch, batchio.py_send_batch, batchio.py_read_batch)}
try:
    from overlay import _fastio  # type: ignore[attr-defined]
except ImportError:   # not built here (no compiler or headers): the fallback alone is checked
    pass
else:
    IMPLEMENTATIONS["compiled"] = (_fastio.recv_batch, _fastio.send_batch, _fastio.read_batch)

requires_both = pytest.mark.skipif("compiled" not in IMPLEMENTATIONS, reason="overlay._fastio was not built")


def udp(family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def payloads(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 1472, 9000, 65507] + [rng.choice((20, 64, 576, 1400, 1500, 4000)) for _ in range(count - 5)]
    return [rng.randbytes(size) for size in sizes]


def receive_all(recv, sock: socket.socket, max_count: int) -> list[tuple[bytes, tuple[str, int]]]:  # type: ignore[no-untyped-def]
    got: list[tuple[bytes, tuple[str, int]]] = []
    for _ in range(1000):       # bounded
        batch = recv(sock, max_count)
        if not batch:
            break
        assert len(batch) <= max_count
        got += batch
    return got


@pytest.mark.parametrize("max_count", [17, 64])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_recv_batch_returns_every_datagram_whole_with_its_peer(implementation: str, family: int, max_count: int) -> None:
    recv = IMPLEMENTATIONS[implementation][0]
    receiver, senders = udp(family), [udp(family) for _ in range(3)]
    try:
        sent = []
        for index, payload in enumerate(payloads(7, 150)):
            sender = senders[index % 3]
            sender.sendto(payload, receiver.getsockname()[:2])
            sent.append((payload, sender.getsockname()[:2]))
        got = receive_all(recv, receiver, max_count)
        assert got == [(payload, (host, port)) for payload, (host, port) in sent]
        assert recv(receiver, 64) == []            # nothing waits: empty, not an error
    finally:
        for sock in (receiver, *senders):
            sock.close()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_send_batch_sends_in_order_and_stops_at_a_refused_datagram(implementation: str) -> None:
    send = IMPLEMENTATIONS[implementation][1]
    sender, receivers = udp(), [udp() for _ in range(2)]
    try:
        items = [(payload, receivers[index % 2].getsockname()) for index, payload in enumerate(payloads(11, 100))]
        items.insert(70, (b"x" * 70000, receivers[0].getsockname()))     # over UDP's limit: EMSGSIZE
        sent, error = send(sender, items, 0)
        assert (sent, error) == (70, errno.EMSGSIZE)
        assert send(sender, items, 71) == (30, 0)
        for receiver in receivers:
            expected = [payload for payload, peer in items[:70] + items[71:] if peer == receiver.getsockname()]
            assert [payload for payload, _ in receive_all(batchio.py_recv_batch, receiver, 64)] == expected
    finally:
        for sock in (sender, *receivers):
            sock.close()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_read_batch_reads_whole_packets_until_none_wait(implementation: str) -> None:
    read = IMPLEMENTATIONS[implementation][2]
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    try:
        packets = payloads(3, 100)[:4] + payloads(5, 100)[5:]   # up to 9000 bytes (AF_UNIX's own limit)
        got: list[bytes] = []
        for first in range(0, len(packets), 8):   # an AF_UNIX datagram queue holds 10 (max_dgram_qlen)
            for packet in packets[first:first + 8]:
                writer.send(packet)
            batch = read(reader.fileno(), 5)
            assert len(batch) == min(5, len(packets) - first), "at most `max`, and whatever waits"
            got += batch + read(reader.fileno(), 64)
            assert read(reader.fileno(), 64) == []
        assert got == packets
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_a_read_error_is_raised_but_only_after_what_was_read(implementation: str) -> None:
    read = IMPLEMENTATIONS[implementation][2]
    with pytest.raises(OSError) as error:
        read(12345, 64)                      # no such descriptor
    assert error.value.errno == errno.EBADF


@requires_both
def test_both_implementations_agree_on_a_random_exchange() -> None:
    """The differential test: the same random traffic through each, the same results."""
    outcomes = []
    for recv, send, _ in IMPLEMENTATIONS.values():
        sender, receiver = udp(), udp()
        try:
            items = [(payload, receiver.getsockname()) for payload in payloads(99, 120)]
            assert send(sender, items, 0) == (len(items), 0)
            outcomes.append([(payload, peer[1] == sender.getsockname()[1]) for payload, peer in receive_all(recv, receiver, 64)])
        finally:
            sender.close()
            receiver.close()
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 120


@requires_both
@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no-gso"])
def test_runs_of_equal_datagrams_to_one_peer_arrive_as_sent_with_and_without_gso(gso: bool) -> None:
    """Equal-sized runs to one peer leave as UDP GSO messages (the kernel segments them): the receiver
    must still see exactly the datagrams sent, boundaries and order, a shorter last one included."""
    rng = random.Random(5)
    sender, receivers = udp(), [udp(), udp()]
    previous = _fastio.set_gso(gso)
    try:
        items = []
        for receiver in (0, 0, 1, 0, 1, 1):           # runs to one peer, broken by the other
            size = rng.choice((64, 1400, 1472, 9000))
            items += [(rng.randbytes(size), receivers[receiver].getsockname()) for _ in range(rng.randrange(1, 60))]
            items.append((rng.randbytes(size // 2), receivers[receiver].getsockname()))   # a shorter last
        sent = 0
        while sent < len(items):                      # the receivers drain between sends: nothing overflows
            count, error = _fastio.send_batch(sender, items[sent:sent + 64], 0)
            assert error == 0 and count == len(items[sent:sent + 64])
            sent += count
        for receiver in receivers:
            expected = [payload for payload, peer in items if peer == receiver.getsockname()]
            got = [payload for payload, _ in receive_all(batchio.py_recv_batch, receiver, 64)]
            assert got == expected
    finally:
        _fastio.set_gso(previous)
        for sock in (sender, *receivers):
            sock.close()


def gro(sock: socket.socket) -> socket.socket:
    sock.setsockopt(batchio.SOL_UDP, batchio.UDP_GRO, 1)
    return sock


@requires_both
def test_a_gso_train_reaches_a_gro_socket_whole() -> None:
    """The premise of the next test: with UDP_GRO on, a local GSO send arrives as one message with its
    segment size (the kernel does not cut it for the receiver), so the receiver must cut it."""
    sender, receiver = udp(), gro(udp())
    try:
        items = [(bytes([index]) * 1000, receiver.getsockname()) for index in range(10)] + [(b"z" * 10, receiver.getsockname())]
        assert _fastio.send_batch(sender, items, 0) == (11, 0)
        data, controls, _, _ = receiver.recvmsg(65536, socket.CMSG_SPACE(4))
        assert len(data) == 10 * 1000 + 10
        assert [(level, kind, int.from_bytes(value[:4], "little")) for level, kind, value in controls] == [
            (batchio.SOL_UDP, batchio.UDP_GRO, 1000)]
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_a_gro_train_comes_back_as_the_datagrams_sent(implementation: str) -> None:
    recv = IMPLEMENTATIONS[implementation][0]
    if "compiled" not in IMPLEMENTATIONS:
        pytest.skip("needs overlay._fastio to send GSO trains")
    rng = random.Random(6)
    sender, receiver = udp(), gro(udp())
    try:
        items = []
        for _ in range(8):
            size = rng.choice((64, 1400, 1472))
            items += [(rng.randbytes(size), receiver.getsockname()) for _ in range(rng.randrange(1, 40))]
            items.append((rng.randbytes(rng.randrange(1, size + 1)), receiver.getsockname()))
        sent = 0
        while sent < len(items):
            count, error = _fastio.send_batch(sender, items[sent:sent + 64], 0)
            assert error == 0
            sent += count
            got = receive_all(recv, receiver, 64)
            assert [payload for payload, _ in got] == [payload for payload, _ in items[sent - count:sent]]
            assert {peer for _, peer in got} == {sender.getsockname()}
    finally:
        sender.close()
        receiver.close()
