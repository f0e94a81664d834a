"""Packets per second through the real agents vs the kernel forwarding the same flood (reports only).

The client floods 64-byte UDP datagrams for a few seconds (a) to the server directly — the distributor
host's kernel forwards them, the baseline — and (b) to the VIP: TUN → distributor core → GRE-in-UDP → TM
agent (DNAT) → distributor → TUN → server. The server counts what arrives. Only ratios mean something
(2 shared cores, Python generator); ENVIRONMENT.md expects a user-mode relay at roughly a quarter to a
third of kernel forwarding. Run: `pytest -m benchmark -s tests/runtime/test_agent_benchmark.py` (root).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.agents import mini_overlay
from tests.runtime.lab import require_lab

SECONDS = 3.0

FLOOD = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
target, seconds, sent = (sys.argv[1], 9), float(sys.argv[2]), 0
payload = b"x" * 36  # 20 IP + 8 UDP + 36 = 64 bytes
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for _ in range(100):
        try:
            sock.sendto(payload, target)
            sent += 1
        except OSError:
            pass
print(sent)
"""

SINK = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind(("203.0.113.10", 9))
sock.settimeout(1.0)
print("ready", flush=True)
count = 0
try:
    while True:
        sock.recv(2048)
        count += 1
except socket.timeout:
    pass
print(count, flush=True)
"""


def run_flood(overlay, target: str) -> tuple[int, int]:
    sink = subprocess.Popen(["ip", "netns", "exec", overlay.ns["server"], sys.executable, "-c", SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        sent = subprocess.run(["ip", "netns", "exec", overlay.ns["client"], sys.executable, "-c", FLOOD, target,
                               str(SECONDS)], capture_output=True, text=True, timeout=SECONDS + 30)
        received = int(sink.communicate(timeout=SECONDS + 30)[0].strip() or 0)
        return int(sent.stdout.strip() or 0), received
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


@pytest.mark.lab
@pytest.mark.benchmark
def test_agents_relay_rate_vs_kernel_forwarding(tmp_path: Path) -> None:
    require_lab()
    with mini_overlay(tmp_path) as overlay:
        kernel_sent, kernel_received = run_flood(overlay, "203.0.113.10")
        overlay_sent, overlay_received = run_flood(overlay, "203.0.113.80")
        dist = overlay.status("distributor")["counters"]
        kernel_pps, overlay_pps = kernel_received / SECONDS, overlay_received / SECONDS
        print(f"\nkernel forwarding: sent {kernel_sent / SECONDS:,.0f} pps, delivered {kernel_pps:,.0f} pps")
        print(f"through distributor + TM agents: sent {overlay_sent / SECONDS:,.0f} pps, delivered "
              f"{overlay_pps:,.0f} pps ({overlay_received / max(overlay_sent, 1):.0%} of sent)")
        print(f"ratio overlay / kernel: {overlay_pps / kernel_pps if kernel_pps else float('nan'):.2f}; distributor "
              f"tun_rx {dist['tun_rx_packets']:,}, udp_tx {dist['udp_tx_datagrams']:,}, "
              f"udp_tx errors {sum(v for k, v in dist.items() if k.startswith('udp_tx_error'))}")
