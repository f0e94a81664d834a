"""Overlaps among many address entries: `first_overlap_within` and `first_overlap_between` find exactly
what comparing every pair finds (the brute-force oracle below, which is how `[sets]` used to be checked),
in O(n log n) instead of O(n^2). The timing of a 150,000-entry config is a benchmark that only reports.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.addrsets import AddressEntry, PortRange, SortedEntries, first_overlap_between, first_overlap_within
from overlay.config import parse_node_config

REFERENCE = Path(__file__).resolve().parents[1] / "config" / "distributor.toml"


def brute_within(entries: list[AddressEntry]) -> tuple[int, int] | None:
    for i, entry in enumerate(entries):
        for j in range(i):
            if entries[j].overlaps(entry):
                return i, j
    return None


def brute_between(left: list[AddressEntry], right: list[AddressEntry]) -> tuple[int, int] | None:
    for i, entry in enumerate(left):
        for j, other in enumerate(right):
            if entry.overlaps(other):
                return i, j
    return None


# A small address space (16 IPv4 and 16 IPv6 addresses, every prefix length down to /28 or /124) and a small
# port space, so that nesting, equal prefixes and partial port overlaps are all common.
@st.composite
def entries(draw: st.DrawFn) -> AddressEntry:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    base = int(ipaddress.ip_address("10.0.0.0" if version == 4 else "2001:db8::"))
    length = draw(st.integers(bits - 4, bits))
    network = ipaddress.ip_network((base + draw(st.integers(0, 15)), length), strict=False)
    protocol = draw(st.sampled_from([None, None, 6, 17]))
    ports = None
    if draw(st.booleans()):
        ranges = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 10)), min_size=1, max_size=3))
        ports = tuple(PortRange(low, low + width) for low, width in ranges)
    return AddressEntry(network, protocol, ports)


@settings(max_examples=400 if os.environ.get("CI") == "true" else 100, deadline=None)
@given(st.lists(entries(), max_size=12))
def test_within_finds_what_every_pair_finds(items: list[AddressEntry]) -> None:
    assert first_overlap_within(SortedEntries(items)) == brute_within(items)


@settings(max_examples=400 if os.environ.get("CI") == "true" else 100, deadline=None)
@given(st.lists(entries(), max_size=8), st.lists(entries(), max_size=8))
def test_between_finds_what_every_pair_finds(left: list[AddressEntry], right: list[AddressEntry]) -> None:
    assert first_overlap_between(SortedEntries(left), SortedEntries(right)) == brute_between(left, right)


def host(number: int, **narrowing: object) -> AddressEntry:
    return AddressEntry(ipaddress.ip_network(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}/32"), **narrowing)


def test_the_first_offender_and_its_first_partner_are_named() -> None:
    """Not just some overlapping pair: the smallest i, then the smallest j, as the nested loops report."""
    items = [host(n) for n in range(2000)] + [AddressEntry(ipaddress.ip_network("10.0.4.0/24")), host(1500), host(3)]
    assert first_overlap_within(SortedEntries(items)) == (2000, 1024)
    assert first_overlap_between(SortedEntries([host(7), host(3)]), SortedEntries([host(n) for n in range(10)])) == (0, 7)


def test_port_blocks_of_one_address_are_checked_per_block() -> None:
    tcp = 6
    blocks = [host(1, protocol=tcp, ports=(PortRange(1024 + 10 * n, 1033 + 10 * n),)) for n in range(3000)]
    assert first_overlap_within(SortedEntries(blocks)) is None
    blocks.append(host(1, protocol=tcp, ports=(PortRange(20000, 20000),)))  # inside block 1897
    assert first_overlap_within(SortedEntries(blocks)) == (3000, 1897)
    assert first_overlap_within(SortedEntries(blocks[:-1] + [host(1, protocol=17)])) is None  # another protocol


def big_distributor(entries: int) -> str:
    """The reference distributor with `entries` more servers: half as prefixes in `node`, half as
    (protocol, ports) tables in `nat_able` (~6 MB at 150,000)."""
    addresses = [ipaddress.ip_address(0x0A000000 + n) for n in range(entries // 2)]
    servers = {
        "node": ",\n  ".join(f'"{address}/32"' for address in addresses),
        "nat_able": ",\n  ".join(f'{{ prefix = "{address}/32", protocol = "tcp", ports = "80,443" }}' for address in addresses),
    }
    text = REFERENCE.read_text()
    for key, listed in servers.items():
        old = f'{key} = ["203.0.113.10/31", "2001:db8:2::10/127"]'
        text = text.replace(old, f'{key} = ["203.0.113.10/31", "2001:db8:2::10/127",\n  {listed}]')
    return text


# The 150,000 entries in CI; 30,000 in the fast suite, which the quadratic check would still hold
# for many minutes (it took 48.8 s for 8,000).
BIG = 150_000 if os.environ.get("CI") == "true" else 30_000


@pytest.mark.benchmark
def test_a_150k_entry_config_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """Reports the time to parse and check a distributor config of BIG set entries (was hours for 150,000)."""
    text = big_distributor(BIG)
    start = time.perf_counter()
    config = parse_node_config(text, "big.toml")
    elapsed = time.perf_counter() - start
    assert config.distributor is not None and len(config.distributor.sets["node"]) == BIG // 2 + 2
    with capsys.disabled():
        print(f"\n{BIG:,} set entries, {len(text) / 1e6:.1f} MB: parsed and checked in {elapsed:.2f} s")
