"""The distributor's fast path (`Distributor.from_tun` for cached roles, hashing cells, a row with a TM)
against the full path it shortcuts (`_apply(flow, packet, decide(flow))`), packet by packet: the same
verdict — action, TM, reason, cell, bytes, destination, flow hash — and the same counters, over random
packet mixes from every role, in the states that change the answer (a TM down, one draining, a fleet id,
`addr+port` hashing, a small underlay MTU)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.config import parse_node_config
from overlay.distributor.core import Distributor, Verdict
from overlay.packet import parse_flow
from tests.distributor import packets as P
from tests.distributor.configs import reference_text

# Addresses of every role in the reference config (virtual, node, nat-able, xlate, management, unknown).
ADDRESSES_V4 = ["203.0.113.80", "203.0.113.10", "203.0.113.11", "203.0.113.101", "203.0.113.102", "203.0.113.201",
                "198.51.100.10", "198.51.100.77", "192.0.2.99"]
ADDRESSES_V6 = ["2001:db8:80::80", "2001:db8:2::10", "2001:db8:ee::101", "2001:db8:1::10", "2001:db8:1::99"]


class PlainPath(Distributor):
    """The same core without the fast path: every packet through `decide` and `_apply`."""

    def from_tun(self, packet: bytes) -> Verdict:
        flow = parse_flow(packet)
        if isinstance(flow, str):
            return self._drop(flow)
        return self._apply(flow, packet, self.decide(flow))


def fleet(variant: str) -> tuple[Distributor, Distributor]:
    text = reference_text()
    if variant == "addr+port":
        text = text.replace('key = "addr"', 'key = "addr+port"')
    if variant == "fleet id":
        text = text.replace("mtu = 1500", "mtu = 1500\ngre_key = 77")
    if variant == "small mtu":
        text = text.replace("mtu = 1500", "mtu = 1280")
    node = parse_node_config(text, "distributor.toml")
    assert node.distributor is not None
    cores = Distributor(node.distributor), PlainPath(node.distributor)
    for core in cores:
        if variant == "tm down":
            core.set_tm_up("tm2", False)
        if variant == "draining":
            core.set_tm_state("tm3", "draining")
    return cores


@st.composite
def packet_mix(draw: st.DrawFn) -> bytes:
    addresses = draw(st.sampled_from([ADDRESSES_V4, ADDRESSES_V6]))
    src, dst = draw(st.sampled_from(addresses)), draw(st.sampled_from(addresses))
    ports = st.integers(1, 65535)
    kind = draw(st.sampled_from(["tcp", "tcp", "udp", "echo", "big"]))
    if kind == "tcp":
        return P.tcp(src, draw(ports), dst, draw(ports), draw(st.sampled_from([P.TCP_SYN, P.TCP_ACK])))
    if kind == "udp":
        return P.udp(src, draw(ports), dst, draw(ports), draw(st.binary(max_size=40)))
    if kind == "echo":
        return P.echo(src, dst, draw(ports))
    return P.udp(src, draw(ports), dst, 53, bytes(draw(st.integers(1200, 1480))))   # near the MTU


def fields(verdict: Verdict) -> tuple:
    return dataclasses.astuple(verdict)


@pytest.mark.parametrize("variant", ["reference", "addr+port", "fleet id", "small mtu", "tm down", "draining"])
@settings(max_examples=60 if os.environ.get("CI") == "true" else 15, deadline=None, derandomize=True)
@given(mix=st.lists(packet_mix(), min_size=1, max_size=40))
def test_the_fast_path_gives_exactly_what_the_full_path_gives(variant: str, mix: list[bytes]) -> None:
    fast, plain = fleet(variant)
    for packet in mix + mix:         # twice: the second time every address's roles are cached
        assert fields(fast.from_tun(packet)) == fields(plain.from_tun(packet)), packet.hex()
    assert fast.counters() == plain.counters()
    assert fast.snapshot() == plain.snapshot()


def test_the_fast_path_is_taken() -> None:
    """Not a test that cannot fail: the shortcut must actually be used for a cached hashing packet."""
    fast, _ = fleet("reference")
    packet = P.tcp("198.51.100.10", 40000, "203.0.113.80", 80)
    fast.from_tun(packet)                           # caches both endpoints' roles
    decided: list[int] = []
    original = fast.decide
    fast.decide = lambda flow: decided.append(1) or original(flow)   # type: ignore[method-assign]
    verdict = fast.from_tun(packet)
    assert verdict.action == "tm" and decided == []
