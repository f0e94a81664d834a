"""`Distributor.from_tun_train` (one decision for the segments of one TSO super-packet) against what it
shortcuts: `from_tun` called on each segment, on a second core built from the same config.

The segments are what the kernel's segmentation makes of random TCP super-packets
(`overlay.runtime.offload.split`: IPv4 and IPv6, IP and TCP options, an IPv6 extension header, any
gso_size), between endpoints of every role (virtual, node, NAT-able, xlate, management, unknown), so some
trains take the fast path and some do not; interleaved with single packets (test_fast_path's mix) and
fleet changes (TMs down and up, draining, disabled, enabled again within `return_grace`: second-chance
marks), under `addr` and `addr+port` hashing, a fleet id, a small underlay MTU, and with `[auth]` on
(sealed per peer, one TM behind NAT). For each train: where `from_tun_train` answers, its `train` is
exactly the datagrams `from_tun` gives for the segments, to the same TM, destination and flow hash; where
it answers None, it counted nothing (the caller then runs `from_tun` per segment). After every step all
counters agree (cells, reasons, TMs, drops, `counters()`), and the snapshots at the end. Negative
controls: three broken `from_tun_train`s (counts a train once, always the unmarked GRE header, counts
and then declines) are each caught by the same comparison.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import gre
from overlay import auth
from overlay.auth import Authenticator
from overlay.config import load_node_config, parse_node_config
from overlay.distributor.core import ACTION_TM, Distributor, Verdict
from overlay.packet import parse_flow
from overlay.runtime import offload
from tests.authconfig import with_auth
from tests.distributor import packets as P
from tests.distributor.configs import reference_text
from tests.distributor.test_fast_path import ADDRESSES_V4, ADDRESSES_V6, fleet, packet_mix

T0 = 1_700_000_000_000_000_000      # both cores' authenticators count from here: their seals are equal
NAT_ENDPOINT = ("198.18.0.7", 40001)   # where tm1's sealed datagrams come from (behind NAT) in the auth variants
CLIENT = "198.51.100.10"
VIP = "203.0.113.80"

# Unknown clients; a virtual address and a node + NAT-able server (reference config).
CLIENTS_V4 = ["198.51.100.10", "198.51.100.77", "192.0.2.99", "198.51.100.200"]
CLIENTS_V6 = ["2001:db8:1::10", "2001:db8:1::99", "2001:db8:1::1234"]
SERVICE_V4, SERVICE_V6 = (VIP, "203.0.113.10"), ("2001:db8:80::80", "2001:db8:2::10")

# Fleet changes, applied to both cores alike between packets.
FLEET_CHANGES = [
    ("up", "tm1", False), ("up", "tm1", True), ("up", "tm2", False), ("up", "tm2", True),
    ("state", "tm2", "draining"), ("state", "tm2", "enabled"), ("state", "tm3", "draining"),
    ("state", "tm3", "disabled"), ("state", "tm3", "enabled"), ("end_return", "tm1", None),
    ("end_return", "tm2", None), ("end_return", "tm3", None), ("bounce", "tm1", None), ("bounce", "tm3", None),
]

VARIANTS = ["reference", "addr+port", "fleet id", "small mtu", "tm down", "draining", "grace", "auth", "encrypt"]


@pytest.fixture(scope="module")
def auth_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference configs with `[auth]` on, once per mode (key files and all)."""
    dirs = {}
    for mode in ("authenticate", "encrypt"):
        path = tmp_path_factory.mktemp(f"auth-{mode}")
        with_auth(path, mode)
        dirs[mode] = path
    return dirs


def cores(variant: str, auth_dirs: dict[str, Path]) -> tuple[Distributor, Distributor]:
    """(the core whose `from_tun_train` is tested, the reference core that gets `from_tun` per segment):
    two instances of one config, in the same fleet state."""
    if variant in ("auth", "encrypt"):
        directory = auth_dirs["authenticate" if variant == "auth" else "encrypt"]
        node = load_node_config(directory / "distributor.toml")
        assert node.distributor is not None
        pair = tuple(Distributor(node.distributor, Authenticator(node.auth, T0)) for _ in range(2))
        # tm1 is heard from elsewhere than its config says (behind NAT): its verdicts go to the learned
        # endpoint, from the well-known port (PINNED flow hash).
        tm1 = load_node_config(directory / "tm1.toml")
        keepalive = Authenticator(tm1.auth, T0).seal(
            gre.encapsulate(b"OVKA" + bytes(28), protocol=gre.KEEPALIVE_PROTOCOL), "dist1")
        for core in pair:
            assert core.from_overlay(keepalive, NAT_ENDPOINT).action == "local"
            assert core.behind_nat("tm1")
        return pair[0], pair[1]
    if variant == "grace":
        text = reference_text().replace('all_down = "drop"', 'all_down = "drop"\nreturn_grace = 5')
        assert "return_grace" in text
        node = parse_node_config(text, "distributor.toml")
        assert node.distributor is not None
        pair = Distributor(node.distributor), Distributor(node.distributor)
        for core in pair:
            change_fleet(core, ("bounce", "tm2", None))     # tm2 is back: returning, its rows marked
        return pair
    return fleet(variant)[0], fleet(variant)[0]     # test_fast_path's variants; [0] is the plain Distributor


