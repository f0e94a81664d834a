"""Address sets narrowed by protocol and ports, and a prefix index that answers "which entries contain
this (address, protocol, port)?" in a few dict lookups — one per distinct prefix length in use.

A port-narrowed entry matches a packet whose port is unknown (a non-first fragment): the fragment then
classifies like the first fragment of its flow, which keeps both on the same TM.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
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
