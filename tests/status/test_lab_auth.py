"""Issue 9's negative controls with real agents: the reference lab with `[auth]` on, and without.

A host on the underlay (the lab's router namespace, between the distributor and the TMs) forges a TM's
and the distributor's source address and sends well-formed GRE-in-UDP from a raw socket:

- with authentication on, nothing gets into the distributor's TUN (a plain host listening for the forged
  packet receives nothing) or into a TM's core, and both count `auth:unauthenticated`; a sealed datagram
  captured on the underlay and sent again is refused as `auth:replayed`; a node with a key of its own
  (posing as tm1) is refused as `auth:unknown-key`; and real TCP traffic (v4 and v6) runs through the
  sealed overlay with 0 failures;
- with authentication off (the negative control), the same forgery reaches the plain host and the TM.
"""

from __future__ import annotations

import shutil
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from overlay import auth, gre
from overlay.auth import AuthConfig, Authenticator
from overlay.lab import nsnet, topology
from overlay.lab.lab import Lab, unavailable_reason
from tests.authconfig import REPO, with_auth
from tests.tm.packets import tcp, udp

from .conftest import lab_prefix, lab_running

pytestmark = pytest.mark.lab

LAB_UNAVAILABLE = unavailable_reason()
FORGED_COUNT = 20
SINK_PORT = 9999              # the plain host listens here for what a forgery would deliver
FORGED_CLIENT = "198.51.100.250"
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003


class AuthLab:
    def __init__(self, lab: Lab, mode: str, keys: dict[str, bytes]):
        self.lab = lab
        self.mode = mode
        self.keys = keys

    def status(self, role: str) -> dict:
        return self.lab.status(role)


@pytest.fixture(scope="module", params=["authenticate", "off"])
def auth_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthLab]:
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    mode = request.param
    root = tmp_path_factory.mktemp(f"auth-lab-{mode}")
    config_dir = root / "config"
    keys: dict[str, bytes] = {}
    if mode == "off":
        shutil.copytree(REPO / "config", config_dir)
    else:
        keys = with_auth(config_dir)
    with lab_running(Lab(lab_prefix(f"au{mode[0]}"), config_dir=config_dir, state_dir=root / "state")) as lab:
        yield AuthLab(lab, mode, keys)


# -- a forger on the underlay ---------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def spoofed(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4/UDP datagram with any source address (UDP checksum 0: allowed over IPv4)."""
    udp_header = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0x1234, 0, 64, 17, 0,
                         socket.inet_aton(source[0]), socket.inet_aton(destination[0]))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp_header + payload


def send_raw(packets: list[bytes]) -> None:
    """From the namespace this runs in: IP packets as they are, source addresses included."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for packet in packets:
            sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
            time.sleep(0.005)


def capture_one(interface: str, destination: tuple[str, int], timeout: float = 5.0) -> bytes:
    """The first IPv4/UDP packet to `destination` seen on `interface` (an AF_PACKET socket; bounded).
    ETH_P_ALL: the kernel hands packets a host *sends* (or forwards) only to such taps."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((interface, ETH_P_ALL))
        sock.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                packet, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[1] == ETH_P_IP and packet[9] == 17 and packet[16:20] == socket.inet_aton(destination[0]) \
                    and int.from_bytes(packet[22:24], "big") == destination[1]:
                return packet
    raise AssertionError(f"no datagram to {destination} on {interface} within {timeout}s")


def sink(count_for: float) -> int:
    """Datagrams the plain host receives on SINK_PORT for `count_for` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", SINK_PORT))
        sock.settimeout(0.2)
        received, deadline = 0, time.monotonic() + count_for
        while time.monotonic() < deadline:
            try:
                sock.recv(2048)
                received += 1
            except TimeoutError:
                pass
        return received


DIST = (topology.DISTRIBUTOR_UNDERLAY, 4754)
TM1 = (topology.TM_UNDERLAY["tm1"], 4754)


def tm_counters(lab: AuthLab, tm: str) -> dict[str, int]:
    return lab.status(tm)["counters"]


def tm_drops(lab: AuthLab, tm: str) -> dict[str, int]:
    return lab.status(tm)["drops"]


# -- the proofs ----------------------------------------------------------------------------------------

def test_a_forged_tm_datagram_reaches_the_protected_network_only_without_authentication(auth_lab: AuthLab) -> None:
    """tm1's address, a well-formed GRE-in-UDP payload carrying a packet for the plain inside host."""
    inner = udp(FORGED_CLIENT, 40000, topology.PLAIN_V4, SINK_PORT, b"forged")
    forged = [spoofed(TM1, DIST, gre.encapsulate(inner)) for _ in range(FORGED_COUNT)]
    before = auth_lab.status("dist")
    with ThreadPoolExecutor(1) as pool:
        received = pool.submit(nsnet.in_namespace, auth_lab.lab.ns("plain"), sink, 3.0)
        time.sleep(0.5)
        nsnet.in_namespace(auth_lab.lab.ns("router"), send_raw, forged)
        delivered = received.result(timeout=10)
    after = auth_lab.status("dist")
    from_tm = after["reasons"].get("from-tm", 0) - before["reasons"].get("from-tm", 0)
    if auth_lab.mode == "off":
        assert delivered == FORGED_COUNT, "negative control: without authentication the forgery gets through"
        assert from_tm >= FORGED_COUNT
    else:
        assert delivered == 0
        refused = after["drops"].get(auth.UNAUTHENTICATED, 0) - before["drops"].get(auth.UNAUTHENTICATED, 0)
        assert refused == FORGED_COUNT
    print(f"\nauth {auth_lab.mode}: {FORGED_COUNT} forged datagrams from tm1's address, {delivered} reached the plain host")


