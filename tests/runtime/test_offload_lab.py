"""TUN offloads end to end (issue 10): bulk TCP through the real agents of the mini overlay
(tests/runtime/agents.py: client → distributor → TM (DNAT) → server, and back), with the distributor's
`[tun] offload` on and off; IPv4 and IPv6; 1 and 4 parallel streams.

Every stream sends 8 MB of random bytes to the VIP and the server echoes them as they come, so both
directions carry bulk at once; the sha256 of what the server received and of what came back must be the
one of what was sent. From the distributor's status: with offload on, the TUN read super-packets
(`tun_rx_super_packets` > 0: the client's TSO reached user space whole, and `from_tun_train` decided
them) and wrote runs of segments coalesced (`tun_tx_writes` < `tun_tx_packets`), none of its reads was
unusable, `datapath.tun_offload` is true. With offload off — the negative control that keeps the
assertions from being vacuous — the same traffic crosses the same TUN (its packet counters rise) with no
super-packet counters at all and `datapath.tun_offload` false. The TM never dropped a packet as invalid
(no state, bad flags: what a mis-cut or mis-joined segment would give). Every socket operation has a
timeout, and each transfer is bounded as a whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from overlay.lab.report import invalid_drops
from tests.runtime.agents import MiniOverlay, mini_overlay, wait_listening
from tests.runtime.lab import require_lab

pytestmark = pytest.mark.lab

PORT = 5001
STREAM_BYTES = 8 * 1024 * 1024
SOCKET_TIMEOUT = 15.0     # any one send or receive
TRANSFER_TIMEOUT = 40     # one whole transfer, every stream of it
TARGETS = {4: "203.0.113.80", 6: "2001:db8:80::80"}

BULK_SERVICES = f"""
[[tm.service]]
name = "bulk"
virtual = "203.0.113.80"
port = {PORT}
servers = ["203.0.113.10:{PORT}"]

[[tm.service]]
name = "bulk6"
virtual = "2001:db8:80::80"
port = {PORT}
servers = ["[2001:db8:2::10]:{PORT}"]
"""

# The server: every connection's bytes echoed back as they arrive, until the client's FIN; then one line
# of JSON per connection (the sha256 and length of what it received).
SERVER = """
import hashlib, json, socket, sys, threading
port, timeout = int(sys.argv[1]), float(sys.argv[2])
lock = threading.Lock()

def serve(conn, peer):
    conn.settimeout(timeout)
    digest, count, error = hashlib.sha256(), 0, None
    try:
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        error = repr(exc)
    finally:
        conn.close()
    with lock:
        print(json.dumps({"peer": peer[0], "sha256": digest.hexdigest(), "bytes": count, "error": error}), flush=True)

def listen(family, address):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    sock.listen(16)
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()

threading.Thread(target=listen, args=(socket.AF_INET6, "::"), daemon=True).start()
listen(socket.AF_INET, "0.0.0.0")
"""

# The client: `streams` connections at once, each sending `size` random bytes (then FIN) while it reads
# the echo to the end; prints one JSON list, a result per stream.
CLIENT = """
import hashlib, json, os, socket, sys, threading
host, port, size, streams, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
results = [None] * streams

def stream(index):
    data = os.urandom(size)
    result = {"sent": hashlib.sha256(data).hexdigest(), "received": None, "bytes": 0, "error": None}
    results[index] = result
    errors = []
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        result["error"] = "connect: " + repr(exc)
        return

    def send():
        try:
            view = memoryview(data)
            for start in range(0, size, 1 << 16):
                sock.sendall(view[start:start + (1 << 16)])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append("send: " + repr(exc))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest, count = hashlib.sha256(), 0
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
    except OSError as exc:
        errors.append("receive: " + repr(exc))
    sender.join(timeout)
    sock.close()
    result.update(received=digest.hexdigest(), bytes=count, error="; ".join(errors) or None)

