"""Every reason a traffic manager gives for what it did with a packet, and the counter each one feeds.

Reasons are the `reason` of a `TMResult`; every result increments exactly one counter, so an operator
can answer "why was this dropped?" from `/metrics` alone. Drops with a category (`invalid:`,
`malformed:`, `unsupported:`) count under that category; translations under `translated.`; firewall and
management pass-through under `forwarded.`; plain drops under `dropped.`.
"""

from __future__ import annotations

# What the packet views refuse a packet with (the distributor counts the same words): shared, not repeated.
from overlay.wire.reasons import (  # re-exported (`X as X`): every reason is an attribute of this module
    FRAGMENT as FRAGMENT,
    INVALID_ICMP_NO_STATE as INVALID_ICMP_NO_STATE,
    MALFORMED_EMPTY as MALFORMED_EMPTY,
    MALFORMED_ICMP_INNER as MALFORMED_ICMP_INNER,
    MALFORMED_IPV4_HEADER_LENGTH as MALFORMED_IPV4_HEADER_LENGTH,
    MALFORMED_IPV4_TOTAL_LENGTH as MALFORMED_IPV4_TOTAL_LENGTH,
    MALFORMED_IPV6_CHAIN as MALFORMED_IPV6_CHAIN,
    MALFORMED_IPV6_EXTENSION as MALFORMED_IPV6_EXTENSION,
    MALFORMED_IPV6_FRAGMENT as MALFORMED_IPV6_FRAGMENT,
    MALFORMED_TCP_OFFSET as MALFORMED_TCP_OFFSET,
    MALFORMED_TRUNCATED_ICMP as MALFORMED_TRUNCATED_ICMP,
    MALFORMED_TRUNCATED_IPV4 as MALFORMED_TRUNCATED_IPV4,
    MALFORMED_TRUNCATED_IPV6 as MALFORMED_TRUNCATED_IPV6,
    MALFORMED_TRUNCATED_TCP as MALFORMED_TRUNCATED_TCP,
    MALFORMED_TRUNCATED_UDP as MALFORMED_TRUNCATED_UDP,
    MALFORMED_UDP_LENGTH as MALFORMED_UDP_LENGTH,
    MALFORMED_VERSION as MALFORMED_VERSION,
    UNSUPPORTED_FRAGMENT as UNSUPPORTED_FRAGMENT,
    UNSUPPORTED_ICMP_TYPE as UNSUPPORTED_ICMP_TYPE,
    UNSUPPORTED_IPV6_EXTENSION as UNSUPPORTED_IPV6_EXTENSION,
    UNSUPPORTED_PROTOCOL as UNSUPPORTED_PROTOCOL,
)

# -- action "overlay": the packet goes back to the distributor ------------------------------------------
DNAT = "dnat"                          # client → virtual service, rewritten to a server
REVERSE_DNAT = "reverse-dnat"          # server → client reply, source rewritten back to the virtual address
SNAT = "snat"                          # NAT-able source → outside, source rewritten to the xlate address
REVERSE_SNAT = "reverse-snat"          # outside → xlate reply, destination rewritten back to the inside host
HAIRPIN = "hairpin"                    # NAT-able source → virtual service: DNAT and SNAT at once
REVERSE_HAIRPIN = "reverse-hairpin"    # the server's reply to a hairpin connection
ICMP_RELATED = "icmp-related"          # ICMP error about a tracked NAT flow, outer and quoted header translated
FIREWALL_ALLOW = "firewall-allow"      # firewall mode: packet of an allowed connection, original direction
FIREWALL_REPLY = "firewall-reply"      # firewall mode: packet of an allowed connection, reply direction
FIREWALL_RELATED = "firewall-related"  # firewall mode: ICMP error about a tracked connection
MANAGEMENT = "management"              # to/from a management address (action "local" inbound, "overlay" outbound)
FRAGMENT_TRANSLATED = "fragment"       # a non-first fragment, given the translation its first fragment got
FRAGMENT_FORWARDED = "firewall-fragment"  # firewall mode: a non-first fragment of an allowed datagram

# -- action "hold": nothing to send yet --------------------------------------------------------------
FRAGMENT_HELD = "fragment-held"        # a non-first fragment before its first: held until it comes