def super_packet(rng: random.Random, src: str, sport: int, dst: str, dport: int, *, gso_size: int,
                 segments: int, last: int, flags: int = P.TCP_ACK, tcp_options: bool = False,
                 ip_options: bool = False, extension: bool = False) -> tuple[bytes, bytes]:
    """(vnet header, packet) of one TSO read: `segments` of `gso_size` bytes of payload, the last `last`
    bytes (the TCP checksum is dpkt's: `split` computes every segment's own, as the kernel does)."""
    payload = rng.randbytes(gso_size * (segments - 1) + last)
    opts = b"\x01\x01\x08\x0a" + rng.randbytes(8) if tcp_options else b""
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                       win=502, opts=opts, data=payload)
    tcp.off = 5 + len(opts) // 4
    if P.version_of(src) == 4:
        options = b"\x01\x01\x01\x00" if ip_options else b""
        packet = P.ipv4(src, dst, 6, tcp, df=True, ident=rng.getrandbits(16), options=options)
        l4, kind = 20 + len(options), offload.GSO_TCPV4
    else:
        extensions = ((P.DEST_OPTS, b"\x01\x02\x00\x00"),) if extension else ()
        packet = P.ipv6(src, dst, 6, tcp, extensions=extensions)
        l4, kind = 40 + (8 if extension else 0), offload.GSO_TCPV6
    header = offload.VNET_HEADER.pack(offload.F_NEEDS_CSUM, kind, l4 + 20 + len(opts), gso_size, l4, 16)
    return header, packet


def segments_of(header: bytes, packet: bytes, count: int) -> list[bytes]:
    segments = offload.split(header, packet)
    assert isinstance(segments, list) and len(segments) == count, segments
    return segments


@st.composite
def train(draw: st.DrawFn) -> list[bytes]:
    """The segments of one random super-packet."""
    v6 = draw(st.booleans())
    if draw(st.booleans()):      # any two addresses of any roles (most pairs do not hash: the full path)
        addresses = ADDRESSES_V6 if v6 else ADDRESSES_V4
        src, dst = draw(st.sampled_from(addresses)), draw(st.sampled_from(addresses))
    else:                        # a client's upload to a service, or a server's download to a client (hashing)
        clients = CLIENTS_V6 if v6 else CLIENTS_V4
        service, server = SERVICE_V6 if v6 else SERVICE_V4
        client = draw(st.sampled_from(clients))
        src, dst = draw(st.sampled_from([(client, service), (server, client)]))
    ports = st.integers(1, 65535)
    # 1220+ no longer fits a 1280-byte underlay once encapsulated (the "small mtu" variant declines those).
    gso_size = draw(st.sampled_from([536, 1000, 1208, 1220, 1348, 1448]))
    count = draw(st.integers(1, 10))
    flags = P.TCP_ACK | draw(st.sampled_from([0, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN | dpkt.tcp.TH_PUSH,
                                              dpkt.tcp.TH_CWR | dpkt.tcp.TH_ECE]))
    header, packet = super_packet(
        random.Random(draw(st.integers(0, 2**32))), src, draw(ports), dst, draw(ports), gso_size=gso_size,
        segments=count, last=draw(st.integers(1, gso_size)), flags=flags, tcp_options=draw(st.booleans()),
        ip_options=draw(st.integers(0, 5)) == 0, extension=draw(st.integers(0, 5)) == 0)
    return segments_of(header, packet, count)


@st.composite
def step(draw: st.DrawFn) -> tuple[str, object]:
    kind = draw(st.sampled_from(["train"] * 6 + ["packet", "packet", "fleet"]))
    if kind == "train":
        return kind, draw(train())
    if kind == "packet":
        return kind, draw(packet_mix())
    return kind, draw(st.sampled_from(FLEET_CHANGES))


