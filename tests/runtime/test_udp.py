"""Underlay endpoint: flow entropy through the outer source port, draining reads, send errors counted."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import pytest
import uvloop

from overlay.runtime.udp import UnderlayEndpoint

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def test_each_flow_hash_leaves_from_its_own_source_port() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=4)
    peer = receiver()
    try:
        assert len(set(endpoint.source_ports)) == 4
        seen = {}
        for flow_hash in (0, 1, 2, 3, 4, 5, 6, 7, 1_000_003):
            assert endpoint.send(b"gre", peer.getsockname(), flow_hash)
            _, (_, port) = peer.recvfrom(100)
            seen[flow_hash] = port
        assert [seen[h] for h in range(4)] == endpoint.source_ports
        # The same flow always keeps its port (one inner flow = one outer flow, no reordering across paths).
        assert seen[4] == seen[0] and seen[7] == seen[3]
        assert seen[1_000_003] == endpoint.source_ports[1_000_003 % 4]
        assert endpoint.counters["udp_tx_datagrams"] == 9
    finally:
        endpoint.close()
        peer.close()


def test_ephemeral_source_ports_are_consecutive() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=8)
    try:
        first = endpoint.source_ports[0]
        assert endpoint.source_ports == list(range(first, first + 8))
    finally:
        endpoint.close()


def test_no_source_ports_sends_from_the_well_known_port() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=0)
    peer = receiver()
    try:
        assert endpoint.send_sockets == [] and endpoint.source_ports == []
        endpoint.send(b"x", peer.getsockname(), 12345)
        assert peer.recvfrom(100)[1][1] == endpoint.port
    finally:
        endpoint.close()
        peer.close()


def test_reply_leaves_from_the_well_known_port() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=2)
    peer = receiver()
    try:
        endpoint.reply(b"echo", peer.getsockname())
        _, (_, port) = peer.recvfrom(100)
        assert port == endpoint.port
    finally:
        endpoint.close()
        peer.close()


def test_source_port_base_binds_consecutive_ports() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    base = probe.getsockname()[1]
    probe.close()
    try:
        endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=3, source_port_base=base)
    except OSError:
        pytest.skip("the ports after a free ephemeral port were taken meanwhile")
    try:
        assert endpoint.source_ports == [base, base + 1, base + 2]
    finally:
        endpoint.close()


def test_port_in_use_fails_at_start_and_releases_what_it_bound() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=1)
    # SO_REUSEPORT lets agents share a port; a socket bound without it blocks the port for everyone.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            UnderlayEndpoint(LOOPBACK, blocker.getsockname()[1], source_ports=2)
    finally:
        blocker.close()
        endpoint.close()


# {description, payload, destination, expected error counter}: the send fails, the agent does not.
SEND_FAILURES = [
    {"description": "datagram larger than UDP allows", "payload": b"x" * 70000,
     "peer": ("127.0.0.1", 9), "counter": "udp_tx_error_emsgsize"},
    {"description": "IPv6 destination on an IPv4 socket", "payload": b"x",
     "peer": ("::1", 9), "counter": "udp_tx_error_other"},
]


@pytest.mark.parametrize("case", SEND_FAILURES, ids=[case["description"] for case in SEND_FAILURES])
def test_send_errors_are_counted_never_raised(case: dict) -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=1)
    try:
        assert endpoint.send(case["payload"], case["peer"], 0) is False
        assert endpoint.counters[case["counter"]] == 1
        assert endpoint.counters["udp_tx_datagrams"] == 0
    finally:
        endpoint.close()


def test_reads_drain_every_socket_into_one_callback() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=2)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sender_address = sender.getsockname()

    async def run() -> list[tuple[bytes, tuple[str, int]]]:
        got: list[tuple[bytes, tuple[str, int]]] = []
        done = asyncio.Event()

        def on_datagram(payload: bytes, peer: tuple[str, int]) -> None:
            got.append((payload, peer))
            if len(got) == 3 * 50:
                done.set()

        endpoint.start(asyncio.get_running_loop(), on_datagram)
        # A burst larger than one datagram per wakeup: draining must take all of it.
        for port in (endpoint.port, *endpoint.source_ports):
            for index in range(50):
                sender.sendto(f"{port}:{index}".encode(), ("127.0.0.1", port))
        await asyncio.wait_for(done.wait(), 5)
        endpoint.stop_reading()
        return got

    try:
        got = uvloop.run(run())
    finally:
        endpoint.close()
        sender.close()
    assert {peer for _, peer in got} == {sender_address}
    per_port = {port: sum(1 for payload, _ in got if payload.startswith(f"{port}:".encode()))
                for port in (endpoint.port, *endpoint.source_ports)}
    assert per_port == {port: 50 for port in per_port}
    assert endpoint.counters["udp_rx_datagrams"] == 150


def test_drain_all_takes_what_arrived_after_reading_stopped() -> None:
    endpoint = UnderlayEndpoint(LOOPBACK, 0, source_ports=1)
    got: list[bytes] = []
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        loop = uvloop.new_event_loop()
        endpoint.start(loop, lambda payload, peer: got.append(payload))
        endpoint.stop_reading()
        sender.sendto(b"in-flight", ("127.0.0.1", endpoint.port))
        loop.close()
        assert endpoint.drain_all() == 1
        assert got == [b"in-flight"]
    finally:
        endpoint.close()
        sender.close()


def test_ipv6_underlay_reports_peers_as_host_and_port() -> None:
    """An IPv6 underlay: peers come back as (host, port) in ipaddress's text form, as the cores key them."""
    endpoint = UnderlayEndpoint(ipaddress.ip_address("::1"), 0, source_ports=1)
    sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sender.bind(("::1", 0))
    got: list[tuple[bytes, tuple[str, int]]] = []
    try:
        loop = uvloop.new_event_loop()
        endpoint.start(loop, lambda payload, peer: got.append((payload, peer)))
        sender.sendto(b"v6", ("::1", endpoint.port))
        endpoint.drain_all()
        loop.close()
        assert got == [(b"v6", (str(ipaddress.ip_address("::1")), sender.getsockname()[1]))]
        assert endpoint.send(b"back", ("::1", sender.getsockname()[1]), 0)
        sender.settimeout(5)
        assert sender.recv(100) == b"back"
    finally:
        endpoint.close()
        sender.close()


