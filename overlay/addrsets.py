"""Address sets narrowed by protocol and ports, and a prefix index that answers "which entries contain
this (address, protocol, port)?" in a few dict lookups — one per distinct prefix length in use.

A port-narrowed entry matches a packet whose port is unknown (a non-first fragment): the fragment then
classifies like the first fragment of its flow, which keeps both on the same TM.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from overlay.configlib import IPNetwork

V = TypeVar("V")

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132}


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    def overlaps(self, other: PortRange) -> bool:
        return self.low <= other.high and other.low <= self.high


@dataclass(frozen=True, slots=True)
class AddressEntry:
    """One prefix, optionally narrowed to a protocol and to port ranges."""

    network: IPNetwork
    protocol: int | None = None
    ports: tuple[PortRange, ...] | None = None

    def __str__(self) -> str:
        text = str(self.network)
        if self.protocol is not None:
            names = {number: name for name, number in PROTOCOL_NUMBERS.items()}
            text += f" {names.get(self.protocol, self.protocol)}"
        if self.ports:
            text += " ports " + ",".join(str(r) for r in self.ports)
        return text

    def matches(self, protocol: int, port: int | None) -> bool:
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.ports is None or port is None:
            return True
        return any(r.low <= port <= r.high for r in self.ports)

    def overlaps(self, other: AddressEntry) -> bool:
        """True when some (address, protocol, port) is in both entries."""
        if self.network.version != other.network.version or not self.network.overlaps(other.network):
            return False
        if self.protocol is not None and other.protocol is not None and self.protocol != other.protocol:
            return False
        if self.ports is None or other.ports is None:
            return True
        return any(a.overlaps(b) for a in self.ports for b in other.ports)


# -- overlaps among many entries ---------------------------------------------------------------------
# A set may hold 150,000 entries, and comparing every pair is then 10^10 `overlaps` calls. Two entries
# overlap exactly when their prefixes nest (prefixes of one family never partly overlap) and their
# (protocol, port) spaces meet. So entries are sorted by address, a sweep keeps the chain of prefixes that
# contain the current one (at most 33 or 129 deep: one per prefix length), and each prefix carries the
# union of its entries' (protocol, port) spaces as sorted disjoint intervals of `protocol * 65536 + port`.
# The (protocol, port) space of an entry is what `AddressEntry.overlaps` compares, for entries as parsed:
# `ports`, when given, are non-empty ranges with low <= high.

_PORTS = 65536
_ANY = ((0, 256 * _PORTS - 1),)

Spans = tuple[tuple[int, int], ...]


def _key_space(entry: AddressEntry) -> Spans:
    protocols = range(256) if entry.protocol is None else (entry.protocol,)
    if entry.ports is None:
        return _ANY if entry.protocol is None else ((entry.protocol * _PORTS, entry.protocol * _PORTS + _PORTS - 1),)
    return _merge([(p * _PORTS + r.low, p * _PORTS + r.high) for p in protocols for r in entry.ports])


def _merge(spans: list[tuple[int, int]]) -> Spans:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _meets(a: Spans, b: Spans) -> bool:
    """Do two sorted disjoint interval lists intersect? O(short × log long)."""
    if len(a) > len(b):
        a, b = b, a
    for low, high in a:
        # The last interval of `b` starting at or before `high` ends latest of those that could meet.
        index = bisect.bisect_right(b, (high, math.inf)) - 1
        if index >= 0 and b[index][1] >= low:
            return True
    return False


def _internal_overlap(members: list[Spans]) -> bool:
    """Do the (protocol, port) spaces of two entries with the same prefix meet?"""
    reach = -1
    for low, high in sorted(span for spans in members for span in spans):
        if low <= reach:  # an entry's own spans are disjoint and apart: `reach` is another entry's
            return True
        reach = max(reach, high)
    return False


class SortedEntries:
    """A list of entries sorted by address once, each with its (protocol, port) space: the input of the
    overlap checks below, built once per set however many checks the set takes part in."""

    def __init__(self, entries: Sequence[AddressEntry]):
        self.entries = tuple(entries)
        self.items = sorted(_item(index, entry) for index, entry in enumerate(self.entries))


def _item(index: int, entry: AddressEntry) -> tuple[int, int, int, int, Spans]:
    """(version, first address, -last address, index, spans): sorted, enclosing prefixes come first."""
    network = entry.network
    first = int(network.network_address)
    last = first + (1 << (network.max_prefixlen - network.prefixlen)) - 1  # broadcast_address is 10x slower
    return network.version, first, -last, index, _key_space(entry)


_PREFIX = operator.itemgetter(0, 1, 2)


class _Sweep:
    """One list (`within`: pairs of its entries) or two (`between`: pairs across them) in address order;
    `overlap(limit)` says whether a pair overlaps once the first list is cut to its first `limit` entries."""

    def __init__(self, first: SortedEntries, second: SortedEntries | None = None):
        self._within = second is None
        # Merging two sorted runs: Timsort finds them, so this is linear.
        self._items = sorted([(*item[:3], 0, *item[3:]) for item in first.items] +
                             [(*item[:3], 1, *item[3:]) for item in (second.items if second else ())])

    def overlap(self, limit: int) -> bool:
        chain: list[tuple[int, int, tuple[Spans, Spans]]] = []  # (version, last address, spans per side) of enclosing prefixes
        for (version, first, negative_last), group in itertools.groupby(self._items, key=_PREFIX):
            members: tuple[list[Spans], list[Spans]] = ([], [])
            for _, _, _, side, index, spans in group:
                if side == 1 or index < limit:
                    members[side].append(spans)
            if not members[0] and not members[1]:
                continue
            if self._within and len(members[0]) > 1 and _internal_overlap(members[0]):
                return True
            union = (_union(members[0]), _union(members[1]))
            if not self._within and _meets(union[0], union[1]):
                return True
            while chain and (chain[-1][0] != version or chain[-1][1] < first):
                chain.pop()
            for _, _, enclosing in chain:
                if self._within and _meets(enclosing[0], union[0]):
                    return True
                if not self._within and (_meets(enclosing[0], union[1]) or _meets(enclosing[1], union[0])):
                    return True
            chain.append((version, -negative_last, union))
        return False


def _union(members: list[Spans]) -> Spans:
    if len(members) <= 1:
        return members[0] if members else ()
    return _merge([span for spans in members for span in spans])


def _first_cut(sweep: _Sweep, size: int) -> int | None:
    """The smallest `limit` at which the sweep finds an overlap (entry `limit - 1` is then in it), or None."""
    if not sweep.overlap(size):
        return None
    low, high = 1, size
    while low < high:
        middle = (low + high) // 2
        if sweep.overlap(middle):
            high = middle
        else:
            low = middle + 1
    return low


def first_overlap_within(entries: SortedEntries) -> tuple[int, int] | None:
    """(i, j): the first entry i that overlaps an earlier one, and the first such j < i — what comparing
    each entry with every earlier one finds first. O(n log n) when nothing overlaps, O(n log² n) otherwise."""
    cut = _first_cut(_Sweep(entries), len(entries.entries))
    if cut is None:
        return None
    i, listed = cut - 1, entries.entries
    return i, next(j for j in range(i) if listed[j].overlaps(listed[i]))


def first_overlap_between(left: SortedEntries, right: SortedEntries) -> tuple[int, int] | None:
    """(i, j): the first entry of `left` that overlaps an entry of `right`, and the first such j."""
    cut = _first_cut(_Sweep(left, right), len(left.entries))
    if cut is None:
        return None
    i = cut - 1
    return i, next(j for j, other in enumerate(right.entries) if left.entries[i].overlaps(other))


def parse_ports(value: object) -> tuple[PortRange, ...]:
    """`80`, `"80,443"`, `"8000-8099"`, `[80, "1024-2047"]` → port ranges."""
    items: list[object]
    if isinstance(value, list):
        items = value
    elif isinstance(value, (int, str)) and not isinstance(value, bool):
        items = [part.strip() for part in str(value).split(",")] if isinstance(value, str) else [value]
    else:
        raise ValueError("ports must be a number, 'LOW-HIGH', a comma list, or a list of those")
    ranges: list[PortRange] = []
    for item in items:
        text = str(item).strip()
        low_text, _, high_text = text.partition("-")
        if not low_text.isdigit() or (high_text and not high_text.isdigit()):
            raise ValueError(f"{text!r} is not a port or port range")
        low, high = int(low_text), int(high_text or low_text)
        if not 0 <= low <= high <= 65535:
            raise ValueError(f"{text!r} is not a valid port range (0-65535, low <= high)")
        ranges.append(PortRange(low, high))
    if not ranges:
        raise ValueError("empty port list")
    return tuple(ranges)


def parse_protocol(value: object) -> int:
    if isinstance(value, str) and value.lower() in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    raise ValueError(f"unknown protocol {value!r} (use {', '.join(PROTOCOL_NUMBERS)} or a number)")


@dataclass
class PrefixIndex(Generic[V]):
    """Map (version, packed address) → the values of every entry that contains it."""

    _by_version: dict[int, dict[int, dict[int, list[tuple[AddressEntry, V]]]]] = field(default_factory=dict)

    def add(self, entry: AddressEntry, value: V) -> None:
        version = entry.network.version
        lengths = self._by_version.setdefault(version, {})
        bits = 32 if version == 4 else 128
        plen = entry.network.prefixlen
        key = int(entry.network.network_address) >> (bits - plen)
        lengths.setdefault(plen, {}).setdefault(key, []).append((entry, value))

    def lookup(self, version: int, address: bytes, protocol: int, port: int | None) -> list[V]:
        lengths = self._by_version.get(version)
        if not lengths:
            return []
        number = int.from_bytes(address, "big")
        shift_base = 32 if version == 4 else 128
        found: list[V] = []
        for plen, table in lengths.items():
            candidates = table.get(number >> (shift_base - plen))
            if candidates:
                for entry, value in candidates:
                    if entry.matches(protocol, port):
                        found.append(value)
        return found

    def entries(self) -> Iterable[tuple[AddressEntry, V]]:
        for lengths in self._by_version.values():
            for table in lengths.values():
                for candidates in table.values():
                    yield from candidates


def address_bytes(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return address.packed