def test_a_forged_distributor_datagram_reaches_a_tm_only_without_authentication(auth_lab: AuthLab) -> None:
    syn = tcp(f"{FORGED_CLIENT}", 40000, topology.VIP_V4, 80, 0x02)
    forged = [spoofed(DIST, TM1, gre.encapsulate(syn)) for _ in range(FORGED_COUNT)]
    before = tm_counters(auth_lab, "tm1")
    nsnet.in_namespace(auth_lab.lab.ns("router"), send_raw, forged)
    time.sleep(0.5)
    after = tm_counters(auth_lab, "tm1")
    received = after["packets.received"] - before["packets.received"]
    if auth_lab.mode == "off":
        # The forged SYN opens state, and the server's SYN-ACKs come back through tm1 on top.
        assert received >= FORGED_COUNT, "negative control: without authentication the TM takes them"
        assert after["conntrack.created"] > before["conntrack.created"]
    else:
        assert received == 0
        assert tm_drops(auth_lab, "tm1").get(f"agent:{auth.UNAUTHENTICATED}", 0) >= FORGED_COUNT


def test_a_captured_sealed_datagram_sent_again_is_refused(auth_lab: AuthLab) -> None:
    if auth_lab.mode == "off":
        pytest.skip("replay protection is part of authentication")
    captured = nsnet.in_namespace(auth_lab.lab.ns("router"), capture_one, "ulb", TM1)
    assert captured[28] == auth.MARKER, "what travels on the underlay is sealed"
    # Captured on its way out of a veth, its UDP checksum may be a partial one the NIC was to finish:
    # sent again as-is, the receiving kernel would drop it before the agent. 0: no checksum (IPv4).
    again = captured[:26] + b"\x00\x00" + captured[28:]
    before = tm_drops(auth_lab, "tm1").get(f"agent:{auth.REPLAYED}", 0)
    nsnet.in_namespace(auth_lab.lab.ns("router"), send_raw, [again] * 3)
    time.sleep(0.5)
    assert tm_drops(auth_lab, "tm1").get(f"agent:{auth.REPLAYED}", 0) - before == 3


def test_a_node_with_the_wrong_key_cannot_join(auth_lab: AuthLab) -> None:
    if auth_lab.mode == "off":
        pytest.skip("keys are part of authentication")
    distributor_public = auth.public_key_of(auth_lab.keys["distributor"])
    impostor = Authenticator(AuthConfig("authenticate", (auth.generate_private_key(),), {"dist1": (distributor_public,)}),
                             time.time_ns())
    inner = udp(FORGED_CLIENT, 40000, topology.PLAIN_V4, SINK_PORT, b"impostor")
    sealed = [spoofed(TM1, DIST, impostor.seal(gre.encapsulate(inner), "dist1")) for _ in range(5)]
    before = auth_lab.status("dist")["drops"].get(auth.UNKNOWN_KEY, 0)
    nsnet.in_namespace(auth_lab.lab.ns("router"), send_raw, sealed)
    time.sleep(0.5)
    assert auth_lab.status("dist")["drops"].get(auth.UNKNOWN_KEY, 0) - before == 5


def test_real_tcp_traffic_runs_through_the_sealed_overlay(auth_lab: AuthLab) -> None:
    status = auth_lab.status("dist")
    assert status["auth"] == auth_lab.mode
    report = auth_lab.lab.traffic(count=2000, duration=40, concurrency=16)
    assert report.failed == 0, report.failures
    invalid = {f"{tm}:{name}": count for tm in topology.TMS for name, count in tm_counters(auth_lab, tm).items()
               if name.startswith("invalid.") and count}
    assert invalid == {}
    print(f"\nauth {auth_lab.mode}: {report.requests} requests through {len(topology.TMS)} TMs, 0 failed")
