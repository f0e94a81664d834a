"""Prometheus exposition of the status dict: one custom Collector, no metrics state of its own.

The agents already count everything for `/status`; keeping a second set of prometheus_client metric
objects in sync on the packet path would cost per-packet work twice. Instead each scrape maps one
`provider.status()` dict to metric families. The mapping is documented in docs/operations.md ("Metrics").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

PREFIX = "overlay"
TM_STATES = ("enabled", "draining", "disabled")

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")

# status["health"]["tms"][tm] number fields (HealthChecker.snapshot()) -> (metric, kind, help)
_HEALTH_FIELDS: dict[str, tuple[str, str, str]] = {
    "probes_sent": ("health_probes_sent", "counter", "Keepalives sent to the TM"),
    "replies": ("health_replies", "counter", "Keepalives echoed back in time"),
    "timeouts": ("health_timeouts", "counter", "Keepalives not echoed within the timeout"),
    "http_failures": ("health_http_failures", "counter", "Failed /healthz confirmations"),
    "transitions": ("health_transitions", "counter", "Up/down changes of the TM"),
    "rtt_seconds": ("health_rtt_seconds", "gauge", "Round-trip time of the last echoed keepalive"),
}


def metric_name(*parts: str) -> str:
    """`overlay_` + parts joined by `_`, every character Prometheus refuses replaced by `_`."""
    return _INVALID_NAME_CHARS.sub("_", "_".join((PREFIX,) + parts))


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class _Families:
    """Collects families by exposed name so that a clash never yields an invalid (duplicate) exposition."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}
        self._shape: dict[str, tuple[str, list[str]]] = {}  # name -> (kind, label names)
        self.skipped = 0

    def add(self, name: str, kind: str, documentation: str, labels: dict[str, str], value: object) -> None:
        number = _number(value)
        if number is None:
            self.skipped += value is not None  # None means "not known yet", not a bug
            return
        label_names = sorted(labels)
        shape = self._shape.setdefault(name, (kind, label_names))
        if shape != (kind, label_names):
            self.skipped += 1
            return
        family = self.by_name.get(name)
        if family is None:
            factory: Callable[..., Metric] = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self.by_name[name] = factory(name, documentation, labels=label_names)
        family.add_metric([labels[label] for label in label_names], number)  # type: ignore[attr-defined]


# Flat counters "<prefix>.<entity>" repeat a labelled section per entity; exposing them flat would put
# label values into metric names, so they are left out whenever that section is present.
_PER_ENTITY_PREFIXES = {"tm": "tms", "cell": "cells", "reason": "reasons", "drop": "drops", "peer": "peers"}