def counted(core: Distributor) -> tuple:
    return (dict(core.counters_cell), dict(core.counters_reason), dict(core.counters_tm),
            dict(core.counters_drop), core.counters())


def change_fleet(core: Distributor, change: tuple) -> None:
    kind, name, value = change
    if kind == "up":
        core.set_tm_up(name, value)
    elif kind == "state":
        core.set_tm_state(name, value)
    elif kind == "bounce":       # down and up again: within return_grace its rows are shared (marks)
        core.set_tm_up(name, False)
        core.set_tm_up(name, True)
    else:
        core.end_return(name)


def mark_of(core: Distributor, datagram: bytes) -> int | None:
    """The second-chance mark a TM datagram carries (None where it is sealed and encrypted)."""
    if core.auth is not None:
        if core.auth.mode == "encrypt":
            return None
        datagram = datagram[auth.HEADER_SIZE:-auth.TAG_SIZE]    # authenticate: header, GRE payload, tag
    frame = gre.decapsulate(datagram)
    assert frame is not None
    return gre.key_fallback(frame.key)


def compare(fast: Distributor, reference: Distributor, steps: list[tuple[str, object]], passes: int = 2) -> dict[str, int]:
    """Run `steps` through both cores (`from_tun_train` on `fast`, `from_tun` per segment on `reference`),
    asserting at every step; returns how often each kind of train occurred (what the mix exercised).
    Twice by default: the second time every address's roles are cached (the fast path's condition)."""
    seen = {"verdict": 0, "declined": 0, "multi-segment verdict": 0, "marked verdict": 0, "pinned verdict": 0}
    for kind, item in steps * passes:
        if kind == "fleet":
            change_fleet(fast, item)      # type: ignore[arg-type]
            change_fleet(reference, item)  # type: ignore[arg-type]
        elif kind == "packet":
            assert dataclasses.astuple(fast.from_tun(item)) == dataclasses.astuple(reference.from_tun(item))  # type: ignore[arg-type]
        else:
            segments: list[bytes] = item  # type: ignore[assignment]
            before = counted(fast)
            verdict = fast.from_tun_train(segments)
            expected = [reference.from_tun(segment) for segment in segments]
            if verdict is None:
                assert counted(fast) == before, "from_tun_train declined the train but counted something"
                # The caller's fallback (packet_path.from_tun_train): each segment its own decision.
                for segment, want in zip(segments, expected):
                    assert dataclasses.astuple(fast.from_tun(segment)) == dataclasses.astuple(want)
                seen["declined"] += 1
            else:
                assert verdict.action == ACTION_TM and verdict.packet is None and verdict.fanout is None
                assert verdict.train is not None and len(verdict.train) == len(segments)
                for index, want in enumerate(expected):
                    got = (verdict.action, verdict.tm, verdict.reason, verdict.cell, verdict.train[index],
                           verdict.dest, verdict.flow_hash)
                    assert got == (want.action, want.tm, want.reason, want.cell, want.packet, want.dest,
                                   want.flow_hash), f"segment {index} of {len(segments)}"
                seen["verdict"] += 1
                seen["multi-segment verdict"] += len(segments) > 1
                seen["marked verdict"] += bool(mark_of(fast, verdict.train[0]))
                seen["pinned verdict"] += verdict.flow_hash < 0
        assert counted(fast) == counted(reference)
    assert fast.snapshot() == reference.snapshot()
    return seen


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=60 if os.environ.get("CI") == "true" else 6, deadline=None, derandomize=True)
@given(steps=st.lists(step(), min_size=1, max_size=30), warm=st.booleans())
def test_one_decision_for_a_train_is_what_each_segment_would_get(variant: str, steps: list, warm: bool,
                                                                 auth_dirs: dict[str, Path]) -> None:
    fast, reference = cores(variant, auth_dirs)
    if warm:
        for core in (fast, reference):   # every address's roles cached (counts nothing): trains hash at once
            for address in {*ADDRESSES_V4, *ADDRESSES_V6, *CLIENTS_V4, *CLIENTS_V6}:
                core.roles(P.version_of(address), P.packed(address), 6, None)
    compare(fast, reference, steps)


# -- a fixed mix that exercises every kind of train: what the property above is known to cover ---------------

