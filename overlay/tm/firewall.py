"""Firewall mode's rule list: which new connections are allowed (the first matching rule allows).

Rules only decide about connection openers; packets of tracked connections and ICMP errors about them
(established and related) pass without consulting the rules, everything else is dropped. Prefixes are
compiled to (version, network int, mask int) so a match costs integer operations, not ipaddress objects.
"""

from __future__ import annotations

from overlay.configlib import IPNetwork
from overlay.tm.config import FirewallRule
from overlay.tm.packet import ICMP, ICMPV6, TCP, UDP

_PROTOCOLS = {"any": None, "tcp": frozenset({TCP}), "udp": frozenset({UDP}), "icmp": frozenset({ICMP, ICMPV6})}

Prefix = tuple[int, int, int]


def compile_prefixes(networks: tuple[IPNetwork, ...]) -> tuple[Prefix, ...]:
    return tuple((n.version, int(n.network_address), int(n.netmask)) for n in networks)


def in_prefixes(prefixes: tuple[Prefix, ...], version: int, address: bytes) -> bool:
    value = int.from_bytes(address, "big")
    for prefix_version, network, mask in prefixes:
        if prefix_version == version and value & mask == network:
            return True
    return False


class CompiledRule:
    __slots__ = ("name", "protocols", "sources", "destinations", "ports")

    def __init__(self, rule: FirewallRule) -> None:
        self.name = rule.name
        self.protocols = _PROTOCOLS[rule.protocol]
        self.sources = compile_prefixes(rule.sources)
        self.destinations = compile_prefixes(rule.destinations)
        self.ports = rule.ports

    def matches(self, version: int, protocol: int, source: bytes, destination: bytes, port: int | None) -> bool:
        if self.protocols is not None and protocol not in self.protocols:
            return False
        if self.sources and not in_prefixes(self.sources, version, source):
            return False
        if self.destinations and not in_prefixes(self.destinations, version, destination):
            return False
        if self.ports:
            return port is not None and any(low <= port <= high for low, high in self.ports)
        return True


class RuleList:
    def __init__(self, rules: tuple[FirewallRule, ...]) -> None:
        self.rules = [CompiledRule(rule) for rule in rules]

    def allows(self, version: int, protocol: int, source: bytes, destination: bytes, port: int | None) -> bool:
        return any(rule.matches(version, protocol, source, destination, port) for rule in self.rules)
