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

# status["tms"][tm] number fields -> (metric, kind, help)
_TM_FIELDS: dict[str, tuple[str, str, str]] = {
    "packets": ("packets", "counter", "Packets the distributor sent to this TM"),
    "bytes": ("bytes", "counter", "Bytes the distributor sent to this TM"),
    "up": ("tm_up", "gauge", "1 when the TM passes its health checks"),
    "rows": ("tm_table_rows", "gauge", "Rows of the selection table that pick this TM first"),
}
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
        families.add(metric_name("uptime_seconds"), "gauge", "Seconds since the agent started", {}, status.get("uptime_s"))

        config = _mapping(status.get("config"))
        families.add(metric_name("config_generation"), "gauge", "Config generation in use (1 = as started, +1 per reload)", {}, config.get("generation"))
        if "hash" in config:
            config_info = InfoMetricFamily(metric_name("config"), "Hash of the config in use")
            config_info.add_metric([], {"hash": str(config["hash"])})
            yield config_info

        for tm, fields in sorted(_mapping(status.get("tms")).items()):
            fields = _mapping(fields)
            for key, (name, kind, documentation) in _TM_FIELDS.items():
                if key in fields:
                    families.add(metric_name(name), kind, documentation, {"tm": tm}, fields[key])
            state = fields.get("state")
            if state is not None:
                for candidate in TM_STATES:
                    families.add(metric_name("tm_state"), "gauge", "Administrative state of the TM (1 = current)", {"tm": tm, "state": candidate}, candidate == state)

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
        for reason, count in sorted(_mapping(status.get("drops")).items()):
            families.add(metric_name("drops"), "counter", "Packets dropped, by reason", {"reason": reason}, count)
        for peer, fields in sorted(_mapping(status.get("peers")).items()):
            fields = _mapping(fields)
            if "packets" in fields:
                families.add(metric_name("peer_packets"), "counter", "Packets received from this peer", {"peer": peer}, fields["packets"])

        conntrack = _mapping(status.get("conntrack"))
        for key, value in sorted(conntrack.items()):
            if key == "by_state":
                for state, count in sorted(_mapping(value).items()):
                    families.add(metric_name("conntrack_entries_by_state"), "gauge", "Connection-table entries, by state", {"state": state}, count)
            else:
                families.add(metric_name("conntrack", key), "gauge", f"Connection table: {key}", {}, value)

        # Flat counters/gauges last: a name that collides with a family above is skipped, never duplicated.
        for key, value in sorted(_mapping(status.get("counters")).items()):
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


def render_metrics(status: Callable[[], Mapping[str, Any]]) -> bytes:
    """The Prometheus text exposition of one status() call."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry)
