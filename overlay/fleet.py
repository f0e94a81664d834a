"""One fleet's node configs checked against each other: `overlay check --fleet DIR`.

`overlay check CONFIG` proves a file consistent in itself. A fleet writes some facts twice or more — a TM's
xlate addresses and port block in the distributor's `[[tm]]` table and in the TM's own `[tm]` table, every
TM's xlate addresses again in each TM's `fleet_xlate`, each side's underlay endpoint in the other's config,
the fleet id — and nothing in one file can tell that the copies agree. A disagreement here is a fleet that
loads fine and then misroutes replies, so each one names both places: files, fields and lines.

Configs are matched by role and `[node] name`: the distributor's `[[tm]] name` is the TM node's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.addrsets import PortRange
from overlay.config import NodeConfig, parse_node_config
from overlay.configlib import ConfigError, IPAddress, KeyLocator, read_text


@dataclass(frozen=True)
class Place:
    """A field of one file, with the line to edit."""

    file: str
    line: int | None
    field: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field}


@dataclass(frozen=True)
class Disagreement:
    """What `here` says that `there` contradicts; `there` is None when the other side is missing."""

    here: Place
    message: str
    there: Place | None = None

    def __str__(self) -> str:
        return f"{self.here}: {self.message}" + (f" (see {self.there})" if self.there else "")

    def as_dict(self) -> dict[str, Any]:
        return {**self.here.as_dict(), "message": self.message, "other": self.there.as_dict() if self.there else None}


@dataclass(frozen=True)
class Node:
    config: NodeConfig
    locator: KeyLocator

    def at(self, field: str) -> Place:
        return Place(self.config.source, self.locator.line(field), field)


@dataclass(frozen=True)
class Fleet:
    nodes: tuple[Node, ...]
    errors: tuple[ConfigError | Disagreement, ...]

    @property
    def distributors(self) -> list[Node]:
        return [node for node in self.nodes if node.config.role == "distributor"]

    @property
    def tms(self) -> list[Node]:
        return [node for node in self.nodes if node.config.role == "tm"]


def check_fleet(directory: Path) -> Fleet:
    """Load every `*.toml` of `directory` as a node config, then check that they agree."""
    paths = sorted(directory.glob("*.toml"))
    if not paths:
        return Fleet((), (ConfigError("", "no *.toml node configs in this directory", None, str(directory)),))
    nodes: list[Node] = []
    errors: list[ConfigError | Disagreement] = []
    for path in paths:
        try:
            text = read_text(path)
            nodes.append(Node(parse_node_config(text, str(path), base=path.parent), KeyLocator(text)))
        except ConfigError as error:
            errors.append(error)
    errors.extend(_disagreements(nodes, directory))
    return Fleet(tuple(nodes), tuple(errors))


def _disagreements(nodes: list[Node], directory: Path) -> Iterator[Disagreement]:
    by_name: dict[str, Node] = {}
    for node in nodes:
        if node.config.name in by_name:
            yield Disagreement(node.at("node.name"), f"{node.config.name!r} is also the name of another node",
                               by_name[node.config.name].at("node.name"))
        by_name.setdefault(node.config.name, node)
    distributors = [node for node in nodes if node.config.role == "distributor"]
    tms = {node.config.name: node for node in nodes if node.config.role == "tm"}
    listed: set[str] = set()
    for dist in distributors:
        assert dist.config.distributor is not None
        for index, entry in enumerate(dist.config.distributor.tms):
            listed.add(entry.name)
            tm = tms.get(entry.name)
            if tm is None:
                yield Disagreement(dist.at(f"tm[{index}].name"), f"no TM config named {entry.name!r} in {directory}")
                continue
            yield from _tm_entry(dist, index, tm)
            yield from _fleet_id(dist, tm)
    for tm in tms.values():
        if tm.config.name not in listed and distributors:
            yield Disagreement(tm.at("node.name"), f"TM {tm.config.name!r} is in no distributor's [[tm]] tables",
                               distributors[0].at("tm"))
        yield from _known_distributors(tm, distributors)
        yield from _fleet_xlate(tm, list(tms.values()))
    for first, other in zip(distributors, distributors[1:]):
        yield from _same_seed(first, other)


def _tm_entry(dist: Node, index: int, tm: Node) -> Iterator[Disagreement]:
    """The distributor's `[[tm]]` table against the TM's own config."""
    assert dist.config.distributor is not None and tm.config.tm is not None
    entry, own, name = dist.config.distributor.tms[index], tm.config.tm, tm.config.name
    field = f"tm[{index}]"
    listens = (tm.config.underlay.address, tm.config.underlay.port)
    if entry.underlay != listens:
        yield Disagreement(dist.at(f"{field}.underlay"), f"{_endpoint(entry.underlay)}, but TM {name!r} listens on "
                           f"{_endpoint(listens)}", tm.at("underlay.address" if entry.underlay[0] != listens[0] else "underlay.port"))
    if set(entry.management) != set(own.management):
        yield Disagreement(dist.at(f"{field}.management"), f"{_addresses(entry.management) or 'none'}, but TM {name!r} has "
                           f"{_addresses(own.management) or 'none'}", tm.at("tm.management"))
    low, high = own.port_range
    for j, xlate in enumerate(entry.xlate):
        if not any(address.version == xlate.network.version and address in xlate.network for address in own.xlate):
            yield Disagreement(dist.at(f"{field}.xlate[{j}]"), f"{xlate.network} contains none of the xlate addresses "
                               f"of TM {name!r} ({_addresses(own.xlate) or 'none'})", tm.at("tm.xlate"))
        elif xlate.ports is not None and not _covers(xlate.ports, low, high):
            blocks = ",".join(str(block) for block in xlate.ports)
            yield Disagreement(dist.at(f"{field}.xlate[{j}]"), f"delivers replies to ports {blocks} only, but TM {name!r} "
                               f"allocates ports {low}-{high}: replies to the others go astray", tm.at("tm.port_range"))
    for k, address in enumerate(own.xlate):
        if not any(x.network.version == address.version and address in x.network for x in entry.xlate):
            yield Disagreement(tm.at(f"tm.xlate[{k}]"), f"{address} is not in the distributor's {field}.xlate: replies to "
                               "it would not reach this TM", dist.at(f"{field}.xlate"))


def _covers(blocks: tuple[PortRange, ...], low: int, high: int) -> bool:
    """True when the port blocks (sorted or not, possibly adjacent) cover every port of low-high."""
    for block in sorted(blocks, key=lambda b: b.low):
        if block.low <= low <= block.high:
            low = block.high + 1
    return low > high


def _fleet_id(dist: Node, tm: Node) -> Iterator[Disagreement]:
    ours, theirs = dist.config.underlay.gre_key, tm.config.underlay.gre_key
    if ours is not None and theirs is not None and ours != theirs:
        yield Disagreement(dist.at("underlay.gre_key"), f"fleet id {ours}, but TM {tm.config.name!r} has {theirs}",
                           tm.at("underlay.gre_key"))


def _known_distributors(tm: Node, distributors: list[Node]) -> Iterator[Disagreement]:
    """A TM accepts tunnel packets only from its `[[distributor]]` endpoints, and answers to them."""
    endpoints = {(d.config.underlay.address, d.config.underlay.port): d for d in distributors}
    for k, peer in enumerate(tm.config.distributors):
        if peer not in endpoints and distributors:
            fleet = ", ".join(f"{d.config.name} is {_endpoint((d.config.underlay.address, d.config.underlay.port))}"
                              for d in distributors)
            yield Disagreement(tm.at(f"distributor[{k}].underlay"), f"{_endpoint(peer)} is no distributor of the fleet "
                               f"({fleet})", distributors[0].at("underlay.address"))
    for endpoint, dist in endpoints.items():
        assert dist.config.distributor is not None
        if endpoint not in tm.config.distributors and any(e.name == tm.config.name for e in dist.config.distributor.tms):
            yield Disagreement(dist.at("underlay.address"), "is not among the [[distributor]] endpoints of TM "
                               f"{tm.config.name!r}: it drops this distributor's packets", tm.at("distributor"))


def _fleet_xlate(tm: Node, tms: list[Node]) -> Iterator[Disagreement]:
    """`fleet_xlate` (optional) must cover every TM's xlate addresses, or misrouted replies go uncounted."""
    assert tm.config.tm is not None
    prefixes = tm.config.tm.fleet_xlate
    if not prefixes:
        return
    for other in tms:
        assert other.config.tm is not None
        for k, address in enumerate(other.config.tm.xlate):
            if not any(p.version == address.version and address in p for p in prefixes):
                yield Disagreement(tm.at("tm.fleet_xlate"), f"does not cover {address}, an xlate address of TM "
                                   f"{other.config.name!r}", other.at(f"tm.xlate[{k}]"))


def _same_seed(first: Node, other: Node) -> Iterator[Disagreement]:
    """Every distributor of a fleet needs the same seed, or one client lands on different TMs."""
    assert first.config.distributor is not None and other.config.distributor is not None
    if first.config.distributor.seed != other.config.distributor.seed:
        yield Disagreement(other.at("hash"), f"another seed than distributor {first.config.name!r}", first.at("hash"))


def _endpoint(endpoint: tuple[IPAddress, int]) -> str:
    return f"{endpoint[0]} port {endpoint[1]}"


def _addresses(addresses: tuple[IPAddress, ...]) -> str:
    return ", ".join(str(address) for address in addresses)
