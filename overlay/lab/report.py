"""What the demo and `overlay lab run` print: traffic outcome, each TM's share, the TMs' invalid drops.

Shares come from the distributor's `/status` (`tms.NAME.packets`, the packets it sent to each TM),
measured as the difference across the run so earlier health probes and warm-up do not count. Invalid
drops come from each TM's own `/status` counters: a TM drops a packet as "invalid:..." (counted as
`invalid.*`) when it has no state for it — the one number that shows a distributor breaking symmetry.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from overlay.lab import topology
from overlay.lab.lab import Lab
from overlay.lab.traffic import TrafficReport

INVALID_PREFIX = "invalid."  # overlay.tm.reasons.counter_name("invalid:no-state") == "invalid.no_state"


def tm_packets(distributor_status: Mapping[str, Any]) -> dict[str, int]:
    """Packets the distributor has sent to each TM so far."""
    tms = distributor_status.get("tms", {})
    return {name: int(info.get("packets", 0)) for name, info in tms.items() if isinstance(info, Mapping)}


def invalid_drops(tm_status: Mapping[str, Any]) -> dict[str, int]:
    """The TM's non-zero `invalid.*` drop counters (counter -> count)."""
    counters = tm_status.get("counters", {})
    return {
        reason: int(count)
        for reason, count in counters.items()
        if reason.startswith(INVALID_PREFIX) and isinstance(count, int) and count
    }


def shares(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in sorted(after)}


def run_and_print(lab: Lab, *, count: int, duration: float, v4: int, v6: int, concurrency: int) -> int:
    """Run the traffic, print the outcome; exit code 0 only with zero failed connections and zero invalid drops."""
    before = tm_packets(lab.status("dist"))
    print(f"traffic: up to {count} HTTP requests for at most {duration:.0f}s from {v4} IPv4 and {v6} IPv6 client"
          f" addresses to http://{topology.VIP_V4}/ and http://[{topology.VIP_V6}]/ ...")
    outcome: TrafficReport = lab.traffic(v4=v4, v6=v6, count=count, duration=duration, concurrency=concurrency)
    per_tm = shares(before, tm_packets(lab.status("dist")))
    total = sum(per_tm.values()) or 1
    print(outcome.summary())
    print("per-TM share of the packets the distributor sent:")
    for name, packets in per_tm.items():
        print(f"  {name}: {packets} packets ({100.0 * packets / total:.1f}%)")
    invalid = {tm: invalid_drops(lab.status(tm)) for tm in topology.TMS}
    invalid_total = sum(sum(reasons.values()) for reasons in invalid.values())
    print(f"invalid drops on the TMs: {invalid_total}"
          + "".join(f"\n  {tm}: {reasons}" for tm, reasons in invalid.items() if reasons))
    print(f"failed connections: {outcome.failed}")
    ok = outcome.failed == 0 and invalid_total == 0 and outcome.requests > 0
    if not ok:
        print("FAILED: some connections broke (see the agents' logs in "
              f"{lab.processes.log_dir})", file=sys.stderr)
    return 0 if ok else 1
