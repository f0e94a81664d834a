"""The fleet as several distributors share it in a store (etcd): what lives where under the fleet's
prefix, the mirror of those keys a distributor keeps, and the one agreed view every distributor builds its
table from. Sans-I/O: `overlay.runtime.fleet_sync` moves the bytes.

Keys under `[fleet] prefix` (docs/operations.md, "Several distributors"):

    tms                    the fleet document: TOML with only [[tm]] tables (the distributor config's syntax)
    admin/<tm>             "enabled" | "draining" | "disabled" (absent: enabled)
    distributors/<name>    JSON {underlay, status, started}; under the distributor's lease
    health/<name>          JSON {"up": [...], "down": [...]}: what that distributor observes; its lease

Agreed health: a TM is down when a quorum — a majority of the live distributors (those whose registration
lease holds) — observe it down. Every distributor applies the same rule to the same keys, so their tables
agree once the watch has delivered the same revision to each (milliseconds); a distributor's own probe
result alone never takes a TM out of the shared table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from overlay.configlib import ConfigError, Section, parse_toml

TMS_KEY = "tms"
ADMIN = "admin/"
DISTRIBUTORS = "distributors/"
HEALTH = "health/"
ADMIN_STATES = ("enabled", "draining", "disabled")


@dataclass(frozen=True)
class FleetStoreConfig:
    """`[fleet]` of a distributor's config. `store = "file"` (the default): this file is the fleet."""

    store: str = "file"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/overlay/default"
    lease_ttl: int = 3          # seconds: registration and health votes outlive a dead distributor this long
    settle: float = 0.05        # watch events within this window are applied as one rebuild


def parse_fleet_section(section: Section) -> FleetStoreConfig:
    store = section.str("store", "file", choices=("file", "etcd"))
    endpoints = tuple(section.each("endpoints", _endpoint, default=("http://127.0.0.1:2379",)))
    if not endpoints:
        raise section.error("endpoints", "needs at least one etcd endpoint")
    prefix = section.str("prefix", "/overlay/default")
    if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise section.error("prefix", "an absolute key prefix like '/overlay/prod', without a trailing '/'")
    config = FleetStoreConfig(store, endpoints, prefix, section.int("lease_ttl", 3, minimum=1, maximum=60),
                              section.float("settle", 0.05, minimum=0.0))
    section.done()
    return config


def _endpoint(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError("an etcd client URL like 'http://127.0.0.1:2379'")
    return value.rstrip("/")


def parse_fleet_document(text: str, source: str) -> Section:
    """The `tms` document as the root whose `[[tm]]` tables the distributor config parser reads; refuses
    anything but [[tm]] tables (naming the line), so a document cannot smuggle in other settings."""
    root = parse_toml(text, source)
    root.refuse_unknown(("tm",))
    if not root.has("tm"):
        raise ConfigError("tm", "the fleet document needs at least one [[tm]] table", None, source)
    return root


@dataclass(frozen=True)
class Vote:
    up: frozenset[str]
    down: frozenset[str]


@dataclass
class FleetView:
    """The store's fleet keys, decoded. `problems`: keys that could not be read (shown in status)."""

    document: str | None = None
    document_revision: int = 0
    admin: dict[str, str] = field(default_factory=dict)
    distributors: dict[str, dict[str, Any]] = field(default_factory=dict)
    votes: dict[str, Vote] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def agreed_down(self, tms: list[str]) -> set[str]:
        """TMs a majority of the live distributors observe down."""
        live = set(self.distributors)
        quorum = len(live) // 2 + 1
        voters = [vote for name, vote in self.votes.items() if name in live]
        return {tm for tm in tms if sum(tm in vote.down for vote in voters) >= quorum}


class FleetMirror:
    """The keys under the prefix, as the last read plus every watch event since (by full key)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/") + "/"
        self.values: dict[str, tuple[bytes, int]] = {}   # relative key → (value, mod revision)
        self.revision = 0

    def load(self, pairs: list[tuple[str, bytes, int]], revision: int) -> None:
        """A full read (after a start, a reconnect or a compaction): replaces everything."""
        self.values = {}
        for key, value, mod_revision in pairs:
            self.put(key, value, mod_revision)
        self.revision = revision

    def put(self, key: str, value: bytes, mod_revision: int) -> None:
        if key.startswith(self.prefix):
            self.values[key[len(self.prefix):]] = (value, mod_revision)
            self.revision = max(self.revision, mod_revision)

    def delete(self, key: str, mod_revision: int) -> None:
        if key.startswith(self.prefix):
            self.values.pop(key[len(self.prefix):], None)
            self.revision = max(self.revision, mod_revision)

    def view(self) -> FleetView:
        view = FleetView()
        for key, (value, revision) in sorted(self.values.items()):
            try:
                text = value.decode()
                if key == TMS_KEY:
                    view.document, view.document_revision = text, revision
                elif key.startswith(ADMIN):
                    if text not in ADMIN_STATES:
                        raise ValueError(f"must be one of {', '.join(ADMIN_STATES)}")
                    view.admin[key[len(ADMIN):]] = text
                elif key.startswith(DISTRIBUTORS):
                    view.distributors[key[len(DISTRIBUTORS):]] = _json_object(text)
                elif key.startswith(HEALTH):
                    data = _json_object(text)
                    view.votes[key[len(HEALTH):]] = Vote(_names(data.get("up", [])), _names(data.get("down", [])))
            except ValueError as error:   # UnicodeDecodeError and JSONDecodeError included
                view.problems[key] = str(error)
        return view


def _json_object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    return data


def _names(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError("'up' and 'down' must be lists of TM names")
    return frozenset(value)


def vote(up: set[str], down: set[str]) -> bytes:
    return json.dumps({"up": sorted(up), "down": sorted(down)}).encode()
