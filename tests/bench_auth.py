"""Micro-benchmark of what sealing costs per packet (overlay/auth.py, issue 9): the primitives —
`Authenticator.seal`/`.open` in both modes against `gre.encapsulate`/`gre.decapsulate` alone, and inside
them the ChaCha20-Poly1305 call alone and the replay window — and the whole sans-I/O paths with
authentication off, "authenticate" and "encrypt": `Distributor.from_tun` (a client's ACK to the VIP) and
`TMNode.from_overlay` (an established DNAT flow: open, decapsulate, the core, encapsulate, seal the
answer), for 64-, 512- and 1400-byte inner packets. The numbers quoted in docs/clouds.md ("What
authentication costs") come from this script.

Run: `python3 tests/bench_auth.py [--rounds N] [--calls N]` (or the pytest-benchmark variant in
tests/test_bench_auth.py with `pytest -m benchmark --benchmark-enable tests/test_bench_auth.py`). It
reports; it never asserts a timing. Each round measures every case in turn (the order rotated round by
round), so a noisy neighbour slows them alike; a case's figure is the median over the rounds, and every
ratio is the median of the per-round ratios against its baseline measured in the same round.

The cores are the reference lab's (config/), keyed by tests/authconfig.py's `with_auth` and joined as
tests/test_fleet_in_memory.py's `Fleet` joins them. A receiver refuses a counter it has seen, so every
`open` and every sealed `from_overlay` is fed datagrams sealed fresh before the timed loop; the run checks
afterwards that none was refused, so the timings are of the accepting path.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay import auth, gre
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from overlay.antireplay import LocalWindows, SharedWindows
from overlay.auth import Authenticator
from overlay.config import load_node_config
from overlay.runtime.agent import authenticator
from overlay.tm.node import SEND
from tests.authconfig import with_auth
from tests.test_fleet_in_memory import CONFIG, VIP, Fleet, open_connection
from tests.tm.packets import ACK, PSH, tcp

SIZES = (64, 512, 1400)
MODES = auth.MODES   # ("off", "authenticate", "encrypt")
SEALED = MODES[1:]
CLIENT, CLIENT_PORT = "198.51.100.100", 40000
# The budget per packet of the agents as measured (../shared/PERFORMANCE-NOTES.md), one core each.
AGENT_PPS = {"distributor": 86_000, "tm": 81_000}


def inner_packet(size: int, src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IPv4 TCP segment of exactly `size` bytes (20 IP + 20 TCP + payload)."""
    packet = tcp(src, sport, dst, dport, ACK | PSH, b"x" * (size - 40))
    assert len(packet) == size
    return packet


@dataclass
class Setup:
    """One fleet per mode with one established connection, and a keyed pair of authenticators per sealed
    mode for the primitives (the distributor's key sealing to the connection's TM)."""

    fleets: dict[str, Fleet]
    tm: str                                   # the TM that holds the connection (the same in every mode)
    server: tuple[str, int]                   # the server it chose
    pairs: dict[str, tuple[Authenticator, Authenticator]]
    gre_key: int
    workdir: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        self.workdir.cleanup()


def build() -> Setup:
    workdir = tempfile.TemporaryDirectory(prefix="bench-auth-")
    fleets: dict[str, Fleet] = {}
    pairs: dict[str, tuple[Authenticator, Authenticator]] = {}
    ends = set()
    for mode in MODES:
        config = CONFIG
        if mode != "off":
            config = Path(workdir.name) / mode
            with_auth(config, mode)
        fleet = fleets[mode] = Fleet(config=config)
        assert (fleet.distributor.auth is None) == (mode == "off")
        ends.add(open_connection(fleet, f"{CLIENT}:{CLIENT_PORT}"))
    assert len(ends) == 1, "the same flow must land on the same TM and server in every mode"
    tm, server_end = ends.pop()
    address, port = server_end.rsplit(":", 1)
    for mode in SEALED:
        config = Path(workdir.name) / mode
        sender = authenticator(load_node_config(config / "distributor.toml"))
        receiver = authenticator(load_node_config(config / f"{tm}.toml"))
        assert sender is not None and receiver is not None
        pairs[mode] = (sender, receiver)
    distributor = load_node_config(CONFIG / "distributor.toml").distributor
    assert distributor is not None
    return Setup(fleets, tm, (address, int(port)), pairs, gre.make_key(distributor.gre_key, 0), workdir)


