"""Everything around the table: packets from the overlay, edges, overrides, the MTU, fleet changes and
the counters an operator reads."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay import gre
from overlay.distributor.core import Distributor
from tests.distributor import packets as P
from tests.distributor.configs import CELLS, distributor, with_tables

CLIENT = "198.51.100.10"
VIP = "203.0.113.80"
NODE = "203.0.113.10"
TM1 = ("192.0.2.71", 4754)
EDGE = ("192.0.2.130", 4754)

EDGES = """
[[edge]]
name = "cloud-b"
underlay = "192.0.2.130"
prefixes = ["198.51.100.128/25", "2001:db8:1:8000::/65"]
"""


@pytest.fixture(scope="module")
def core() -> Distributor:
    return distributor(with_tables(CELLS, EDGES))


# -- from the overlay ------------------------------------------------------------------------------------
INNER = P.tcp(NODE, 40000, CLIENT, 80)  # what a TM sends after translating: on its way out
KEEPALIVE = struct.pack("!HH", 0, gre.KEEPALIVE_PROTOCOL) + b"OVKA" + bytes(28)

OVERLAY_CASES = [
    # description, GRE payload, peer, (action, tm, reason, packet)
    ("from a TM: forward the inner packet, no hashing", gre.encapsulate(INNER), TM1, ("forward", "tm1", "from-tm", INNER)),
    ("from a TM, keyed GRE: forward", gre.encapsulate(INNER, key=0x5), TM1, ("forward", "tm1", "from-tm", INNER)),
    ("from a TM, another fleet's id: drop", gre.encapsulate(INNER, key=0x10000), TM1, ("drop", None, "wrong-fleet-id", None)),
    ("from a TM with checksum+key+sequence flags: forward", struct.pack("!HH", 0xB000, 0x0800) + bytes(12) + INNER, TM1, ("forward", "tm1", "from-tm", INNER)),
    ("keepalive echo from a TM: local", KEEPALIVE, TM1, ("local", "tm1", "keepalive", KEEPALIVE[4:])),
    ("from a TM to an edge's prefix: encapsulated to the edge",
     gre.encapsulate(P.udp(NODE, 5, "198.51.100.200", 53)), TM1,
     ("forward", "tm1", "from-tm:edge", gre.encapsulate(P.udp(NODE, 5, "198.51.100.200", 53)))),
    # Negative cases.
    ("keepalive from an unknown peer: drop", KEEPALIVE, ("192.0.2.99", 4754), ("drop", None, "keepalive-from-unknown-peer", None)),
    ("data from an unknown peer: drop", gre.encapsulate(INNER), ("192.0.2.99", 4754), ("drop", None, "unknown-peer", None)),
    ("a TM answering from another source port (flow entropy) is still that TM", gre.encapsulate(INNER), ("192.0.2.71", 40001), ("forward", "tm1", "from-tm", INNER)),
    ("GRE shorter than 4 bytes: drop", b"\0\0\x08", TM1, ("drop", None, "malformed:gre", None)),
    ("GRE version 1: drop", struct.pack("!HH", 1, 0x0800) + INNER, TM1, ("drop", None, "malformed:gre", None)),
    ("GRE routing bit: drop", struct.pack("!HH", 0x4000, 0x0800) + INNER, TM1, ("drop", None, "malformed:gre", None)),
    ("GRE key flag without the key: drop", struct.pack("!HH", 0x2000, 0x0800) + b"\0\0", TM1, ("drop", None, "malformed:gre", None)),
    ("GRE carrying Ethernet (0x6558): drop", struct.pack("!HH", 0, 0x6558) + INNER, TM1, ("drop", None, "unsupported-gre-protocol", None)),
]


@pytest.mark.parametrize(("payload", "peer", "expected"), [pytest.param(*c[1:], id=c[0]) for c in OVERLAY_CASES])
def test_from_overlay(core: Distributor, payload: bytes, peer: tuple[str, int], expected: tuple[object, ...]) -> None:
    verdict = core.from_overlay(payload, peer)
    assert (verdict.action, verdict.tm, verdict.reason, verdict.packet) == expected
    if verdict.reason.endswith(":edge"):
        assert verdict.dest == EDGE


def test_from_edge_is_decided_like_the_tun(core: Distributor) -> None:
    """An edge agent's host is a client: its packet to the VIP gets the same verdict as from the TUN."""
    packet = P.tcp("198.51.100.200", 40000, VIP, 80)
    from_edge = core.from_overlay(gre.encapsulate(packet), EDGE)
    from_tun = core.from_tun(packet)
    assert (from_edge.action, from_edge.tm, from_edge.reason) == (from_tun.action, from_tun.tm, "hash-src")
    assert core.from_overlay(gre.encapsulate(b"\x45"), EDGE).reason == "malformed:truncated-ipv4"


