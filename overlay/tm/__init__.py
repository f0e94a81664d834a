"""The traffic manager's sans-I/O core: stateful NAT load balancing, source NAT and firewalling.

The runtime imports `TrafficManager`, `TMResult` and `TMConfig` from here; `parse_tm_section` reads the
`[tm]` table of a node config. See `docs/tm.md`.
"""

from overlay.tm.config import TMConfig, parse_tm_section
from overlay.tm.core import TMResult, TrafficManager

__all__ = ["TMConfig", "TMResult", "TrafficManager", "parse_tm_section"]
