"""A node's config file: the tables every role shares, then the role's own tables.

Common tables: `[node]` (role, name), `[status]`, `[log]`, `[underlay]`, `[tun]`; a TM also has
`[[distributor]]` (who may send to it) and `[tm]` (parsed by `overlay.tm.config`); an edge has
`[[distributor]]` and `[edge]` (the prefixes it serves); a distributor has
`[hash]`, `[sets]`, `[[tm]]`, `[decision]`, `[[edge]]`, `[health]` (parsed by
`overlay.distributor.config`). docs/config.md documents every field.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from overlay.configlib import (
    IPAddress,
    IPNetwork,
    Section,
    parse_toml,
    read_text,
    refuse_other_family,
    to_address,
    to_endpoint,
    to_network,
)
from overlay import auth
from overlay.gre import FLEET_ID_MAX, UDP_PORT, overhead
from overlay.keyconfig import parse_auth_section, parse_public_keys

if TYPE_CHECKING:
    from overlay.distributor.config import DistributorConfig
    from overlay.tm.config import TMConfig

ROLES = ("distributor", "tm", "edge")
# The top-level tables of each role (the docstring above), refused up front when unknown: a typo'd
# `[sest]` must be named, not reported as the TM xlate addresses it leaves outside any set.
COMMON_TABLES = ("node", "status", "log", "underlay", "tun", "auth")
ROLE_TABLES = {
    "distributor": ("hash", "sets", "tm", "decision", "edge", "health", "fleet"),
    "tm": ("distributor", "tm"),
    "edge": ("distributor", "edge"),
}
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class StatusConfig:
    host: str
    port: int
    admin_token_file: str | None


@dataclass(frozen=True)
class LogConfig:
    format: str
    level: str


@dataclass(frozen=True)
class UnderlayConfig:
    address: IPAddress
    port: int
    mtu: int
    source_ports: int
    gre_key: int | None
    # Seconds between a TM's sealed announces to its distributors (0: none): behind NAT, how a distributor
    # learns where the TM is, and what keeps the NAT's binding alive. Only with [auth] on.
    announce_interval: float = 0.0


@dataclass(frozen=True)
class TunConfig:
    name: str
    mtu: int
    capture: tuple[IPNetwork, ...]
    capture_from: tuple[IPNetwork, ...]
    offload: str = "auto"   # "auto" | "on" | "off": TSO/checksum offloads on the TUN (runtime/offload.py)


@dataclass(frozen=True)
class EdgeConfig:
    """`[edge]`: the prefixes this edge serves (its host's overlay addresses, or a site behind it)."""

    prefixes: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class NodeConfig:
    role: str
    name: str
    source: str
    digest: str
    status: StatusConfig
    log: LogConfig
    underlay: UnderlayConfig
    tun: TunConfig
    distributors: tuple[tuple[IPAddress, int], ...]
    distributor: DistributorConfig | None
    tm: TMConfig | None
    # Keys: ours and every peer's, by peer name (TMs and edges of a distributor; a TM's distributors).
    auth: auth.AuthConfig = auth.AuthConfig()
    distributor_names: tuple[str, ...] = ()   # a TM's or edge's [[distributor]] names, as `distributors`
    edge: EdgeConfig | None = None
    workers: int = 1    # packet-loop processes (`[node] workers`): a distributor's or edge's TUN queues and sockets


def load_node_config(path: str | Path, fleet_document: str | None = None, fleet_source: str = "fleet") -> NodeConfig:
    """The config file; with `fleet_document` (a distributor's fleet store `tms` text, named `fleet_source`
    in errors) its [[tm]] tables replace the file's."""
    path = Path(path)
    tms = None
    if fleet_document is not None:
        from overlay.fleetview import parse_fleet_document

        tms = parse_fleet_document(fleet_document, fleet_source)
    return parse_node_config(read_text(path), str(path), path.parent, tms)


def parse_node_config(text: str, source: str = "config", base: Path | None = None,
                      fleet_document: Section | None = None) -> NodeConfig:
    """`fleet_document`: a distributor's [[tm]] tables from its fleet store, replacing the file's."""
    root = parse_toml(text, source)
    node = root.section("node", required=True)
    role = node.str("role", choices=ROLES)
    name = node.str("name")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise node.error("name", "use letters, digits, '-', '_' and '.' only")
    workers = _parse_workers(node, role)
    node.done()
    root.refuse_unknown(COMMON_TABLES + ROLE_TABLES[role])

    status = _parse_status(root.section("status"))
    log = _parse_log(root.section("log"))
    underlay = _parse_underlay(root.section("underlay", required=True))
    auth_mode, private_keys = parse_auth_section(root.section("auth"), base)
    tun = _parse_tun(root.section("tun"), role, underlay, auth_mode != "off")

    distributor = tm = edge = None
    distributors: tuple[tuple[IPAddress, int], ...] = ()
    names: list[str] = []
    peer_keys: dict[str, tuple[bytes, ...]] = {}
    if role == "distributor":
        from overlay.distributor.config import parse_distributor

        distributor = parse_distributor(
            root, name, underlay.address, underlay.mtu, underlay.gre_key, tun.capture, tun.capture_from, base,
            auth_mode != "off", fleet_document,
        )
        peer_keys = {tm.name: tm.public_keys for tm in distributor.tms}
        peer_keys.update({edge.name: edge.public_keys for edge in distributor.edges})
    else:
        peers = []
        for index, section in enumerate(root.sections("distributor")):
            peer = section.convert("underlay", lambda v: to_endpoint(v, UDP_PORT))
            refuse_other_family(section, "underlay", peer[0], underlay.address)
            peer_name = section.str("name", f"distributor{index}")
            if peer_name in names:
                raise section.error("name", f"duplicate distributor name {peer_name!r}")
            names.append(peer_name)
            peer_keys[peer_name] = parse_public_keys(section, required=auth_mode != "off")
            peers.append(peer)
            section.done()
        distributors = tuple(peers)
        if not distributors:
            raise root.error("distributor", f"a {role} needs at least one [[distributor]] {{ underlay = ADDRESS[:PORT] }}")
        if role == "tm":
            from overlay.tm.config import parse_tm_section

            tm = parse_tm_section(root.section("tm", required=True))
        else:
            edge = _parse_edge(root.section("edge", required=True), underlay)
    root.done()
    return NodeConfig(
        role=role,
        name=name,
        source=source,
        digest=hashlib.sha256(text.encode()).hexdigest(),
        status=status,
        log=log,
        underlay=underlay,
        tun=tun,
        distributors=distributors,
        distributor=distributor,
        tm=tm,
        auth=auth.AuthConfig(auth_mode, private_keys, peer_keys if auth_mode != "off" else {}),
        distributor_names=tuple(names),
        edge=edge,
        workers=workers,
    )


def _parse_workers(node: Section, role: str) -> int:
    """`workers = N | "auto"` (the machine's cores): a distributor's or an edge's packet loops, one process each."""
    value = node.convert("workers", lambda v: v, 1)
    if value == "auto":
        value = len(os.sched_getaffinity(0))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise node.error("workers", 'must be a number of processes from 1 to 64, or "auto"')
    if value > 1 and role == "tm":
        # A TM's connection table lives in one process; several would need flows steered to the worker
        # that holds them, which SO_REUSEPORT's hash does not do (docs/performance.md).
        raise node.error("workers", "a TM runs one packet loop: its connection table is per process "
                                    "(run more TMs to use more cores)")
    return value


def _parse_status(section: Section) -> StatusConfig:
    host, port = section.convert("listen", _listen, ("127.0.0.1", 8080))
    token_file = section.str("admin_token_file", None)
    section.done()
    return StatusConfig(host, port, token_file)


def _listen(value: object) -> tuple[str, int]:
    address, port = to_endpoint(value, 8080)
    return str(address), port


def _parse_log(section: Section) -> LogConfig:
    config = LogConfig(section.str("format", "console", choices=LOG_FORMATS), section.str("level", "info", choices=LOG_LEVELS))
    section.done()
    return config


def _parse_underlay(section: Section) -> UnderlayConfig:
    address = section.convert("address", to_address)
    port = section.int("port", UDP_PORT, minimum=1, maximum=65535)
    mtu = section.int("mtu", 1500, minimum=1280, maximum=65535)
    source_ports = section.int("source_ports", 8, minimum=1, maximum=64)
    gre_key = section.int("gre_key", None, minimum=0, maximum=FLEET_ID_MAX)
    announce_interval = section.float("announce_interval", 10.0, minimum=0.0)
    section.done()
    return UnderlayConfig(address, port, mtu, source_ports, gre_key, announce_interval)


def _parse_edge(section: Section, underlay: UnderlayConfig) -> EdgeConfig:
    prefixes = tuple(section.each("prefixes", to_network, default=()))
    if not prefixes:
        raise section.error("prefixes", "an edge serves at least one prefix (its overlay addresses)")
    for index, prefix in enumerate(prefixes):
        if prefix.version == underlay.address.version and underlay.address in prefix:
            raise section.error(f"prefixes[{index}]", f"contains the underlay address {underlay.address}: tunnel traffic would loop")
    section.done()
    return EdgeConfig(prefixes)


_TUN_NAMES = {"distributor": "ovl0", "tm": "ovl-tm", "edge": "ovl-edge"}


def _parse_tun(section: Section, role: str, underlay: UnderlayConfig, sealed: bool) -> TunConfig:
    name = section.str("name", _TUN_NAMES[role])
    if not 0 < len(name) <= 15 or "/" in name or " " in name:
        raise section.error("name", "an interface name has 1-15 characters, no '/' or spaces")
    # Largest inner packet that still fits the underlay once encapsulated.
    # The key field is always budgeted: second-chance marking may add it to any packet.
    # With [auth] on, every datagram also carries the seal's header and tag (overlay/auth.py).
    largest = underlay.mtu - overhead(underlay.address.version == 6, 0) - (auth.OVERHEAD if sealed else 0)
    mtu = section.int("mtu", largest, minimum=576, maximum=largest)
    capture = tuple(section.each("capture", to_network))
    capture_from = tuple(section.each("capture_from", to_network))
    offload = section.str("offload", "auto", choices=("auto", "on", "off"))
    # An edge may route destinations into the overlay (a client site reaching the virtual addresses);
    # what it sends from is its [edge] prefixes.
    refused = {"distributor": (), "tm": ("capture", "capture_from"), "edge": ("capture_from",)}[role]
    for key in refused:
        if section.has(key):
            raise section.error(key, "only a distributor captures traffic" if role == "tm" else
                                "an edge sends from its [edge] prefixes: list them there")
    for key, prefixes in (("capture", capture), ("capture_from", capture_from)):
        for index, prefix in enumerate(prefixes):
            if underlay.address.version == prefix.version and underlay.address in prefix:
                raise section.error(
                    f"{key}[{index}]", f"contains the underlay address {underlay.address}: tunnel traffic would loop"
                )
    section.done()
    return TunConfig(name, mtu, capture, capture_from, offload)
