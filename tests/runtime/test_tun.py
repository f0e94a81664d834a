"""TUN transport: real packets both ways through a TUN in a namespace, and clear errors when it cannot open."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import dpkt
import pytest
import uvloop

from overlay.runtime import tun as tun_module
from overlay.runtime.tun import TunDevice, TunError, open_tun_fd
from tests.runtime.lab import in_ns, inside, namespaces, require_lab

TUN = "rtxtun0"


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_UDP, data=udp, ttl=64)
    ip.len = len(ip)
    return bytes(ip)  # dpkt fills in both checksums when packing


def udp6(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    udp.ulen = len(udp)
    ip = dpkt.ip6.IP6(
        src=socket.inet_pton(socket.AF_INET6, src),
        dst=socket.inet_pton(socket.AF_INET6, dst),
        nxt=dpkt.ip.IP_PROTO_UDP,
        hlim=64,
        data=udp,
    )
    ip.plen = len(udp)
    return bytes(ip)


async def next_matching(queue: asyncio.Queue[bytes], marker: bytes) -> bytes:
    while True:
        packet = await queue.get()
        if packet.endswith(marker):
            return packet


# {description, local address on the TUN, remote address routed into it, builder, socket family}
FAMILIES = [
    {"description": "IPv4 over the TUN", "local": "192.0.2.1", "remote": "192.0.2.200", "build": udp4,
     "family": socket.AF_INET, "route": "192.0.2.128/25"},
    {"description": "IPv6 over the TUN", "local": "2001:db8:7::1", "remote": "2001:db8:7::150", "build": udp6,
     "family": socket.AF_INET6, "route": "2001:db8:7::100/120"},
]


@pytest.mark.lab
@pytest.mark.parametrize("case", FAMILIES, ids=[case["description"] for case in FAMILIES])
def test_tun_carries_real_packets_both_ways(case: dict) -> None:
    require_lab()
    with namespaces("tun") as ns:
        with inside(ns["tun"]):
            device = TunDevice(TUN)
        try:
            family = "-6" if case["family"] == socket.AF_INET6 else "-4"
            extra = ("nodad",) if family == "-6" else ()
            in_ns(ns["tun"], "ip", "link", "set", TUN, "up")
            in_ns(ns["tun"], "ip", family, "addr", "add", case["local"], "dev", TUN, *extra)
            in_ns(ns["tun"], "ip", family, "route", "add", case["route"], "dev", TUN)
            with inside(ns["tun"]):
                listener = socket.socket(case["family"], socket.SOCK_DGRAM)
            listener.bind((case["local"], 0))
            listener.setblocking(False)
            port = listener.getsockname()[1]

            async def exchange() -> tuple[bytes, bytes]:
                loop = asyncio.get_running_loop()
                received: asyncio.Queue[bytes] = asyncio.Queue()
                device.start(loop, received.put_nowait)
                try:
                    # Kernel → TUN: a datagram to an address routed into the TUN comes out as one IP packet.
                    # (IPv6 router solicitations and MLD reports may come out first: skip them.)
                    listener.sendto(b"to-the-tun", (case["remote"], 4000))
                    from_kernel = await asyncio.wait_for(next_matching(received, b"to-the-tun"), 5)
                    # TUN → kernel: a packet written into the TUN is delivered to the local socket.
                    assert device.write(case["build"](case["remote"], case["local"], 4000, port, b"from-the-tun"))
                    data = await asyncio.wait_for(loop.sock_recv(listener, 2048), 5)
                    return from_kernel, data
                finally:
                    device.stop_reading()

            from_kernel, delivered = uvloop.run(exchange())
            listener.close()
            parsed = dpkt.ip6.IP6(from_kernel) if case["family"] == socket.AF_INET6 else dpkt.ip.IP(from_kernel)
            assert socket.inet_ntop(case["family"], parsed.dst) == case["remote"]
            assert parsed.data.dport == 4000 and parsed.data.data == b"to-the-tun"
            assert delivered == b"from-the-tun"
            assert device.counters["tun_rx_packets"] >= 1 and device.counters["tun_tx_packets"] == 1
        finally:
            device.close()


@pytest.mark.lab
def test_write_of_garbage_is_counted_not_raised() -> None:
    require_lab()
    with namespaces("tun") as ns:
        with inside(ns["tun"]):
            device = TunDevice(TUN)
        try:
            in_ns(ns["tun"], "ip", "link", "set", TUN, "up")
            assert device.write(b"\x00" * 20) is False
            assert device.counters["tun_tx_errors"] == 1
            assert device.counters["tun_tx_packets"] == 0
        finally:
            device.close()


@pytest.mark.lab
def test_second_open_of_a_busy_tun_says_so() -> None:
    require_lab()
    with namespaces("tun") as ns, inside(ns["tun"]):
        first = TunDevice(TUN)
        try:
            with pytest.raises(TunError, match="in use"):
                TunDevice(TUN)
        finally:
            first.close()


# {description, how the open is broken, text the operator must see}
OPEN_FAILURES = [
    {"description": "name too long", "name": "x" * 16, "path": None, "expected": "1..15 bytes"},
    {"description": "empty name", "name": "", "path": None, "expected": "1..15 bytes"},
    {"description": "no /dev/net/tun", "name": TUN, "path": "/nonexistent/tun", "expected": "--device /dev/net/tun"},
]


@pytest.mark.parametrize("case", OPEN_FAILURES, ids=[case["description"] for case in OPEN_FAILURES])
def test_open_failures_say_what_to_do(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    if case["path"]:
        monkeypatch.setattr(tun_module, "TUN_PATH", case["path"])
    with pytest.raises(TunError) as error:
        open_tun_fd(case["name"])
    assert case["expected"] in str(error.value)


@pytest.mark.lab
def test_without_net_admin_the_error_names_the_capability() -> None:
    """Root without CAP_NET_ADMIN can open /dev/net/tun but TUNSETIFF fails with EPERM."""
    require_lab()
    code = "from overlay.runtime.tun import open_tun_fd\nopen_tun_fd('rtxnocap0')\n"
    result = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "TunError" in result.stderr and "CAP_NET_ADMIN" in result.stderr and "cap_add" in result.stderr


@pytest.mark.lab
def test_multi_queue_tun_takes_one_queue_per_open() -> None:
    """Several processes (or descriptors) can each own a queue of one multi-queue TUN (Nebula's routines)."""
    require_lab()
    with namespaces("tun") as ns, inside(ns["tun"]):
        queues = [TunDevice(TUN, multi_queue=True) for _ in range(2)]
        try:
            assert {queue.name for queue in queues} == {TUN}
            # A single-queue open of the same device is refused with a sentence, not a traceback.
            with pytest.raises(TunError, match="multi-queue=False"):
                TunDevice(TUN)
        finally:
            for queue in queues:
                queue.close()