def _time(loop: Callable[[], object], count: int) -> float:
    """ns per item of one timed loop; the collector off, as timeit does."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        loop()
        return (time.perf_counter_ns() - start) / count
    finally:
        gc.enable()


# Each case is a function of the iteration count returning ns per packet; it prepares its input untimed.
Case = Callable[[int], float]


def primitive_cases(setup: Setup) -> dict[tuple[str, int, str], Case]:
    """(`"primitive"`, size, variant) → case; variants: encapsulate, seal:MODE, decapsulate, open:MODE."""
    cases: dict[tuple[str, int, str], Case] = {}
    for size in SIZES:
        inner = inner_packet(size, CLIENT, CLIENT_PORT, VIP, 80)
        payload = gre.encapsulate(inner, key=setup.gre_key)

        def encapsulate(calls: int, inner: bytes = inner) -> float:
            key, encap = setup.gre_key, gre.encapsulate
            return _time(lambda: [encap(inner, key=key) for _ in range(calls)], calls)

        def decapsulate(calls: int, payload: bytes = payload) -> float:
            decap = gre.decapsulate
            return _time(lambda: [decap(payload) for _ in range(calls)], calls)

        cases[("primitive", size, "encapsulate")] = encapsulate
        cases[("primitive", size, "decapsulate")] = decapsulate
        for mode, (sender, receiver) in setup.pairs.items():
            def seal(calls: int, payload: bytes = payload, sender: Authenticator = sender) -> float:
                seal_, tm = sender.seal, setup.tm
                return _time(lambda: [seal_(payload, tm) for _ in range(calls)], calls)

            def open_(calls: int, payload: bytes = payload, sender: Authenticator = sender,
                      receiver: Authenticator = receiver) -> float:
                datagrams = [sender.seal(payload, setup.tm) for _ in range(calls)]
                opened = receiver.open
                return _time(lambda: [opened(datagram) for datagram in datagrams], calls)

            cases[("primitive", size, f"seal:{mode}")] = seal
            cases[("primitive", size, f"open:{mode}")] = open_
    return cases


def inside_cases() -> dict[tuple[str, int, str], Case]:
    """Where seal's and open's time goes: (`"inside"`, size, `aead-seal:MODE` | `aead-open:MODE`) — the
    ChaCha20-Poly1305 call alone, as seal and open make it (associated data precomputed) — and
    (`"inside"`, 0, `"window"`): the replay window accepting the next counter, as open does per datagram."""
    aead, nonce, header = ChaCha20Poly1305(os.urandom(32)), bytes(12), os.urandom(auth.HEADER_SIZE)
    cases: dict[tuple[str, int, str], Case] = {}
    for size in SIZES:
        payload = gre.encapsulate(inner_packet(size, CLIENT, CLIENT_PORT, VIP, 80), key=1)
        covered = header + payload
        tag = aead.encrypt(nonce, b"", covered)
        sealed = aead.encrypt(nonce, payload, header)

        def seal_authenticate(calls: int, covered: bytes = covered) -> float:
            encrypt = aead.encrypt
            return _time(lambda: [encrypt(nonce, b"", covered) for _ in range(calls)], calls)

        def seal_encrypt(calls: int, payload: bytes = payload) -> float:
            encrypt = aead.encrypt
            return _time(lambda: [encrypt(nonce, payload, header) for _ in range(calls)], calls)

        def open_authenticate(calls: int, covered: bytes = covered, tag: bytes = tag) -> float:
            decrypt = aead.decrypt
            return _time(lambda: [decrypt(nonce, tag, covered) for _ in range(calls)], calls)

        def open_encrypt(calls: int, sealed: bytes = sealed) -> float:
            decrypt = aead.decrypt
            return _time(lambda: [decrypt(nonce, sealed, header) for _ in range(calls)], calls)

        cases[("inside", size, "aead-seal:authenticate")] = seal_authenticate
        cases[("inside", size, "aead-seal:encrypt")] = seal_encrypt
        cases[("inside", size, "aead-open:authenticate")] = open_authenticate
        cases[("inside", size, "aead-open:encrypt")] = open_encrypt
    # The replay check as `Authenticator.open` makes it: one loop's windows, and a node's shared ones (the
    # compiled compare-and-swap where the extension is built, else the locked fallback).
    for name, windows in (("window", LocalWindows()), ("window:shared", SharedWindows.create())):
        cases[("inside", 0, name)] = _accept_next(windows)
    return cases


def _accept_next(windows: LocalWindows | SharedWindows) -> Case:
    next_counter = [1]

    def accept_next(calls: int) -> float:
        check, first = windows.check, next_counter[0]
        next_counter[0] += calls
        return _time(lambda: [check(7, 0, counter) for counter in range(first, first + calls)], calls)

    return accept_next


def path_cases(setup: Setup) -> dict[tuple[str, int, str], Case]:
    """(`"distributor"` | `"tm"`, size, mode) → case: `Distributor.from_tun` of the client's packet, and
    `TMNode.from_overlay` of the datagram the distributor made of it."""
    cases: dict[tuple[str, int, str], Case] = {}
    for size in SIZES:
        packet = inner_packet(size, CLIENT, CLIENT_PORT, VIP, 80)
        for mode, fleet in setup.fleets.items():
            def distributor(calls: int, packet: bytes = packet, fleet: Fleet = fleet) -> float:
                from_tun = fleet.distributor.from_tun
                return _time(lambda: [from_tun(packet) for _ in range(calls)], calls)

            def tm(calls: int, packet: bytes = packet, fleet: Fleet = fleet) -> float:
                datagrams = [fleet.distributor.from_tun(packet).packet for _ in range(calls)]
                from_overlay, peer, now = fleet.nodes[setup.tm].from_overlay, fleet.dist_underlay, fleet.now
                return _time(lambda: [from_overlay(datagram, peer, now) for datagram in datagrams], calls)

            cases[("distributor", size, mode)] = distributor
            cases[("tm", size, mode)] = tm
    return cases


def check(setup: Setup) -> None:
    """What was timed is the accepting path: every packet reached its TM and was answered, none refused."""
    for size in SIZES:
        packet = inner_packet(size, CLIENT, CLIENT_PORT, VIP, 80)
        for mode, fleet in setup.fleets.items():
            verdict = fleet.distributor.from_tun(packet)
            assert (verdict.action, verdict.tm) == ("tm", setup.tm), (mode, size, verdict.reason)
            assert verdict.packet is not None
            action, datagram, _ = fleet.nodes[setup.tm].from_overlay(verdict.packet, fleet.dist_underlay, fleet.now)
            assert action == SEND and isinstance(datagram, bytes), (mode, size)
            answer = fleet.distributor.from_overlay(datagram, fleet.underlay[setup.tm])
            assert (answer.action, answer.reason) == ("forward", "from-tm"), (mode, size, answer.reason)
            server = answer.packet
            assert server is not None and server[16:20] == bytes(map(int, setup.server[0].split(".")))
    for mode, fleet in setup.fleets.items():
        assert not fleet.nodes[setup.tm].drops, (mode, fleet.nodes[setup.tm].drops)
        assert not fleet.distributor.counters_drop, (mode, fleet.distributor.counters_drop)
    for mode, (_, receiver) in setup.pairs.items():
        assert not any(receiver.refused.values()), (mode, receiver.refused)


@dataclass
class Results:
    samples: dict[tuple[str, int, str], list[float]]   # ns per packet, one per round

    def ns(self, case: tuple[str, int, str]) -> float:
        return statistics.median(self.samples[case])

    def ratio(self, case: tuple[str, int, str], baseline: tuple[str, int, str]) -> float:
        return statistics.median(a / b for a, b in zip(self.samples[case], self.samples[baseline]))

    def added(self, case: tuple[str, int, str], baseline: tuple[str, int, str]) -> float:
        return statistics.median(a - b for a, b in zip(self.samples[case], self.samples[baseline]))


def measure(rounds: int = 9, calls: int = 2000) -> Results:
    setup = build()
    try:
        cases = {**primitive_cases(setup), **inside_cases(), **path_cases(setup)}
        names = list(cases)
        samples: dict[tuple[str, int, str], list[float]] = {name: [] for name in names}
        for run in cases.values():   # warm up: first seals derive the keys, first packets fill caches
            run(max(1, calls // 10))
        for index in range(rounds):
            shift = index * len(names) // rounds
            for name in names[shift:] + names[:shift]:
                samples[name].append(cases[name](calls))
        check(setup)
        return Results(samples)
    finally:
        setup.close()


def report(results: Results) -> str:
    rounds = len(next(iter(results.samples.values())))
    lines = [f"ns per packet, median of {rounds} rounds; (×) the median per-round ratio to the plain baseline",
             "", "primitives (GRE payload = inner packet + 8-byte GRE header with key):",
             f"{'inner':>6} {'encapsulate':>12} {'seal auth':>16} {'seal encrypt':>16}"
             f" {'decapsulate':>12} {'open auth':>16} {'open encrypt':>16}"]
    for size in SIZES:
        encap, decap = ("primitive", size, "encapsulate"), ("primitive", size, "decapsulate")
        row = f"{size:6} {results.ns(encap):12.0f}"
        for mode in SEALED:
            case = ("primitive", size, f"seal:{mode}")
            row += f" {results.ns(case):8.0f} ({results.ratio(case, encap):4.1f}×)"
        row += f" {results.ns(decap):12.0f}"
        for mode in SEALED:
            case = ("primitive", size, f"open:{mode}")
            row += f" {results.ns(case):8.0f} ({results.ratio(case, decap):4.1f}×)"
        lines.append(row)
    lines += ["", "inside seal and open: the ChaCha20-Poly1305 call alone (the rest is Python around it)",
              f"{'inner':>6} {'AEAD seal auth':>15} {'AEAD seal encr':>15} {'AEAD open auth':>15} {'AEAD open encr':>15}"]
    for size in SIZES:
        lines.append(f"{size:6}" + "".join(f" {results.ns(('inside', size, f'aead-{op}:{mode}')):15.0f}"
                                           for op in ("seal", "open") for mode in SEALED))
    window, shared = ("inside", 0, "window"), ("inside", 0, "window:shared")
    lines.append(f"replay window, accepting the next counter (every open): one loop's {results.ns(window):.0f}, "
                 f"shared by a node's loops {results.ns(shared):.0f} ({results.ratio(shared, window):.2f}×)")
    lines += ["", "whole sans-I/O paths; +ns: added to the auth-off path; budget: that as a share of one packet's"
              " time at the agent's measured rate", f"{'path':32} {'inner':>6} {'off':>7}"
              f" {'authenticate: ns (×off) +ns budget':>37} {'encrypt: ns (×off) +ns budget':>37}"]
    for path, title in (("distributor", "Distributor.from_tun"), ("tm", "TMNode.from_overlay (DNAT)")):
        budget = 1e9 / AGENT_PPS[path]
        for size in SIZES:
            off = (path, size, "off")
            row = f"{title:32} {size:6} {results.ns(off):7.0f}"
            for mode in SEALED:
                case = (path, size, mode)
                added = results.added(case, off)
                row += (f" {results.ns(case):12.0f} ({results.ratio(case, off):4.2f}×) {added:+6.0f}"
                        f" {added / budget:6.1%}")
            lines.append(row)
    lines += ["", f"bytes added per datagram: {auth.OVERHEAD} (header {auth.HEADER_SIZE}, tag {auth.TAG_SIZE});"
              " on the wire (outer IPv4 + UDP + GRE with key + inner):"]
    for size in SIZES:
        wire = gre.overhead(False, 1) + size
        lines.append(f"{size:6}-byte inner: {wire} → {wire + auth.OVERHEAD} bytes (+{auth.OVERHEAD / wire:.1%})")
    lines.append(f"budget per packet: distributor {1e9 / AGENT_PPS['distributor']:.0f} ns"
                 f" (~{AGENT_PPS['distributor'] // 1000}k pps), TM {1e9 / AGENT_PPS['tm']:.0f} ns"
                 f" (~{AGENT_PPS['tm'] // 1000}k pps), ../shared/PERFORMANCE-NOTES.md")
    return "\n".join(lines)


def sealed_lengths() -> dict[int, tuple[int, int]]:
    """inner size → (GRE payload, sealed datagram) lengths, measured on real seals (both modes add the same)."""
    sender = Authenticator(auth.AuthConfig("encrypt", (auth.generate_private_key(),),
                                           {"peer": (auth.public_key_of(auth.generate_private_key()),)}), 0)
    lengths = {}
    for size in SIZES:
        payload = gre.encapsulate(inner_packet(size, CLIENT, CLIENT_PORT, VIP, 80), key=1)
        lengths[size] = (len(payload), len(sender.seal(payload, "peer")))
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000, help="packets per case per round")
    args = parser.parse_args()
    print(report(measure(args.rounds, args.calls)))
    print("measured: " + ", ".join(f"{size} B inner: GRE payload {plain} → sealed {sealed} (+{sealed - plain})"
                                   for size, (plain, sealed) in sealed_lengths().items()))


if __name__ == "__main__":
    main()