def steered_group(size: int = 3) -> tuple[list[socket.socket], int]:
    """A SO_REUSEPORT group of `size` loopback sockets with the workers' steering program, and its port."""
    from overlay.runtime.udp import _bind_udp, attach_steering

    first = _bind_udp(LOOPBACK, 0)
    port = first.getsockname()[1]
    group = [first, *(_bind_udp(LOOPBACK, port) for _ in range(size - 1))]
    attach_steering(first, len(group))
    return group, port


def received_at(group: list[socket.socket], sender: socket.socket, datagram: bytes, port: int) -> int:
    """Which socket of the group `datagram` reaches, sent from `sender`."""
    sender.sendto(datagram, ("127.0.0.1", port))
    for _ in range(100):
        for index, sock in enumerate(group):
            try:
                sock.recv(2048)
                return index
            except BlockingIOError:
                pass
        time.sleep(0.001)
    raise AssertionError("the datagram never arrived")


def test_workers_steering_spreads_by_the_inner_flow_and_keeps_each_flow_on_one_socket() -> None:
    """`attach_steering`: a TM sends every datagram from one port to one port, yet the SO_REUSEPORT group
    of the workers' sockets must spread them — by the inner flow, both directions of a translated flow to
    the same worker, with or without a GRE key, IPv4 and IPv6. (Linux hands connect() even ports: a hash
    of the low bits alone would put every flow on one socket.)"""
    from overlay import gre
    from tests.distributor import packets as P

    group, port = steered_group()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def where(inner: bytes, key: int | None = None) -> int:
        return received_at(group, sender, gre.encapsulate(inner, key=key), port)

    try:
        flows = [(f"198.51.100.{10 + i % 5}", 40000 + 2 * i) for i in range(150)]
        counts = [0, 0, 0]
        for client, client_port in flows:
            forward = where(P.tcp(client, client_port, "203.0.113.10", 80))
            counts[forward] += 1
            assert where(P.tcp("203.0.113.10", 80, client, client_port), key=7 << 16) == forward, "both directions"
        assert all(25 <= count <= 75 for count in counts), counts
        six = {where(P.udp("2001:db8:1::10", 5000 + 2 * i, "2001:db8:2::10", 53)) for i in range(30)}
        assert six == {0, 1, 2}
    finally:
        sender.close()
        for sock in group:
            sock.close()