# -- action "bounce": back to the distributor for the second-chance TM named in the GRE key ------------
SECOND_CHANCE = "second-chance"        # no state, but the distributor marked the packet: a draining TM has it
# -- action "decline": back to the distributor, to be opened on the row's TM ---------------------------
DECLINED = "declined"                  # a last-chance packet (we are draining) that would open a new flow

# -- action "drop" ----------------------------------------------------------------------------------
INVALID_NO_STATE = "invalid:no-state"                    # no connection and the packet does not open one
INVALID_FOREIGN_PORT = "invalid:foreign-port-block"      # to our xlate address, port outside our block
INVALID_FOREIGN_XLATE = "invalid:foreign-xlate"          # no state, to another TM's xlate address (fleet_xlate)
CONNTRACK_FULL = "conntrack-full"                        # table at max_entries and nothing may be evicted
CONNTRACK_CLASH = "conntrack-clash"                      # the reply tuple is already used by another connection
PORTS_EXHAUSTED = "ports-exhausted"                      # no free port in the xlate address's port block
NO_XLATE_ADDRESS = "no-xlate-address"                    # NAT-able source of a family without xlate address
NO_SERVICE = "no-service"                                # to a virtual address, but no service on that port
NO_SERVER = "no-server"                                  # the service has no server with weight > 0
NO_RULE = "no-rule"                                      # NAT mode: opener that is neither to a service nor NAT-able
FIREWALL_DENY = "firewall-deny"                          # firewall mode: opener no rule allows
# from_local: the host's stack sent something not from a management address (IPv6 router solicitations,
# MLD reports of the TUN...). Host noise, not a symmetry failure: deliberately not an `invalid:` reason.
NOT_MANAGEMENT_SOURCE = "not-management-source"

MALFORMED_ICMP_MISMATCH = "malformed:icmp-error-mismatch"   # ICMP error not addressed to the quoted sender
MALFORMED_TCP_FLAGS = "malformed:tcp-flags"                 # SYN with RST or FIN: never a valid opener
MALFORMED_REPLICATION = "malformed:replication"             # a replication batch from the distributor we cannot read

FRAGMENT_LIMIT = "fragment-limit"                        # an early fragment no limit lets us hold
FRAGMENT_ORPHAN = "fragment-orphan"                      # held for a first fragment that was itself dropped
FRAGMENT_TIMEOUT = "fragment-timeout"                    # held, and its first fragment never came


ALL_REASONS: tuple[str, ...] = tuple(
    value for name, value in sorted(globals().items())
    if name.isupper() and isinstance(value, str) and name != "FRAGMENT"   # FRAGMENT: a signal, never a result
)

_FORWARDED = frozenset({FIREWALL_ALLOW, FIREWALL_REPLY, FIREWALL_RELATED, FRAGMENT_FORWARDED})
_TRANSLATED = frozenset({DNAT, REVERSE_DNAT, SNAT, REVERSE_SNAT, HAIRPIN, REVERSE_HAIRPIN, ICMP_RELATED,
                         FRAGMENT_TRANSLATED})
# Reasons of packets that are passed on (actions "overlay" and "local"); every other reason is a drop.
PASSING = _FORWARDED | _TRANSLATED | {MANAGEMENT, FRAGMENT_HELD}  # held fragments leave later


def counter_name(reason: str) -> str:
    """`invalid:no-state` → `invalid.no_state`, `dnat` → `translated.dnat`,
    `no-service` → `dropped.no_service`."""
    if ":" in reason:
        category, detail = reason.split(":", 1)
        return f"{category}.{detail.replace('-', '_')}"
    detail = reason.replace("-", "_")
    if reason in _TRANSLATED:
        return f"translated.{detail}"
    if reason in _FORWARDED:
        return f"forwarded.{detail}"
    if reason == SECOND_CHANCE or reason == DECLINED:
        return f"bounced.{detail}"
    if reason == FRAGMENT_HELD:
        return "held.fragment"
    if reason == MANAGEMENT:
        # Counted separately per direction by the core (`local.management`, `forwarded.management`).
        return f"local.{detail}"
    return f"dropped.{detail}"
