"""Fuzz the parsers and both cores: no input makes them raise, and every answer is well formed.

Targets: `overlay.packet.parse_flow`, `overlay.tm.packet.parse_ip` / `parse_fragment` / `parse_transport`,
`overlay.gre.decapsulate`, `Distributor.from_tun` / `from_overlay` (from a TM, an edge and a stranger),
`TrafficManager.receive` (unmarked, second and last chance) / `from_local`, on a TM that holds state.

Inputs: the corpus (tests/fuzz/corpus/{ip,gre}/*.hex, one packet in hex per file), replayed in full on
every run; random bytes; and the corpus mutated (bytes set, inserted, deleted, cut, length fields fixed
up so a mutation gets past the length checks). The `fuzz` tests take a few derandomized examples in the
fast suite and fresh random ones for OVERLAY_FUZZ_SECONDS in CI (tests/fuzz/conftest.py). An input that
fails is printed in hex: save it as a corpus file and it is replayed from then on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import gre
from overlay.distributor.core import Distributor, Verdict
from overlay.packet import Flow, parse_flow
from overlay.tm import reasons as R
from overlay.tm.core import LAST_CHANCE, SECOND_CHANCE, UNMARKED, TMResult, TrafficManager
from overlay.tm.packet import IcmpError, parse_fragment, parse_ip, parse_transport
from tests.distributor.configs import CELLS, distributor, with_tables
from tests.distributor.test_paths import EDGE, EDGES, TM1
from tests.tm.conftest import lab_config_with_dns

CORPUS = Path(__file__).resolve().parent / "corpus"
FAST_EXAMPLES = 100  # per fuzz test in the fast suite; CI runs for its time budget instead
ROUND_EXAMPLES = 200  # CI: one hypothesis run per round (a few seconds), fresh random examples each
STRANGER = ("192.0.2.99", 4754)
NOW = 10.0

DISTRIBUTOR: Distributor = distributor(with_tables(CELLS, EDGES))
TM_CONFIG = lab_config_with_dns()


def corpus(kind: str) -> dict[str, bytes]:
    return {path.name: bytes.fromhex(path.read_text()) for path in sorted((CORPUS / kind).glob("*.hex"))}


IP_CORPUS, GRE_CORPUS = corpus("ip"), corpus("gre")
# A TM with state for some of the corpus's connections, so mutated packets also reach the lookups and
# rewrites. One SNAT opener only: each protocol's first SNAT builds a port queue (~10 ms a fresh TM).
OPENERS = [IP_CORPUS[f"seed-{name}.hex"] for name in ("v4-tcp-syn-to-vip", "v6-tcp-syn-to-vip", "v4-udp-snat-out")]


# -- what every answer must look like ------------------------------------------------------------------------
def check_verdict(verdict: Verdict) -> None:
    assert verdict.action in ("tm", "forward", "local", "drop")
    assert (verdict.packet is None) == (verdict.action == "drop") and verdict.reason
    assert verdict.action != "tm" or verdict.dest is not None


def check_tm_result(result: TMResult) -> None:
    assert result.reason in R.ALL_REASONS
    assert result.action in ("overlay", "local", "drop", "bounce", "decline", "hold")
    assert (result.packet is not None) == (result.action in ("overlay", "local"))


def check_tm_parsers(packet: bytes) -> None:
    parsed = parse_ip(packet)
    if parsed == R.FRAGMENT:  # not a reason: the signal to ask parse_fragment
        fragment = parse_fragment(packet)
        assert isinstance(fragment, tuple) or fragment in R.ALL_REASONS
        return
    if isinstance(parsed, str):
        assert parsed in R.ALL_REASONS
        return
    transport = parse_transport(packet, *parsed)
    assert isinstance(transport, (tuple, IcmpError)) or transport in R.ALL_REASONS


def through_ip_targets(packet: bytes) -> None:
    """An inner IP packet, as the distributor's TUN and a TM (from the overlay, from its host) see it."""
    flow = parse_flow(packet)
    assert isinstance(flow, Flow) or flow.startswith("malformed:")
    check_tm_parsers(packet)
    check_verdict(DISTRIBUTOR.from_tun(packet))
    tm = TrafficManager(TM_CONFIG)
    for opener in OPENERS:
        tm.receive(opener, 0.0)
    for mark in (UNMARKED, SECOND_CHANCE, LAST_CHANCE):
        check_tm_result(tm.receive(packet, NOW, mark))
    check_tm_result(tm.from_local(packet, NOW))


def through_overlay_targets(payload: bytes) -> None:
    """A GRE-in-UDP payload, as the distributor gets it from each kind of peer; its inner packet as a TM does."""
    frame = gre.decapsulate(payload)
    assert frame is None or payload.endswith(frame.inner)
    for peer in (TM1, EDGE, STRANGER):
        check_verdict(DISTRIBUTOR.from_overlay(payload, peer))
    if frame is not None:
        through_ip_targets(frame.inner)