def test_workers_steering_of_sealed_datagrams_follows_what_the_tag_covers() -> None:
    """Sealed datagrams in a workers' group (groundwork for workers with `[auth]`, docs/design-runtime.md):
    every copy of one must reach the same worker — chosen from the sealed bytes, never from the outer source
    a replayer picks (this group's part of it; a node's windows must also be one for all its loops) — and a
    flow must stay on one worker although every datagram carries a new counter. Authenticated only: by
    the inner flow, as plain GRE is (both directions alike); encrypted: by the sender's key and lane.
    (Negative control: the program before sealed datagrams had a branch of their own read the header as
    GRE and hashed counter bytes — a flow's datagrams scattered over the workers.)"""
    from overlay import auth, gre
    from tests.distributor import packets as P

    group, port = steered_group()
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]   # three source ports

    def where(datagram: bytes, sender: int = 0) -> int:
        return received_at(group, senders[sender], datagram, port)

    keys = {name: auth.generate_private_key() for name in ("tm", "dist")}
    public = {name: auth.public_key_of(key) for name, key in keys.items()}

    def sealer(mode: str, lane: int = 0, name: str = "tm", key: bytes | None = None) -> auth.Authenticator:
        config = auth.AuthConfig(mode, (key or keys[name],), {"peer": (public["dist"],)})
        return auth.Authenticator(config, time.time_ns(), lane)

    try:
        flows = [(f"198.51.100.{10 + i % 5}", 40000 + 2 * i) for i in range(60)]
        lane0, lane1 = sealer("authenticate"), sealer("authenticate", lane=1)
        counts = [0, 0, 0]
        for client, client_port in flows:
            forward = P.tcp(client, client_port, "203.0.113.10", 80)
            plain = where(gre.encapsulate(forward))
            sealed = {where(lane0.seal(gre.encapsulate(forward), "peer"), sender=n % 3) for n in range(4)}
            assert sealed == {plain}, "authenticated: the inner flow decides, whatever the counter and source"
            back = lane1.seal(gre.encapsulate(P.tcp("203.0.113.10", 80, client, client_port), key=7 << 16), "peer")
            assert where(back) == plain, "both directions, from another lane, with a GRE key"
            counts[plain] += 1
        assert all(10 <= count <= 30 for count in counts), counts
        for lane in range(6):
            encrypting = sealer("encrypt", lane=lane)
            chosen = {where(encrypting.seal(gre.encapsulate(P.tcp(client, client_port, "203.0.113.10", 80)), "peer"),
                            sender=n % 3) for n, (client, client_port) in enumerate(flows[:20])}
            assert len(chosen) == 1, f"encrypted: one sending loop's datagrams to one worker ({chosen})"
        spread = {where(sealer("encrypt", key=auth.generate_private_key()).seal(b"x" * 40, "peer")) for _ in range(30)}
        assert spread == {0, 1, 2}, "encrypted: different senders spread over the workers"
        captured = lane0.seal(gre.encapsulate(P.udp("198.51.100.7", 5000, "203.0.113.10", 53)), "peer")
        assert len({where(captured, sender=n) for n in range(3)}) == 1, "a replayed copy meets the same worker"
    finally:
        for sock in senders + group:
            sock.close()
