"""The benchmark suite (benchmarks/, not part of pass/fail) must not rot silently: its C baselines compile
with -Wall -Werror, the C xxh64 hashes as python-xxhash does, the generator's packets and the TM baseline's
DNAT carry correct checksums (over loopback, no root), dist_loop takes -g, and the harness imports and
answers --help. Unprivileged and quick (~1 s); skipped where there is no C compiler. One test more where
root can open a network namespace: dist_loop -g (UDP GSO) sends the datagrams plain dist_loop sends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import xxhash

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "benchmarks" / "c"
PROGRAMS = ("dist_loop", "tm_relay", "flood", "sink")

XXH_TEST = r"""
#include <stdio.h>
#include <string.h>
#include "xxh64.h"
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        printf("%llu\n", (unsigned long long)xxh64(argv[i], strlen(argv[i]), 0x6f7665726c6179ULL));
    return 0;
}
"""


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (cc)")
    outdir = tmp_path_factory.mktemp("bench-c")
    (outdir / "xxh_test.c").write_text(XXH_TEST)
    sources = {name: C_DIR / f"{name}.c" for name in PROGRAMS} | {"xxh_test": outdir / "xxh_test.c"}

    def build(item: tuple[str, Path]) -> tuple[str, subprocess.CompletedProcess[str]]:
        name, source = item
        return name, subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(C_DIR), "-o",
                                     str(outdir / name), str(source)], capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(len(sources)) as pool:
        results = dict(pool.map(build, sources.items()))
    failures = {name: result.stderr for name, result in results.items() if result.returncode != 0}
    assert not failures, failures
    return {name: outdir / name for name in sources}


def test_c_files_compile_warning_free(binaries: dict[str, Path]) -> None:
    assert all(path.exists() for path in binaries.values())


def test_c_xxh64_matches_python_xxhash(binaries: dict[str, Path]) -> None:
    inputs = ["", "a", "abc", "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef",
              "x" * 33, "the quick brown fox jumps over the lazy dog" * 3]
    out = subprocess.run([str(binaries["xxh_test"]), *inputs], capture_output=True, text=True, timeout=5,
                         check=True).stdout.split()
    assert [int(v) for v in out] == [xxhash.xxh64(s.encode(), seed=0x6F7665726C6179).intdigest() for s in inputs]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def assert_valid_ipv4_udp(packet: bytes) -> tuple[str, int]:
    """The packet's IPv4 header and UDP checksums verify; returns its (destination, destination port)."""
    ihl = (packet[0] & 15) * 4
    assert packet[0] >> 4 == 4 and packet[9] == 17
    assert checksum(packet[:ihl]) == 0xFFFF
    udp = packet[ihl:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert struct.unpack("!H", udp[6:8])[0] != 0 and checksum(pseudo + udp) == 0xFFFF
    return socket.inet_ntoa(packet[16:20]), struct.unpack("!H", udp[2:4])[0]


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    return sock


def test_flood_and_tm_relay_produce_correct_dnat(binaries: dict[str, Path]) -> None:
    """flood (gre mode, as it imitates a distributor) → tm_relay → here: DNATed, checksums right."""
    out = udp_socket()
    probe = udp_socket()
    relay_port = probe.getsockname()[1]
    probe.close()   # a free port for tm_relay
    relay = subprocess.Popen([str(binaries["tm_relay"]), "-s", "10", f"127.0.0.1:{relay_port}",
                              f"127.0.0.1:{out.getsockname()[1]}", "udp:203.0.113.80:9=203.0.113.10:4242"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        flood = subprocess.run([str(binaries["flood"]), "gre", "-d", f"127.0.0.1:{relay_port}", "-b", "127.0.0.1",
                                "-v", "203.0.113.80:9", "-f", "64", "-l", "64", "-r", "2000", "-t", "0.05"],
                               capture_output=True, text=True, timeout=10)
        assert flood.stdout.startswith("sent "), flood.stderr
        sources = set()
        for _ in range(20):
            datagram = out.recv(2048)
            assert datagram[:4] == b"\x00\x00\x08\x00"   # GRE, no key, inner IPv4
            inner = datagram[4:]
            assert len(inner) == 64
            assert assert_valid_ipv4_udp(inner) == ("203.0.113.10", 4242)
            sources.add(inner[12:16] + inner[20:22])
        assert len(sources) == 20   # every datagram of a batch is another inner flow
    finally:
        relay.terminate()
        relay.wait(5)
        out.close()
    assert relay.stdout is not None and relay.stdout.read().startswith("rx ")


def test_sink_counts_and_echoes_keepalives(binaries: dict[str, Path]) -> None:
    probe = udp_socket()
    port = probe.getsockname()[1]
    probe.close()
    sink = subprocess.Popen([str(binaries["sink"]), "-s", "10", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            text=True)
    client = udp_socket()
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        keepalive = b"\x00\x00\x88\xb5" + b"OVKA" + bytes(28)
        client.sendto(keepalive, ("127.0.0.1", port))
        assert client.recv(2048) == keepalive
        for _ in range(5):
            client.sendto(b"\x00\x00\x08\x00" + bytes(20), ("127.0.0.1", port))
        time.sleep(0.1)
        sink.send_signal(10)   # SIGUSR1: report
        words = sink.stdout.readline().split()
        assert words[0] == "count" and int(words[1]) == 5 and int(words[5]) == 1
    finally:
        sink.terminate()
        sink.wait(5)
        client.close()


def test_dist_loop_takes_the_gso_flag(binaries: dict[str, Path]) -> None:
    """-g parses (too few arguments after it: the usage, no "invalid option"), an unknown flag does not."""
    gso = subprocess.run([str(binaries["dist_loop"]), "-g", "-s", "1"], capture_output=True, text=True, timeout=5)
    assert gso.returncode == 2 and "invalid option" not in gso.stderr and "[-g]" in gso.stderr
    unknown = subprocess.run([str(binaries["dist_loop"]), "-z", "x", "y", "z"], capture_output=True, text=True,
                             timeout=5)
    assert unknown.returncode == 2 and "invalid option" in unknown.stderr


# Run inside a fresh network namespace (unshare -n): dist_loop [-g] -p on a TUN, 24 UDP flows routed into it
# while it is stopped (per flow: equal sizes, a shorter one that ends a GSO run, then bigger ones: a new
# run), three "TMs" on loopback. Prints dist_loop's last line and, per TM, the datagrams it got.
GSO_CHECK = r"""
import json, signal, socket, subprocess, sys
binary, gso = sys.argv[1], sys.argv[2] == "1"
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], check=True)  # no stray IPv6 on the TUN
tms = []
for _ in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.3)
    tms.append(s)
argv = [binary, "-p", *(["-g"] if gso else []), "-s", "10", "dgtest0", "127.0.0.1",
        *(f"127.0.0.1:{s.getsockname()[1]}" for s in tms)]
loop = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
assert loop.stdout.readline().strip() == "ready"
subprocess.run(["ip", "link", "set", "dgtest0", "up"], check=True)
subprocess.run(["ip", "addr", "add", "10.9.0.254/24", "dev", "dgtest0"], check=True)
senders = []
for port in range(40000, 40024):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.9.0.254", port))
    senders.append(s)
sizes = [100] * 6 + [60] + [100] * 3 + [40, 40]
loop.send_signal(signal.SIGSTOP)   # all of it queued in the TUN (288 < its 500): dist_loop reads full batches
for index, size in enumerate(sizes):
    for flow, s in enumerate(senders):
        s.sendto(bytes([flow, index]) * (size // 2), ("10.9.0.1", 9))
loop.send_signal(signal.SIGCONT)
got = []
for s in tms:
    got.append([])
    while True:
        try:
            got[-1].append(s.recv(65536).hex())
        except socket.timeout:
            break
loop.terminate()
print(json.dumps({"out": loop.communicate(timeout=5)[0].split(), "got": got}))
"""


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("unshare") is None
                    or shutil.which("ip") is None, reason="needs root, /dev/net/tun, unshare(1) and ip(8)")
def test_dist_loop_gso_sends_what_plain_sends(binaries: dict[str, Path]) -> None:
    """The same flows through dist_loop and dist_loop -g: every TM gets the same datagrams (GRE header, inner
    source port, payload; the inner IP id differs from run to run), each flow's in the order sent, and -g
    did send GSO messages (runs of one TM's equal-sized datagrams)."""
    runs = {}
    for gso in ("0", "1"):
        result = subprocess.run(["unshare", "-n", sys.executable, "-c", GSO_CHECK, str(binaries["dist_loop"]), gso],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        runs[gso] = json.loads(result.stdout)

    def per_tm(run: dict) -> list[list[tuple[str, str, str]]]:
        tms = []
        for datagrams in run["got"]:
            rows = []
            for text in datagrams:
                datagram = bytes.fromhex(text)
                inner = datagram[4:]
                rows.append((datagram[:4].hex(), inner[20:22].hex(), inner[28:].hex()))  # GRE, sport, payload
            tms.append(rows)
        return tms

    plain, gso = per_tm(runs["0"]), per_tm(runs["1"])
    assert sum(map(len, plain)) == 24 * 12 and sum(1 for rows in plain if rows) >= 2
    for plain_rows, gso_rows in zip(plain, gso):
        assert sorted(plain_rows) == sorted(gso_rows)
        for flow in {row[1] for row in plain_rows}:
            assert [row for row in plain_rows if row[1] == flow] == [row for row in gso_rows if row[1] == flow]
    counts = dict(zip(runs["1"]["out"][::2], runs["1"]["out"][1::2]))
    assert int(counts["gso_messages"]) > 0 and counts["gso_refused"] == "0" and counts["dropped"] == "0"


def test_harness_imports_and_answers_help() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--rounds" in result.stdout and "--only" in result.stdout
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import run
    finally:
        sys.path.remove(str(ROOT))
    assert set(run.BENCHMARKS) <= set(run.EVERYTHING)
    assert run.parse_args(["--only", "tm,rtt"]).names == {"tm", "rtt"}
    assert run.parse_args(["--only", "workers"]).names == {"workers"}
    assert run.rotate(0, ("a", "b")) == ("a", "b") and run.rotate(1, ("a", "b")) == ("b", "a")
    assert {run.rotate(r, ("a", "b", "c"))[0] for r in range(3)} == {"a", "b", "c"}
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "nonsense"])
    pingpong = subprocess.run([sys.executable, "-m", "benchmarks.pingpong", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    assert pingpong.returncode == 0, pingpong.stderr
