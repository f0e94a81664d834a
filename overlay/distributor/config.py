"""The distributor's tables of a node config: address sets, TMs, hash, decision overrides, edges, health.

Everything here is validated up front, so the core can trust it: a contradiction in the address plan is
a config error naming the field and line, never a surprising verdict at 3 a.m.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.addrsets import (
    AddressEntry,
    PortRange,
    SortedEntries,
    first_overlap_between,
    first_overlap_within,
    parse_ports,
    parse_protocol,
)
from overlay.configlib import (
    ConfigError,
    IPAddress,
    IPNetwork,
    Section,
    read_text,
    refuse_other_family,
    to_endpoint,
    to_network,
)
from overlay.decision import CELL_ACTIONS, COLUMNS, ROWS, DecisionTable
from overlay.fleetview import FleetStoreConfig, parse_fleet_section
from overlay.gre import TM_ID_MAX, UDP_PORT, default_tm_id
from overlay.health import ALL_DOWN_POLICIES, HealthConfig
from overlay.keyconfig import parse_public_keys

HASH_KEYS = ("addr", "addr+port")
SET_NAMES = ("virtual", "node", "nat_able", "nat_xlate")


@dataclass(frozen=True)
class TMEntry:
    name: str
    underlay: tuple[IPAddress, int]
    weight: int
    management: tuple[IPAddress, ...]
    xlate: tuple[AddressEntry, ...]
    id: int = 0  # stable id in second-chance marks (gre.default_tm_id(name) unless configured)
    public_keys: tuple[bytes, ...] = ()  # with [auth] on: the first is sealed to, all are accepted
    backup: str | None = None  # owns this TM's xlate while it is down (with [tm.replication]: docs/tm.md)


@dataclass(frozen=True)
class EdgeEntry:
    """A remote agent (edge) that owns prefixes: packets forwarded to them go to it, encapsulated."""

    name: str
    underlay: tuple[IPAddress, int]
    prefixes: tuple[IPNetwork, ...]
    public_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class DistributorConfig:
    name: str
    seed: bytes
    hash_key: str
    rows_log2: int
    gre_key: int | None
    underlay_ipv6: bool
    underlay_mtu: int
    sets: dict[str, tuple[AddressEntry, ...]]
    tms: tuple[TMEntry, ...]
    edges: tuple[EdgeEntry, ...]
    decision: DecisionTable
    health: HealthConfig
    capture: tuple[IPNetwork, ...] = ()
    capture_from: tuple[IPNetwork, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    fleet: FleetStoreConfig = FleetStoreConfig()   # [fleet]: where the TM set and its state live

    def tm(self, name: str) -> TMEntry:
        for entry in self.tms:
            if entry.name == name:
                return entry
        raise KeyError(name)


def to_address_entry(value: Any, field_name: str) -> AddressEntry:
    """`"203.0.113.80/32"` or `{ prefix = "203.0.113.80/32", protocol = "tcp", ports = "80,443" }`."""
    if isinstance(value, str):
        return AddressEntry(to_network(value))
    if isinstance(value, dict):
        unknown = set(value) - {"prefix", "protocol", "ports"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: prefix, protocol, ports)")
        if "prefix" not in value:
            raise ValueError("needs 'prefix'")
        protocol = parse_protocol(value["protocol"]) if "protocol" in value else None
        ports = parse_ports(value["ports"]) if "ports" in value else None
        if ports is not None and protocol is None:
            raise ValueError("'ports' needs a 'protocol' (tcp or udp): ports mean nothing without one")
        return AddressEntry(to_network(value["prefix"]), protocol, ports)
    raise ValueError("must be a prefix string or a table { prefix, protocol, ports }")


def _parse_seed(hash_section: Section, base: Path | None) -> bytes:
    if hash_section.has("seed") and hash_section.has("seed_file"):
        raise hash_section.error("seed_file", "give either seed or seed_file, not both")
    if hash_section.has("seed_file"):
        path = Path(hash_section.str("seed_file"))
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            text = read_text(path, "seed file").strip()
        except ConfigError as exc:
            raise hash_section.error("seed_file", f"{path}: {exc.message}") from None
    else:
        text = hash_section.str("seed")
    field_name = "seed_file" if hash_section.has("seed_file") else "seed"
    if len(text) < 16:
        raise hash_section.error(field_name, "the seed must be at least 16 characters (use 32+ random hex digits)")
    # Any string works; hashing it gives a fixed-size secret and keeps the seed's form free.
    return hashlib.sha256(b"overlay-seed\0" + text.encode()).digest()


def parse_distributor(root: Section, name: str, underlay_address: IPAddress, underlay_mtu: int,
                      gre_key: int | None, capture: tuple[IPNetwork, ...], capture_from: tuple[IPNetwork, ...],
                      base: Path | None, sealed: bool = False, fleet_document: Section | None = None) -> DistributorConfig:
    """`fleet_document`: the [[tm]] tables to use instead of the file's (the fleet store's `tms` document,
    overlay/fleetview.py): errors in them name the document and its lines."""
    fleet = parse_fleet_section(root.section("fleet"))
    tm_root = root if fleet_document is None else fleet_document
    if fleet_document is not None:
        list(root.sections("tm"))   # the file's own [[tm]] tables: the bootstrap fleet, replaced by the store's
    hash_section = root.section("hash", required=True)
    seed = _parse_seed(hash_section, base)
    hash_key = hash_section.str("key", "addr", choices=HASH_KEYS)
    rows_log2 = hash_section.int("rows_log2", 16, minimum=16, maximum=22)
    hash_section.done()

    sets_section = root.section("sets")
    sets: dict[str, tuple[AddressEntry, ...]] = {}
    for set_name in SET_NAMES:
        sets[set_name] = tuple(sets_section.each(set_name, to_address_entry))
    sets_section.done()
    _check_sets(sets_section, sets)

    tms = tuple(_parse_tms(tm_root, sets, underlay_address, capture, capture_from, sealed))
    if not tms:
        raise tm_root.error("tm", "at least one [[tm]] is required")
    names = {tm.name for tm in tms}
    for index, tm in enumerate(tms):
        if tm.backup is not None and (tm.backup not in names or tm.backup == tm.name):
            section = next(s for i, s in enumerate(tm_root.sections("tm")) if i == index)
            raise section.error("backup", f"must name another [[tm]]; {tm.backup!r} is not one")
    if all(tm.weight == 0 for tm in tms):
        raise tm_root.error("tm", "all TM weights are zero: no TM could ever be chosen")

    edges = tuple(_parse_edges(root, underlay_address, sealed))

    decision_section = root.section("decision")
    overrides_section = decision_section.section("overrides")
    overrides: dict[tuple[str, str], str] = {}
    for cell in overrides_section.keys():
        row, sep, column = cell.partition(">")
        if not sep or row not in ROWS or column not in COLUMNS:
            raise overrides_section.error(
                cell, f"a cell is 'ROW>COLUMN' with ROW in {', '.join(ROWS)} and COLUMN in {', '.join(COLUMNS)}"
            )
        overrides[(row, column)] = overrides_section.str(cell, choices=CELL_ACTIONS)
    overrides_section.done()
    decision_section.done()

    health_section = root.section("health")
    try:
        health = HealthConfig(
            interval=health_section.float("interval", 1.0, minimum=0.01),
            timeout=health_section.float("timeout", 1.0, minimum=0.01),
            rise=health_section.int("rise", 2, minimum=1),
            fall=health_section.int("fall", 3, minimum=1),
            http=health_section.bool("http", False),
            all_down=health_section.str("all_down", "drop", choices=ALL_DOWN_POLICIES),
            return_grace=health_section.float("return_grace", 0.0, minimum=0.0),
        )
    except ConfigError:
        raise  # already names its field and line (ConfigError is a ValueError: keep it whole)
    except ValueError as exc:
        raise health_section.error("", str(exc)) from None
    health_section.done()

    return DistributorConfig(
        name=name,
        seed=seed,
        hash_key=hash_key,
        rows_log2=rows_log2,
        gre_key=gre_key,
        underlay_ipv6=underlay_address.version == 6,
        underlay_mtu=underlay_mtu,
        sets=sets,
        tms=tms,
        edges=edges,
        decision=DecisionTable.with_overrides(overrides),
        health=health,
        capture=capture,
        capture_from=capture_from,
        fleet=fleet,
    )


# Pairs of sets that may not share an address: each pair would make one packet mean two things.
_CONTRADICTIONS = (
    ("virtual", "node", "a server that TMs balance to cannot also be a virtual address they serve"),
    ("virtual", "nat_able", "a virtual address cannot also be a source that TMs source-NAT"),
    ("nat_xlate", "node", "an address TMs translate to cannot also be a server"),
    ("nat_xlate", "nat_able", "an address TMs translate to cannot also be a source they translate"),
)


def _check_sets(section: Section, sets: dict[str, tuple[AddressEntry, ...]]) -> None:
    # Sets of 100,000s of entries are checked in O(n log n); the first offender is the one comparing
    # every pair in file order would name (overlay/addrsets.py).
    indexed = {set_name: SortedEntries(entries) for set_name, entries in sets.items()}
    for set_name, entries in sets.items():
        found = first_overlap_within(indexed[set_name])
        if found is not None:
            i, j = found
            raise section.error(f"{set_name}[{i}]", f"{entries[i]} overlaps {set_name}[{j}] ({entries[j]})")
    for left, right, why in _CONTRADICTIONS:
        found = first_overlap_between(indexed[left], indexed[right])
        if found is not None:
            i, j = found
            raise section.error(f"{left}[{i}]", f"{sets[left][i]} overlaps {right}[{j}] ({sets[right][j]}): {why}")


def _parse_tms(root: Section, sets: dict[str, tuple[AddressEntry, ...]], underlay_address: IPAddress,
               capture: tuple[IPNetwork, ...], capture_from: tuple[IPNetwork, ...], sealed: bool) -> list[TMEntry]:
    tms: list[TMEntry] = []
    seen_names: dict[str, int] = {}
    seen_underlay: dict[tuple[IPAddress, int], str] = {}
    seen_ids: dict[int, str] = {}
    management_owner: dict[IPAddress, str] = {}
    owned: list[tuple[AddressEntry, str, str]] = []  # (entry, owner, field)
    for index, section in enumerate(root.sections("tm")):
        name = section.str("name")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise section.error("name", "use letters, digits, '-', '_' and '.' only")
        if name in ("forward", "drop", "summary"):
            raise section.error("name", f"{name!r} is reserved (replay writes {name}.pcap/.json)")
        if name in seen_names:
            raise section.error("name", f"duplicate TM name {name!r} (also tm[{seen_names[name]}])")
        seen_names[name] = index
        tm_id = section.int("id", default_tm_id(name), minimum=1, maximum=TM_ID_MAX)
        if tm_id in seen_ids:
            hint = "" if section.has("id") else " (derived from the name: give one of them an explicit id)"
            raise section.error("id", f"TM id {tm_id} is already TM {seen_ids[tm_id]!r}'s{hint}")
        seen_ids[tm_id] = name
        underlay = section.convert("underlay", lambda v: to_endpoint(v, UDP_PORT))
        if underlay in seen_underlay:
            raise section.error("underlay", f"{underlay[0]} port {underlay[1]} is already TM {seen_underlay[underlay]!r}")
        seen_underlay[underlay] = name
        if underlay[0] == underlay_address:
            raise section.error("underlay", "is the distributor's own underlay address")
        refuse_other_family(section, "underlay", underlay[0], underlay_address)
        for prefix in capture + capture_from:
            if underlay[0] in prefix:
                raise section.error(
                    "underlay", f"{underlay[0]} is inside captured prefix {prefix}: its tunnel traffic would loop"
                )
        weight = section.int("weight", 1, minimum=0, maximum=1000)
        management = tuple(section.each("management", lambda v, f: ipaddress.ip_address(_string(v))))
        for j, address in enumerate(management):
            if address in management_owner:
                raise section.error(f"management[{j}]", f"{address} is already TM {management_owner[address]!r}'s")
            management_owner[address] = name
            for set_name, entries in sets.items():
                if any(entry.network.version == address.version and address in entry.network for entry in entries):
                    raise section.error(f"management[{j}]", f"{address} is inside sets.{set_name}")
        xlate = tuple(section.each("xlate", to_address_entry))
        for j, entry in enumerate(xlate):
            field_name = f"xlate[{j}]"
            if not any(_inside(entry.network, s.network) for s in sets["nat_xlate"]):
                raise section.error(field_name, f"{entry} is not inside any sets.nat_xlate prefix")
            for other, owner, other_field in owned:
                if other.overlaps(entry):
                    raise section.error(field_name, f"{entry} is also owned by TM {owner!r} ({other_field}): an address or port block has one owner")
            owned.append((entry, name, f"tm[{index}].{field_name}"))
        public_keys = parse_public_keys(section, required=sealed)
        backup = section.str("backup", None)
        section.done()
        tms.append(TMEntry(name, underlay, weight, management, xlate, tm_id, public_keys, backup))
    return tms


def _parse_edges(root: Section, underlay_address: IPAddress, sealed: bool) -> list[EdgeEntry]:
    edges: list[EdgeEntry] = []
    names: set[str] = set()
    for section in root.sections("edge"):
        name = section.str("name")
        if name in names:
            raise section.error("name", f"duplicate edge name {name!r}")
        names.add(name)
        underlay = section.convert("underlay", lambda v: to_endpoint(v, UDP_PORT))
        refuse_other_family(section, "underlay", underlay[0], underlay_address)
        prefixes = tuple(section.each("prefixes", to_network, default=()))
        if not prefixes:
            raise section.error("prefixes", "an edge needs at least one prefix")
        public_keys = parse_public_keys(section, required=sealed)
        section.done()
        edges.append(EdgeEntry(name, underlay, prefixes, public_keys))
    return edges


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be an address string, not {type(value).__name__}")
    return value


__all__ = ["DistributorConfig", "TMEntry", "EdgeEntry", "parse_distributor", "to_address_entry", "PortRange"]