def fixed_mix(seed: int = 7) -> list[tuple[str, object]]:
    """Clients → the VIP (hash src) and the server's replies to them (hash dst), v4 and v6, two trains of
    1..8 segments per pair (the first finds its roles uncached: declined; the second takes the fast path),
    and management and xlate destinations (never the fast path), while tm3 drains (marks); then every TM
    is down (no TM: declined). Run once (`passes=1`)."""
    rng = random.Random(seed)
    steps: list[tuple[str, object]] = [("fleet", ("state", "tm3", "draining"))]
    pairs = []
    for n in range(1, 41):
        pairs.append((f"198.51.100.{n}", VIP))
        pairs.append(("203.0.113.10", f"198.51.100.{n}"))
        pairs.append((f"2001:db8:1::{n:x}", "2001:db8:80::80"))
    pairs += [(CLIENT, "203.0.113.201"), (CLIENT, "203.0.113.101"), ("2001:db8:1::10", "2001:db8:ee::101")]
    for src, dst in pairs:
        for _ in range(2):
            count = rng.randint(1, 8)
            gso_size = rng.choice([1000, 1448])
            dport = 80 if dst in (VIP, "2001:db8:80::80") else 443
            header, packet = super_packet(rng, src, rng.randint(1024, 65535), dst, dport, gso_size=gso_size,
                                          segments=count, last=rng.randint(1, gso_size))
            steps.append(("train", segments_of(header, packet, count)))
    steps += [("fleet", ("up", name, False)) for name in ("tm1", "tm2", "tm3")]
    header, packet = super_packet(rng, CLIENT, 40000, VIP, 80, gso_size=1448, segments=4, last=100)
    steps.append(("train", segments_of(header, packet, 4)))
    return steps


@pytest.mark.parametrize("variant", ["reference", "auth"])
def test_the_fixed_mix_exercises_every_kind_of_train(variant: str, auth_dirs: dict[str, Path]) -> None:
    """Not a comparison that cannot fail for want of cases: fast-path trains of several segments, marked
    ones (second chance to the draining TM), ones sealed to a TM behind NAT, and declined ones all occur."""
    fast, reference = cores(variant, auth_dirs)
    seen = compare(fast, reference, fixed_mix(), passes=1)
    assert seen["multi-segment verdict"] >= 20 and seen["marked verdict"] >= 3 and seen["declined"] >= 8, seen
    if variant == "auth":
        assert seen["pinned verdict"] >= 1, seen
    assert fast.counters_reason["no-tm"] > 0, "the all-down train was decided (and counted) on the full path"


# -- negative controls: a broken from_tun_train is caught -------------------------------------------------------

def counted_once(self: Distributor, segments: list[bytes]) -> Verdict | None:
    """Broken: the fast path's verdict for the head serves the train, but the train counts as one packet."""
    flow = parse_flow(segments[0])
    if isinstance(flow, str):
        return None
    fast = self._fast_tm(flow, segments[0])
    if fast is None:
        return None
    tm, cell, cell_name, value, header = fast
    return Verdict(ACTION_TM, tm, cell, cell_name, None, self._tm_dest[tm], value,
                   train=[header + segment for segment in segments])


def always_unmarked(self: Distributor, segments: list[bytes]) -> Verdict | None:
    """Broken: counted right, but every segment behind the unmarked GRE header (no second chance)."""
    verdict = ORIGINAL(self, segments)
    if verdict is not None:
        assert verdict.train is not None
        unmarked = self._gre_headers[segments[0][0] >> 4 == 6]
        verdict.train = [unmarked + segment for segment in segments]
    return verdict


def counts_then_declines(self: Distributor, segments: list[bytes]) -> Verdict | None:
    """Broken: decides (and counts) the head on the fast path, then hands the train back anyway."""
    flow = parse_flow(segments[0])
    if not isinstance(flow, str):
        self._fast_tm(flow, segments[0])
    return None


ORIGINAL = Distributor.from_tun_train


@pytest.mark.parametrize("broken", [counted_once, always_unmarked, counts_then_declines], ids=lambda f: f.__name__)
def test_negative_control_a_broken_train_path_is_caught(broken: Callable, monkeypatch: pytest.MonkeyPatch,
                                                        auth_dirs: dict[str, Path]) -> None:
    steps = fixed_mix()
    fast, reference = cores("reference", auth_dirs)
    compare(fast, reference, steps, passes=1)    # the real one passes on this very mix
    monkeypatch.setattr(Distributor, "from_tun_train", broken)
    fast, reference = cores("reference", auth_dirs)
    with pytest.raises(AssertionError):
        compare(fast, reference, steps, passes=1)