@pytest.mark.parametrize(
    ("packet", "dest"),
    [
        pytest.param(P.udp("203.0.113.1", 5, "198.51.100.129", 53), EDGE, id="v4 route into an edge prefix"),
        pytest.param(P.udp("2001:db8:1::1", 5, "2001:db8:1:8000::5", 53), EDGE, id="v6 route into an edge prefix"),
        pytest.param(P.udp("203.0.113.1", 5, "198.51.100.127", 53), None, id="just outside the edge prefix: the TUN"),
    ],
)
def test_forward_goes_to_the_edge_owning_the_destination(core: Distributor, packet: bytes, dest: object) -> None:
    verdict = core.from_tun(packet)
    assert verdict.action == "forward" and verdict.dest == dest
    if dest is None:
        assert verdict.packet == packet and verdict.reason == "route"
    else:
        assert verdict.reason == "route:edge" and gre.decapsulate(verdict.packet).inner == packet


# -- overrides -----------------------------------------------------------------------------------------------
OVERRIDES = """
[decision.overrides]
"unknown>unknown" = "drop"
"node>unknown" = "hash-src"
"nat-able>virtual" = "route"
"""


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        pytest.param(P.udp(CLIENT, 1, "198.51.100.20", 2), ("drop", None, "cell-drop"), id="unknown>unknown = drop"),
        pytest.param(P.udp("203.0.113.17", 1, VIP, 2), ("forward", None, "route"), id="nat-able>virtual = route"),
    ],
)
def test_overrides(packet: bytes, expected: tuple[object, ...]) -> None:
    core = distributor(with_tables(CELLS, OVERRIDES))
    verdict = core.from_tun(packet)
    assert (verdict.action, verdict.tm, verdict.reason) == expected
    assert "*" in core.config.decision.render()


def test_override_hash_src_hashes_the_source() -> None:
    """node>unknown overridden to hash-src: the node's address now picks the TM, for every client."""
    core = distributor(with_tables(CELLS, OVERRIDES))
    tms = {core.from_tun(P.tcp(NODE, 80, f"198.51.100.{h}", 40000)).tm for h in range(100, 160)}
    assert len(tms) == 1
    plain = distributor(CELLS)
    assert len({plain.from_tun(P.tcp(NODE, 80, f"198.51.100.{h}", 40000)).tm for h in range(100, 160)}) > 1


# -- MTU -------------------------------------------------------------------------------------------------------
# Underlay MTU 1500, IPv4 underlay: outer IPv4 20 + UDP 8 + GRE with key 8 = 36, so the largest inner packet is 1464.
LARGEST = 1500 - 36


def _sized_tcp(src: str, dst: str, total: int, df: bool = False) -> bytes:
    """A TCP packet of exactly `total` bytes (DF only means something for IPv4)."""
    header = 20 if P.version_of(src) == 4 else 40
    extra = {"df": df} if header == 20 else {}
    return P.tcp(src, 40000, dst, 80, flags=P.TCP_ACK, payload=b"x" * (total - header - 20), **extra)


def test_largest_packet_fits(core: Distributor) -> None:
    packet = _sized_tcp(CLIENT, VIP, LARGEST, df=True)
    assert len(packet) == LARGEST
    assert core.from_tun(packet).action == "tm"


def test_too_big_with_df_answers_frag_needed(core: Distributor) -> None:
    packet = _sized_tcp(CLIENT, VIP, LARGEST + 1, df=True)
    verdict = core.from_tun(packet)
    assert (verdict.action, verdict.reason, verdict.tm) == ("forward", "too-big:icmp-sent", None)
    icmp = verdict.packet
    assert icmp[9] == 1 and icmp[12:16] == P.packed(VIP) and icmp[16:20] == P.packed(CLIENT)
    assert P.verify_ipv4_header(icmp) and P.verify_icmp(icmp)
    kind, code, _, _, mtu = struct.unpack_from("!BBHHH", icmp, 20)
    assert (kind, code, mtu) == (3, 4, LARGEST)
    assert icmp[28:] == packet[:28]  # the offending header + 8 bytes, as RFC 792 asks
    # Written into the TUN, the error is decided by the flow it quotes (VIP -> client, both unknown
    # as sources/destinations of that cell): routed to the client, never sent to a TM.
    routed = core.from_tun(icmp)
    assert (routed.action, routed.reason) == ("forward", "route")