class StatusCollector:
    """prometheus_client Collector over `status()`: call it per scrape, it keeps nothing between scrapes."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]):
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        families = _Families()

        info = InfoMetricFamily(PREFIX, "The node's role, name and version")
        info.add_metric([], {key: str(status.get(key, "")) for key in ("role", "name", "version")})
        yield info
        config = _mapping(status.get("config"))
        if "hash" in config:
            config_info = InfoMetricFamily(metric_name("config"), "Hash of the config in use")
            config_info.add_metric([], {"hash": str(config["hash"])})
            yield config_info
        families.add(metric_name("uptime_seconds"), "gauge", "Seconds since the agent started", {}, status.get("uptime_s"))
        families.add(metric_name("config_generation"), "gauge", "Config generation in use (+1 per applied reload)", {}, config.get("generation"))

        self._collect_distributor(status, families)
        self._collect_tm(status, families)
        for reason, count in sorted(_mapping(status.get("drops")).items()):
            families.add(metric_name("drops"), "counter", "Packets dropped, by reason", {"reason": reason}, count)

        # Flat counters/gauges last: a name that collides with a family above is skipped, never duplicated.
        for key, value in sorted(_mapping(status.get("counters")).items()):
            prefix = key.split(".", 1)[0]
            if "." in key and _PER_ENTITY_PREFIXES.get(prefix) in status:
                continue
            name = metric_name(key.replace(".", "_"))
            name = name[: -len("_total")] if name.endswith("_total") else name
            families.add(name, "counter", f"Counter {key}", {}, value)
        for key, value in sorted(_mapping(status.get("gauges")).items()):
            families.add(metric_name(key.replace(".", "_")), "gauge", f"Gauge {key}", {}, value)

        yield from families.by_name.values()
        yield GaugeMetricFamily(
            metric_name("status_skipped_values"),
            "Status values not exposed (not a number, or a name clash): non-zero means an agent bug",
            value=families.skipped,
        )

    @staticmethod
    def _collect_distributor(status: Mapping[str, Any], families: _Families) -> None:
        """Per-TM traffic, table and admin state; health checks; decisions by cell and by reason."""
        for tm, fields in sorted(_mapping(status.get("tms")).items()):
            fields = _mapping(fields)
            if "packets" in fields:
                families.add(metric_name("packets"), "counter", "Packets the distributor sent to this TM", {"tm": tm}, fields["packets"])
            # Every other number or flag of a TM (up, weight, table_share, serving, ...) is a gauge; text
            # fields (underlay address) are descriptive and only shown in /status.
            for key, value in sorted(fields.items()):
                if key != "packets" and isinstance(value, (int, float)):
                    families.add(metric_name("tm", key), "gauge", f"TM field {key} (1/0 for flags)", {"tm": tm}, value)
            admin = fields.get("admin")
            if admin is not None:
                for state in TM_STATES:
                    families.add(metric_name("tm_admin_state"), "gauge", "Administrative state of the TM (1 = current)", {"tm": tm, "state": state}, state == admin)
        health = _mapping(status.get("health"))
        for tm, fields in sorted(_mapping(health.get("tms")).items()):
            fields = _mapping(fields)
            for key, (name, kind, documentation) in _HEALTH_FIELDS.items():
                if key in fields:
                    families.add(metric_name(name), kind, documentation, {"tm": tm}, fields[key])
        for reason, count in sorted(_mapping(health.get("rejected")).items()):
            families.add(metric_name("health_rejected"), "counter", "Echoed keepalives refused, by reason", {"reason": reason}, count)
        if "all_down" in health:
            families.add(metric_name("health_all_down"), "gauge", "1 when no TM is up", {}, health["all_down"])
        for cell, count in sorted(_mapping(status.get("cells")).items()):
            families.add(metric_name("decisions"), "counter", "Packets decided, by decision-table cell", {"cell": cell}, count)
        for reason, count in sorted(_mapping(status.get("reasons")).items()):
            families.add(metric_name("verdicts"), "counter", "Distributor verdicts, by reason (drops included)", {"reason": reason}, count)

    @staticmethod
    def _collect_tm(status: Mapping[str, Any], families: _Families) -> None:
        """Per-peer traffic, the connection table, NAT port blocks and balanced servers."""
        for peer, fields in sorted(_mapping(status.get("peers")).items()):
            fields = _mapping(fields)
            if "packets" in fields:
                families.add(metric_name("peer_packets"), "counter", "Packets received from this peer", {"peer": peer}, fields["packets"])
        connections = _mapping(status.get("connections"))
        if "total" in connections:
            families.add(metric_name("conntrack_entries"), "gauge", "Connection-table entries", {}, connections["total"])
        for state, count in sorted(_mapping(connections.get("by_state")).items()):
            families.add(metric_name("conntrack_entries_by_state"), "gauge", "Connection-table entries, by state", {"state": state}, count)
        table = _mapping(status.get("table"))
        if "limit" in table:
            families.add(metric_name("conntrack_limit"), "gauge", "Connection-table capacity", {}, table["limit"])
        if "fullness" in table:
            families.add(metric_name("conntrack_fullness"), "gauge", "Connection-table entries / capacity", {}, table["fullness"])
        for address, protocols in sorted(_mapping(_mapping(status.get("ports")).get("by_address")).items()):
            for protocol, block in sorted(_mapping(protocols).items()):
                block, labels = _mapping(block), {"address": address, "protocol": protocol}
                if "in_use" in block:
                    families.add(metric_name("nat_ports_in_use"), "gauge", "NAT ports allocated", labels, block["in_use"])
                if "capacity" in block:
                    families.add(metric_name("nat_ports_capacity"), "gauge", "NAT ports in the block", labels, block["capacity"])
                if "exhausted" in block:
                    families.add(metric_name("nat_ports_exhausted"), "counter", "NAT port allocations refused: block full", labels, block["exhausted"])
        services = status.get("services")
        for service in services if isinstance(services, list) else []:
            service = _mapping(service)
            servers = service.get("servers")
            for server in servers if isinstance(servers, list) else []:
                server = _mapping(server)
                labels = {"service": str(service.get("name", "")), "server": f"{server.get('address', '')}:{server.get('port', '')}"}
                families.add(metric_name("service_server_connections"), "gauge", "Connections the TM balances to this server", labels, server.get("connections"))


def render_metrics(status: Callable[[], Mapping[str, Any]]) -> bytes:
    """The Prometheus text exposition of one status() call."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry)
