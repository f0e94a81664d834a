"""The last minute of traffic, per TM (or per peer), as per-second rates: what the page charts.

Sans-I/O: the status server's sampler task calls `record(now, status)` once a second; `snapshot()` turns
the ring of cumulative counters into rates. Keeping counters (not rates) in the ring makes a missed or
late sample harmless: the next rate simply spans a longer interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any


def traffic_counters(status: Mapping[str, Any]) -> tuple[dict[str, int], int]:
    """(packets per series, total drops) from a status dict.

    A distributor's series are its TMs (`status["tms"][name]["packets"]`); a TM's are its peers, the
    distributors that send to it (`status["peers"][name]["packets"]`). Non-numeric entries are skipped: a
    chart with a gap beats a status page that fails.
    """
    series: dict[str, int] = {}
    members = status.get("tms") or status.get("peers") or {}
    if isinstance(members, Mapping):
        for name, member in members.items():
            packets = member.get("packets") if isinstance(member, Mapping) else None
            if packets is not None and _is_number(packets):
                series[str(name)] = int(packets)
    drops = status.get("drops") or {}
    total_drops = sum(int(value) for value in drops.values() if _is_number(value)) if isinstance(drops, Mapping) else 0
    return series, total_drops


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TrafficHistory:
    """A ring of (time, cumulative packets per series, cumulative drops) samples covering `seconds`."""

    def __init__(self, seconds: int = 60):
        # One more sample than rates: N rates need N+1 cumulative points.
        self._samples: deque[tuple[float, dict[str, int], int]] = deque(maxlen=seconds + 1)

    def record(self, now: float, status: Mapping[str, Any]) -> None:
        series, drops = traffic_counters(status)
        if self._samples and now <= self._samples[-1][0]:
            return  # a clock that did not advance would divide by zero
        self._samples.append((now, series, drops))

    def snapshot(self) -> dict[str, Any]:
        """Rates between consecutive samples, oldest first; `age` is seconds before the newest sample.

        A counter that went backwards (agent restart, TM removed and re-added) yields no rate for that
        step rather than a negative one.
        """
        samples = list(self._samples)
        names = sorted({name for _, series, _ in samples for name in series})
        points: list[dict[str, Any]] = []
        newest = samples[-1][0] if samples else 0.0
        for (t0, series0, drops0), (t1, series1, drops1) in zip(samples, samples[1:]):
            span = t1 - t0
            rates = {
                name: (series1[name] - series0[name]) / span
                for name in names
                if name in series0 and name in series1 and series1[name] >= series0[name]
            }
            points.append(
                {
                    "age": round(newest - t1, 3),
                    "span": round(span, 3),
                    "pps": rates,
                    "drops_pps": (drops1 - drops0) / span if drops1 >= drops0 else None,
                }
            )
        return {"series": names, "samples": points}
