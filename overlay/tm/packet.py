"""The TM's view of the raw IPv4/IPv6 packets it receives: the checked views of `overlay.wire`, which the
distributor reads too, so the two roles cannot disagree on what a packet is (tests/test_wire_agreement.py).

`parse_ip` → (version, protocol, transport offset, end) or a reason; `parse_transport` → (flow key, info),
an `IcmpError` or a reason; fragments through `parse_fragment` and `parse_first_fragment`. Flow keys are
described in `overlay.wire.views`.
"""

from __future__ import annotations

from overlay.wire.views import (
    ADDRESS_LENGTH,
    ADDRESS_OFFSET,
    ECHO_REPLY_MARK,
    ECHO_REQUEST_MARK,
    ICMP,
    ICMPV6,
    TCP,
    UDP,
    IcmpError,
    parse_first_fragment,
    parse_fragment,
    parse_ip,
    parse_transport,
)

__all__ = [
    "ADDRESS_LENGTH", "ADDRESS_OFFSET", "ECHO_REPLY_MARK", "ECHO_REQUEST_MARK", "ICMP", "ICMPV6", "TCP", "UDP",
    "IcmpError", "parse_first_fragment", "parse_fragment", "parse_ip", "parse_transport",
]