def never_raises(target: Callable[[bytes], None], packet: bytes, kind: str) -> None:
    try:
        target(packet)
    except Exception as exc:
        raise AssertionError(f"{target.__name__} failed on {packet.hex()}: keep it as tests/fuzz/corpus/{kind}/NAME.hex") from exc


# -- inputs ----------------------------------------------------------------------------------------------------
def fix_lengths(packet: bytearray) -> None:
    """Make the IP length field agree with the bytes, so the mutation is judged past the length checks."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        packet[2:4] = min(len(packet), 0xFFFF).to_bytes(2, "big")
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        packet[4:6] = min(len(packet) - 40, 0xFFFF).to_bytes(2, "big")


@st.composite
def mutations(draw: st.DrawFn, seeds: st.SearchStrategy[bytes]) -> bytes:
    packet = bytearray(draw(seeds))
    for _ in range(draw(st.integers(0, 4))):
        # Headers are where parsers decide: most edits land in the first 64 bytes.
        at = draw(st.integers(0, min(len(packet), 64)) | st.integers(0, len(packet)))
        edit = draw(st.sampled_from(("set", "insert", "delete", "cut")))
        if edit == "set" and at < len(packet):
            packet[at] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFF)) | st.integers(0, 255))
        elif edit == "insert":
            packet[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del packet[at:at + draw(st.integers(1, 16))]
        else:
            del packet[at:]
    if draw(st.booleans()):
        fix_lengths(packet)
    return bytes(packet)


random_ip = st.tuples(st.sampled_from((b"", b"\x45", b"\x46", b"\x60")), st.binary(max_size=200)).map(b"".join)
mutated_ip = mutations(st.sampled_from(list(IP_CORPUS.values())))
gre_headers = st.builds(
    gre.encapsulate,
    mutated_ip,
    key=st.none() | st.integers(0, 0xFFFFFFFF),
    protocol=st.none() | st.sampled_from((gre.PROTO_IPV4, gre.PROTO_IPV6, gre.KEEPALIVE_PROTOCOL,
                                          gre.SECOND_CHANCE_PROTOCOL, gre.DECLINED_PROTOCOL, 0x6558)),
)
overlay_payloads = mutations(st.sampled_from(list(GRE_CORPUS.values())) | gre_headers) | st.binary(max_size=64)


def fuzz(seconds: float, target: Callable[[bytes], None], inputs: st.SearchStrategy[bytes], kind: str) -> None:
    """FAST_EXAMPLES derandomized examples when `seconds` is 0, else rounds of fresh random ones until
    `seconds` have passed. Only the amount of search depends on the clock, never a verdict."""

    def attempt(packet: bytes) -> None:
        never_raises(target, packet, kind)

    if not seconds:
        settings(max_examples=FAST_EXAMPLES)(given(inputs)(attempt))()
        return
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        settings(max_examples=ROUND_EXAMPLES, derandomize=False, database=None)(given(inputs)(attempt))()


# -- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(IP_CORPUS))
def test_ip_corpus_replays(name: str) -> None:
    never_raises(through_ip_targets, IP_CORPUS[name], "ip")


@pytest.mark.parametrize("name", sorted(GRE_CORPUS))
def test_gre_corpus_replays(name: str) -> None:
    never_raises(through_overlay_targets, GRE_CORPUS[name], "gre")


def test_corpus_seeds_reach_deep() -> None:
    """A fuzz seed is worth mutating only if it gets past the parsers: the valid seeds do."""
    for name, packet in IP_CORPUS.items():
        if name.startswith("seed-") and "fragment" not in name and "routing" not in name:
            assert isinstance(parse_flow(packet), Flow) and not isinstance(parse_ip(packet), str), name


@pytest.mark.parametrize("name", [name for name in sorted(IP_CORPUS) if "fragment" in name])
def test_from_local_on_a_fragment_never_raises(name: str) -> None:
    check_tm_result(TrafficManager(TM_CONFIG).from_local(IP_CORPUS[name], NOW))


@pytest.mark.fuzz
def test_fuzz_random_bytes(fuzz_seconds: float) -> None:
    fuzz(fuzz_seconds, through_ip_targets, random_ip, "ip")


@pytest.mark.fuzz
def test_fuzz_mutated_ip_packets(fuzz_seconds: float) -> None:
    fuzz(fuzz_seconds, through_ip_targets, mutated_ip, "ip")


@pytest.mark.fuzz
def test_fuzz_mutated_overlay_payloads(fuzz_seconds: float) -> None:
    fuzz(fuzz_seconds, through_overlay_targets, overlay_payloads, "gre")