def test_too_big_without_df_is_sent_anyway(core: Distributor) -> None:
    packet = _sized_tcp(CLIENT, VIP, LARGEST + 100, df=False)
    verdict = core.from_tun(packet)
    assert verdict.action == "tm" and gre.decapsulate(verdict.packet).inner == packet


def test_too_big_ipv6_answers_packet_too_big(core: Distributor) -> None:
    client, vip = "2001:db8:1::10", "2001:db8:80::80"
    packet = _sized_tcp(client, vip, LARGEST + 1, df=False)
    verdict = core.from_tun(packet)
    assert (verdict.action, verdict.reason) == ("forward", "too-big:icmp-sent")
    icmp = verdict.packet
    assert icmp[6] == 58 and icmp[8:24] == P.packed(vip) and icmp[24:40] == P.packed(client)
    assert P.verify_icmp(icmp)
    kind, code, _, mtu = struct.unpack_from("!BBHI", icmp, 40)
    assert (kind, code, mtu) == (2, 0, LARGEST)
    assert len(icmp) <= 1280 and icmp[48:] == packet[: len(icmp) - 48]


@pytest.mark.parametrize(
    ("client", "vip", "extra"),
    [("198.51.100.10", "203.0.113.80", {"df": True}), ("2001:db8:1::10", "2001:db8:80::80", {})],
    ids=["v4 with DF", "v6"],
)
def test_too_big_icmp_error_is_dropped_not_answered(core: Distributor, client: str, vip: str, extra: dict) -> None:
    """A router quoting a whole large reply (VIP -> client) sends an error that is itself too big for
    the tunnel. It is dropped: an error is never answered with an error (RFC 1122 3.2.2, RFC 4443 2.4)."""
    reply = P.tcp(vip, 80, client, 40000, flags=P.TCP_ACK, payload=b"y" * 1400)
    error = P.icmp_error("198.51.100.1" if ":" not in client else "2001:db8:1::1", reply, quote=len(reply), **extra)
    assert len(error) > LARGEST
    verdict = core.from_tun(error)
    assert (verdict.action, verdict.reason, verdict.packet) == ("drop", "too-big:icmp-error", None)
    assert core.counters()["reason.too-big:icmp-error"] >= 1


# -- fleet changes --------------------------------------------------------------------------------------------
CLIENTS = [P.tcp(f"198.51.100.{h}", 40000, VIP, 80) for h in range(100, 200)]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("drop", ("drop", None, "no-tm")), ("route", ("forward", None, "no-tm:route"))],
)
def test_all_down(policy: str, expected: tuple[object, ...]) -> None:
    core = distributor(with_tables(CELLS, f'[health]\nall_down = "{policy}"\n'))
    for name in ("tm1", "tm2", "tm3"):
        core.set_tm_up(name, False)
    for packet in CLIENTS[:10]:
        verdict = core.from_tun(packet)
        assert (verdict.action, verdict.tm, verdict.reason) == expected
    core.set_tm_up("tm2", True)
    assert {core.from_tun(packet).tm for packet in CLIENTS} == {"tm2"}


def test_all_down_keep_last_keeps_the_last_table() -> None:
    core = distributor(with_tables(CELLS, '[health]\nall_down = "keep-last"\n'))
    before = [core.from_tun(packet).tm for packet in CLIENTS]
    core.set_tm_up("tm1", False)
    core.set_tm_up("tm2", False)
    last = [core.from_tun(packet).tm for packet in CLIENTS]
    assert set(last) == {"tm3"}
    core.set_tm_up("tm3", False)
    assert [core.from_tun(packet).tm for packet in CLIENTS] == last != before
    # Keep-last keeps the whole last fleet: replies to an xlate address still reach their owner.
    reply = core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.103", 40000, flags=P.TCP_SYN | P.TCP_ACK))
    assert (reply.action, reply.tm, reply.reason) == ("tm", "tm3", "owner")


def test_all_down_drop_drops_owner_replies_too() -> None:
    core = distributor(CELLS)
    for name in ("tm1", "tm2", "tm3"):
        core.set_tm_up(name, False)
    reply = core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.103", 40000, flags=P.TCP_SYN | P.TCP_ACK))
    assert (reply.action, reply.reason) == ("drop", "owner-down")


