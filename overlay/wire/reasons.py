"""What a checked view says when it refuses a packet. Both roles count these words as they are: the TM as
drop reasons (`overlay.tm.reasons` re-exports them), the distributor as `reason.<word>` counters.

`malformed:` — the bytes contradict themselves or a standard (lengths that do not fit, an impossible header);
`unsupported:` — well formed, but not something a TM tracks (the distributor still decides these, on
addresses).
"""

from __future__ import annotations

MALFORMED_EMPTY = "malformed:empty"
MALFORMED_VERSION = "malformed:bad-ip-version"
MALFORMED_TRUNCATED_IPV4 = "malformed:truncated-ipv4"
MALFORMED_IPV4_HEADER_LENGTH = "malformed:bad-ipv4-header-length"
MALFORMED_IPV4_TOTAL_LENGTH = "malformed:bad-ipv4-total-length"
MALFORMED_TRUNCATED_IPV6 = "malformed:truncated-ipv6"
MALFORMED_IPV6_EXTENSION = "malformed:truncated-ipv6-extension"
MALFORMED_IPV6_CHAIN = "malformed:ipv6-extension-chain-too-long"   # more than ipv6.MAX_EXTENSIONS
MALFORMED_IPV6_FRAGMENT = "malformed:truncated-ipv6-fragment-header"
MALFORMED_TRUNCATED_TCP = "malformed:truncated-tcp"
MALFORMED_TCP_OFFSET = "malformed:bad-tcp-data-offset"
MALFORMED_TRUNCATED_UDP = "malformed:truncated-udp"
MALFORMED_UDP_LENGTH = "malformed:bad-udp-length"
MALFORMED_TRUNCATED_ICMP = "malformed:truncated-icmp"
MALFORMED_ICMP_INNER = "malformed:bad-icmp-error-inner"   # the quote: not an IP header of the error's family + 8

UNSUPPORTED_PROTOCOL = "unsupported:protocol"
UNSUPPORTED_IPV6_EXTENSION = "unsupported:ipv6-extension"
UNSUPPORTED_ICMP_TYPE = "unsupported:icmp-type"
UNSUPPORTED_FRAGMENT = "unsupported:fragment"            # a fragmented ICMP error

# An ICMP error whose quote names no tracked kind of flow (a later fragment, a protocol without ports, an
# ICMP message other than echo): well formed, but no connection can be found for it.
INVALID_ICMP_NO_STATE = "invalid:icmp-error-no-state"

# `views.parse_ip`'s word for a fragment, which `views.parse_fragment` reads: a signal, never a count.
FRAGMENT = "fragment?"