threads = [threading.Thread(target=stream, args=(index,), daemon=True) for index in range(streams)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout * 3)
print(json.dumps(results))
"""


class Bulk:
    """The mini overlay with the bulk services on the TM and the echo server running in the server's ns."""

    def __init__(self, overlay: MiniOverlay, offload: bool) -> None:
        self.overlay = overlay
        self.offload = offload
        self.server_log = overlay.workdir / "bulk-server.log"

    def server_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.server_log.read_text().splitlines() if line.strip()]

    def transfer(self, family: int, streams: int) -> tuple[list[dict], list[dict]]:
        """(the client's result per stream, the server's per connection) of one bulk transfer."""
        seen = len(self.server_lines())
        started = time.monotonic()
        result = subprocess.run(
            ["ip", "netns", "exec", self.overlay.ns["client"], sys.executable, "-c", CLIENT, TARGETS[family],
             str(PORT), str(STREAM_BYTES), str(streams), str(SOCKET_TIMEOUT)],
            capture_output=True, text=True, timeout=TRANSFER_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr
        client = json.loads(result.stdout)
        # The server logs a connection once it has sent its FIN: at most a moment after the client saw it.
        deadline = time.monotonic() + 5
        while len(self.server_lines()) < seen + streams and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"IPv{family} x{streams}: {time.monotonic() - started:.2f} s")
        return client, self.server_lines()[seen:]


@pytest.fixture(scope="module", params=["on", "off"])
def bulk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bulk]:
    """One mini overlay per offload setting, shared by its transfers (their counters are read as deltas)."""
    require_lab()
    workdir = tmp_path_factory.mktemp(f"offload-{request.param}")
    with mini_overlay(workdir, offload=request.param, tm_services=BULK_SERVICES) as overlay:
        bulk = Bulk(overlay, request.param == "on")
        with bulk.server_log.open("w") as log:
            server = subprocess.Popen(["ip", "netns", "exec", overlay.ns["server"], sys.executable, "-c", SERVER,
                                       str(PORT), str(SOCKET_TIMEOUT)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(overlay.ns["server"], (f"0.0.0.0:{PORT}", f"[::]:{PORT}"))
            yield bulk
        finally:
            server.terminate()
            server.wait(5)


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("family", [4, 6])
def test_bulk_tcp_both_ways_intact(bulk: Bulk, family: int, streams: int) -> None:
    offload = bulk.offload
    before_status = bulk.overlay.status("distributor")
    client, server = bulk.transfer(family, streams)
    status = bulk.overlay.status("distributor")
    before, after = before_status["counters"], status["counters"]
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}

    # The bytes, both ways: what the server got is what was sent, and so is what came back.
    assert [stream["error"] for stream in client] == [None] * streams, client
    assert [stream["bytes"] for stream in client] == [STREAM_BYTES] * streams
    assert all(stream["received"] == stream["sent"] for stream in client), "the echo came back different"
    assert len(server) == streams, server
    assert [connection["error"] for connection in server] == [None] * streams, server
    assert sorted(connection["sha256"] for connection in server) == sorted(stream["sent"] for stream in client), \
        "the server received other bytes than were sent"
    client_address = "198.51.100.10" if family == 4 else "2001:db8:1::10"
    assert {connection["peer"] for connection in server} == {client_address}, "DNAT only: the server sees the client"

    # The traffic crossed the distributor's TUN (both directions: the server's replies are captured too).
    assert delta["tun_rx_packets"] >= 2 * streams * STREAM_BYTES // 1500, delta
    assert delta["tun_tx_packets"] >= 2 * streams * STREAM_BYTES // 1500, delta
    assert delta.get("tun_tx_errors", 0) == 0 and delta.get("tun_rx_errors", 0) == 0, delta
    print(f"offload {'on' if offload else 'off'}, IPv{family} x{streams}:",
          {name: delta.get(name) for name in ("tun_rx_packets", "tun_rx_super_packets", "tun_tx_packets", "tun_tx_writes")})
    assert status["drops"] == before_status["drops"], "the distributor dropped some of the bulk"
    assert status["datapath"]["tun_offload"] is offload
    if offload:
        assert delta["tun_rx_super_packets"] > 0, "no TSO read reached the distributor whole"
        assert 0 < delta["tun_tx_writes"] < delta["tun_tx_packets"], "no run of segments was coalesced"
        assert not [name for name in after if name.startswith("tun_rx_offload_")], after
    else:
        # The negative control: the same bulk, no super-packets — the counters do not even exist.
        assert not [name for name in after if name.startswith(("tun_rx_super", "tun_tx_writes", "tun_rx_offload_"))], after

    tm = bulk.overlay.status("tm")
    assert invalid_drops(tm) == {}, tm.get("counters")
    assert bulk.overlay.procs["distributor"].poll() is None and bulk.overlay.procs["tm"].poll() is None
