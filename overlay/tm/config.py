"""The `[tm]` table of a traffic-manager node's config: what the TM serves, translates and tracks.

`parse_tm_section` turns the table into a frozen `TMConfig` (the lead's `overlay/config.py` calls it);
tests and tools may also build a `TMConfig` directly. Every field is documented in `docs/tm.md` under
"Config: the [tm] table". Contradictions a TM could not run with are refused here, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay.configlib import IPAddress, IPNetwork, Section, to_address, to_endpoint, to_network

MODES = ("nat", "firewall")
POLICIES = ("round-robin", "least-connections", "source-hash")
SERVICE_PROTOCOLS = ("tcp", "udp")
RULE_PROTOCOLS = ("any", "tcp", "udp", "icmp")

# Idle timeouts in seconds. TCP values follow Linux conntrack, except `tcp_established`, which is the
# minimum RFC 5382 (REQ-5) allows for a NAT: 2 h 4 min. UDP follows RFC 4787 (REQ-5: at least 2 min).
DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_syn_sent": 120.0,
    "tcp_syn_recv": 60.0,
    "tcp_established": 7440.0,
    "tcp_fin_wait": 120.0,
    "tcp_close_wait": 60.0,
    "tcp_last_ack": 30.0,
    "tcp_time_wait": 120.0,
    "tcp_close": 10.0,
    "udp_unreplied": 30.0,
    "udp_replied": 180.0,
    "icmp": 30.0,
}


@dataclass(frozen=True)
class ServerConfig:
    address: IPAddress
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    virtual: IPAddress
    port: int
    protocol: str                     # "tcp" | "udp"
    servers: tuple[ServerConfig, ...]
    policy: str = "round-robin"


@dataclass(frozen=True)
class FirewallRule:
    """Allow new connections matching every given criterion (an empty tuple matches anything)."""

    name: str = ""
    protocol: str = "any"             # "any" | "tcp" | "udp" | "icmp" (ICMP means ICMPv6 too)
    sources: tuple[IPNetwork, ...] = ()
    destinations: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()   # destination port ranges, inclusive; TCP/UDP only


@dataclass(frozen=True)
class ConntrackConfig:
    """`timeouts` maps state names (`DEFAULT_TIMEOUTS` keys) to seconds; a missing state keeps its default."""

    max_entries: int = 65536
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))


@dataclass(frozen=True)
class ReplicationConfig:
    """`[tm.replication]`: send this TM's connection state to each row's second choice (overlay/tm/replication.py)."""

    enabled: bool = False
    interval: float = 0.2          # seconds between batches: connections younger than this die with the TM
    max_standby: int = 65536       # entries kept for other TMs
    strict: bool = False           # hold a new connection's packets until its standbys have its state
    defer_timeout: float = 0.05    # strict: release held packets after this long without every ack


@dataclass(frozen=True)
class TMConfig:
    mode: str = "nat"
    management: tuple[IPAddress, ...] = ()
    xlate: tuple[IPAddress, ...] = ()
    natable: tuple[IPNetwork, ...] = ()
    fleet_xlate: tuple[IPNetwork, ...] = ()
    port_range: tuple[int, int] = (1024, 65535)
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    services: tuple[ServiceConfig, ...] = ()
    firewall_rules: tuple[FirewallRule, ...] = ()
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(f"{where}: {message}" for where, message in problems))


def validate(config: TMConfig) -> list[tuple[str, str]]:
    """Contradictions as (field, message); empty when the config is usable."""
    problems: list[tuple[str, str]] = []
    if config.mode not in MODES:
        problems.append(("mode", f"must be one of {', '.join(MODES)}"))
    lo, hi = config.port_range
    if not 1 <= lo <= hi <= 65535:
        problems.append(("port_range", "must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535"))
    families = [address.version for address in config.xlate]
    if len(set(families)) != len(families):
        problems.append(("xlate", "at most one IPv4 and one IPv6 address"))
    if config.mode == "firewall":
        for name in ("xlate", "natable", "fleet_xlate", "services"):
            if getattr(config, name):
                problems.append((name, "is NAT configuration; firewall mode does not translate"))
    if config.mode == "nat" and config.firewall_rules:
        problems.append(("firewall.rule[0]", "rules only apply in firewall mode (mode is \"nat\")"))
    unknown = set(config.conntrack.timeouts) - set(DEFAULT_TIMEOUTS)
    if unknown:
        problems.append(("conntrack.timeouts", f"unknown timeouts {', '.join(sorted(unknown))}"))
    if any(value <= 0 for value in config.conntrack.timeouts.values()):
        problems.append(("conntrack.timeouts", "must be > 0"))
    if config.conntrack.max_entries < 1:
        problems.append(("conntrack.max_entries", "must be >= 1"))
    special = set(config.management) | set(config.xlate)
    seen_names: set[str] = set()
    seen_endpoints: set[tuple[str, IPAddress, int]] = set()
    for index, service in enumerate(config.services):
        where = f"service[{index}]"
        if service.name in seen_names:
            problems.append((f"{where}.name", f"duplicate service name {service.name!r}"))
        seen_names.add(service.name)
        endpoint = (service.protocol, service.virtual, service.port)
        if endpoint in seen_endpoints:
            problems.append((f"{where}.port", f"{service.protocol} {service.virtual} port {service.port} served twice"))
        seen_endpoints.add(endpoint)
        if service.protocol not in SERVICE_PROTOCOLS:
            problems.append((f"{where}.protocol", f"must be one of {', '.join(SERVICE_PROTOCOLS)}"))
        if service.policy not in POLICIES:
            problems.append((f"{where}.policy", f"must be one of {', '.join(POLICIES)}"))
        if service.virtual in special:
            problems.append((f"{where}.virtual", "is also a management or xlate address"))
        if not service.servers:
            problems.append((f"{where}.servers", "needs at least one server"))
        for number, server in enumerate(service.servers):
            if server.address.version != service.virtual.version:
                problems.append((f"{where}.servers[{number}]", "must be of the virtual address's family (no NAT64)"))
            if server.weight < 0:
                problems.append((f"{where}.servers[{number}]", "weight must be >= 0"))
    return problems


# -- TOML ---------------------------------------------------------------------------------------------

def parse_tm_section(section: Section) -> TMConfig:
    """Read the `[tm]` table; unknown keys and contradictions raise `ConfigError` naming field and line."""
    mode = section.str("mode", "nat", choices=MODES)
    management: tuple[IPAddress, ...] = tuple(section.each("management", to_address))
    xlate: tuple[IPAddress, ...] = tuple(section.each("xlate", to_address))
    natable: tuple[IPNetwork, ...] = tuple(section.each("natable", to_network))
    fleet_xlate: tuple[IPNetwork, ...] = tuple(section.each("fleet_xlate", to_network))
    port_range = section.convert("port_range", _port_range, (1024, 65535))
    conntrack = _parse_conntrack(section.section("conntrack"))
    services = tuple(_parse_service(item) for item in section.sections("service"))
    firewall = section.section("firewall")
    rules = tuple(_parse_rule(item) for item in firewall.sections("rule"))
    firewall.done()
    replication = _parse_replication(section.section("replication"))
    section.done()
    values = (mode, management, xlate, natable, fleet_xlate, port_range, conntrack, services, rules, replication)
    problems = validate(_unchecked(*values))
    if problems:
        where, message = problems[0]
        raise section.error(where, message)
    return TMConfig(*values)


def _unchecked(*values: Any) -> TMConfig:
    """A TMConfig built without validation, only to name the first problem with its field."""
    config = object.__new__(TMConfig)
    for name, value in zip(TMConfig.__dataclass_fields__, values):
        object.__setattr__(config, name, value)
    return config


def _port_range(value: Any) -> tuple[int, int]:
    if not isinstance(value, str) or value.count("-") != 1:
        raise ValueError("must be a string 'LOW-HIGH', e.g. '1024-65535'")
    low, high = value.split("-")
    if not (low.strip().isdigit() and high.strip().isdigit()):
        raise ValueError(f"{value!r}: LOW and HIGH must be port numbers")
    lo, hi = int(low), int(high)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{value!r}: needs 1 <= LOW <= HIGH <= 65535")
    return lo, hi


def _parse_replication(section: Section) -> ReplicationConfig:
    config = ReplicationConfig(
        enabled=section.bool("enabled", False),
        interval=section.float("interval", 0.2, minimum=0.01),
        max_standby=section.int("max_standby", 65536, minimum=1),
        strict=section.bool("strict", False),
        defer_timeout=section.float("defer_timeout", 0.05, minimum=0.001),
    )
    section.done()
    return config


def _parse_conntrack(section: Section) -> ConntrackConfig:
    max_entries = section.int("max_entries", 65536, minimum=1)
    table = section.section("timeouts")
    timeouts = {name: table.float(name, default, minimum=0.001) for name, default in DEFAULT_TIMEOUTS.items()}
    table.done()
    section.done()
    return ConntrackConfig(max_entries, timeouts)


def _parse_service(section: Section) -> ServiceConfig:
    name = section.str("name")
    virtual = section.convert("virtual", to_address)
    port = section.int("port", minimum=1, maximum=65535)
    protocol = section.str("protocol", "tcp", choices=SERVICE_PROTOCOLS)
    policy = section.str("policy", "round-robin", choices=POLICIES)
    servers: tuple[ServerConfig, ...] = tuple(
        section.each("servers", lambda value, where: _server(value, port), default=()))
    section.done()
    if not servers:
        raise section.error("servers", "needs at least one server")
    return ServiceConfig(name, virtual, port, protocol, servers, policy)


def _server(value: Any, default_port: int) -> ServerConfig:
    """`"ADDR:PORT"`, `"[V6]:PORT"`, bare `"ADDR"` (the service port), or `{ endpoint = "...", weight = N }`."""
    weight = 1
    if isinstance(value, dict):
        extra = set(value) - {"endpoint", "weight"}
        if extra:
            raise ValueError(f"unknown key {sorted(extra)[0]!r} (expected endpoint, weight)")
        if "endpoint" not in value:
            raise ValueError("needs endpoint = 'ADDRESS:PORT'")
        weight = value.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError("weight must be an integer >= 0")
        value = value["endpoint"]
    address, port = to_endpoint(value, default_port)
    return ServerConfig(address, port, weight)


def _parse_rule(section: Section) -> FirewallRule:
    name = section.str("name", "")
    protocol = section.str("protocol", "any", choices=RULE_PROTOCOLS)
    sources: tuple[IPNetwork, ...] = tuple(section.each("sources", to_network))
    destinations: tuple[IPNetwork, ...] = tuple(section.each("destinations", to_network))
    ports: tuple[tuple[int, int], ...] = tuple(section.each("ports", _rule_ports))
    section.done()
    if ports and protocol not in ("tcp", "udp"):
        raise section.error("ports", "only for protocol 'tcp' or 'udp'")
    return FirewallRule(name, protocol, sources, destinations, ports)


def _rule_ports(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ValueError("port must be 1-65535")
        return value, value
    return _port_range(value)