def test_owner_and_management_verdicts_carry_flow_entropy() -> None:
    core = distributor(CELLS)
    hashes = {core.from_tun(P.tcp(f"198.51.100.{h}", 443, "203.0.113.103", 40000 + h, flags=P.TCP_ACK)).flow_hash for h in range(20, 60)}
    assert len(hashes) > 30  # distinct flows leave from spread outer source ports, not one


def test_down_tm_moves_only_its_rows_to_their_second_choice() -> None:
    core = distributor(CELLS)
    before = [core.from_tun(p) for p in CLIENTS]
    seconds = {p: core.table.choice(v.flow_hash & (core.table.rows - 1))[1] for p, v in zip(CLIENTS, before)}
    core.set_tm_up("tm1", False)
    for packet, old in zip(CLIENTS, before):
        new = core.from_tun(packet)
        assert new.tm == (seconds[packet] if old.tm == "tm1" else old.tm)
    assert core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.101", 40000)).reason == "owner-down"
    assert core.from_tun(P.tcp(CLIENT, 1, "203.0.113.201", 8080)).tm == "tm1"  # management still reaches it


def test_unknown_tm_name_is_refused(core: Distributor) -> None:
    with pytest.raises(KeyError):
        core.set_tm_up("tm9", False)


# -- counters --------------------------------------------------------------------------------------------------
def test_counters_name_every_outcome() -> None:
    """One packet per outcome; each is counted once by TM, by cell and by reason — nothing else."""
    probe = distributor(CELLS)
    client = next(f"198.51.100.{h}" for h in range(100, 200) if probe.from_tun(P.tcp(f"198.51.100.{h}", 1, VIP, 80)).tm != "tm1")
    hashed_tm = probe.from_tun(P.tcp(client, 1, VIP, 80)).tm
    core = distributor(CELLS)
    core.from_tun(P.tcp(client, 40000, VIP, 80))  # hash-src to hashed_tm
    core.from_tun(P.tcp(CLIENT, 40000, "198.51.100.20", 80))  # route
    core.from_tun(b"\x45\x00")  # malformed
    core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.101", 40000))  # owner tm1
    core.from_overlay(gre.encapsulate(INNER), TM1)  # from-tm
    core.from_overlay(b"\0", TM1)  # malformed GRE
    assert core.counters() == {
        f"tm.{hashed_tm}": 1,
        "tm.tm1": 1,
        "cell.unknown>virtual": 1,
        "cell.unknown>unknown": 1,
        "cell.unknown>xlate": 1,
        "reason.hash-src": 1,
        "reason.route": 1,
        "reason.owner": 1,
        "reason.malformed:truncated-ipv4": 1,
        "reason.from-tm": 1,
        "reason.malformed:gre": 1,
    }


def test_weight_zero_tm_still_receives_replies_to_its_xlate_addresses() -> None:
    """Weight 0 means "no share of the hashed traffic". Connections a TM source-NATed before it was
    reweighted to 0 (a config reload, to drain it) still get replies addressed to its xlate address; only
    it has their state, so they must still reach it."""
    core = distributor(CELLS.replace('underlay = "192.0.2.71:4754"', 'underlay = "192.0.2.71:4754"\nweight = 0'))
    assert core.from_tun(P.tcp(CLIENT, 40000, VIP, 80)).tm != "tm1"  # no hashed share
    verdict = core.from_tun(P.tcp("198.51.100.20", 443, "203.0.113.101", 40000, flags=P.TCP_SYN | P.TCP_ACK))
    assert (verdict.action, verdict.tm, verdict.reason) == ("tm", "tm1", "owner")


# -- never raises ------------------------------------------------------------------------------------------------
SEEDS = [P.tcp(CLIENT, 40000, VIP, 80, payload=b"x" * 1500, df=True), P.icmp_error("198.51.100.1", INNER),
         P.udp("2001:db8:1::10", 1, "2001:db8:80::80", 2, payload=b"y" * 1500), INNER]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 1600), st.integers(0, 255)), max_size=4), st.integers(0, 1600))
def test_core_never_raises_on_corrupt_packets(core: Distributor, seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    """Corrupted and truncated packets, from the TUN and from every kind of peer, get a verdict."""
    packet = bytearray(seed[: max(cut, 1)])
    for where, value in flips:
        packet[where % len(packet)] = value
    for verdict in (core.from_tun(bytes(packet)), core.from_overlay(gre.encapsulate(bytes(packet)), EDGE),
                    core.from_overlay(bytes(packet), TM1), core.from_overlay(gre.encapsulate(bytes(packet)), TM1)):
        assert verdict.action in ("tm", "forward", "local", "drop")
        assert verdict.action != "drop" or verdict.reason
