"""Fragments through a NAT TM (overlay/tm/fragments.py): the first fragment finds or opens the connection,
the rest get the same translation; they leave as they came (same sizes), and what the receiver
reassembles is exactly the translated datagram with every checksum right. Early fragments are held
until their first fragment comes, within limits, and expire when it never does."""

from __future__ import annotations

import dataclasses

import pytest

from overlay.tm.config import ConntrackConfig
from overlay.tm.core import SECOND_CHANCE, TrafficManager

from .addresses import (
    CLIENT, CLIENT6, FIRST_PORT, MANAGEMENT, REMOTE, REMOTE6, SERVER1, SERVER1_6, VIP, VIP6, XLATE, XLATE6,
)
from .conftest import lab_config_with_dns
from .packets import checksum_problems, flow, fragments, reassemble, udp

DNS_SIZED = bytes(range(256)) * 12    # 3,072 bytes: EDNS answers, IKE, SIP
BULK = bytes(range(251)) * 33         # 8,283 bytes


def through(tm: TrafficManager, pieces: list[bytes], now: float = 1.0) -> list[bytes]:
    """Every packet the TM sends for `pieces`, in order; each piece must be passed or held."""
    out: list[bytes] = []
    for piece in pieces:
        result = tm.receive(piece, now)
        assert result.action in ("overlay", "hold"), result.reason
        if result.action == "overlay":
            out += [result.packet, *result.released]
    return out


def expect(translated: bytes, pieces_out: list[bytes], pieces_in: list[bytes]) -> None:
    assert sorted(map(len, pieces_out)) == sorted(map(len, pieces_in)), "fragments leave as they came"
    whole = reassemble(pieces_out)
    assert whole == translated
    assert checksum_problems(whole) == []


CASES = {
    # name: (the datagram, what the TM makes of it unfragmented — the oracle is the TM's own whole-packet path)
    "client to the DNS service, IPv4, 3 KB": (udp(CLIENT, 5000, VIP, 53, DNS_SIZED), 1480),
    "client to the DNS service, IPv6, 8 KB": (udp(CLIENT6, 5000, VIP6, 53, BULK), 1280),
    "server out through SNAT, IPv4, 8 KB": (udp(SERVER1, 6000, REMOTE, 5060, BULK), 1280),
    "server out through SNAT, IPv6, 3 KB": (udp(SERVER1_6, 6000, REMOTE6, 500, DNS_SIZED), 1480),
}


@pytest.mark.parametrize(("datagram", "size"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("order", ["in order", "first last", "reversed"])
def test_fragments_get_the_translation_of_their_first_fragment(datagram: bytes, size: int, order: str) -> None:
    translated = TrafficManager(lab_config_with_dns()).receive(datagram, 1.0).packet
    assert translated is not None
    pieces = fragments(datagram, size)
    assert len(pieces) >= 3
    sent = {"in order": pieces, "first last": pieces[1:] + pieces[:1], "reversed": pieces[::-1]}[order]
    tm = TrafficManager(lab_config_with_dns())
    expect(translated, through(tm, sent), pieces)
    assert tm.snapshot()["fragments"]["held_fragments"] == 0


def test_both_directions_of_a_fragmented_conversation() -> None:
    tm = TrafficManager(lab_config_with_dns())
    request = udp(CLIENT, 5000, VIP, 53, DNS_SIZED)
    forward = reassemble(through(tm, fragments(request, 1480)))
    server = flow(forward)
    assert (server.src, server.sport, server.dport) == (CLIENT, 5000, 53) and server.dst in (SERVER1, "203.0.113.11")
    answer = udp(server.dst, server.dport, CLIENT, 5000, BULK)
    back = reassemble(through(tm, fragments(answer, 1480)))
    back_flow = flow(back)
    assert (back_flow.src, back_flow.sport, back_flow.dst, back_flow.dport) == (VIP, 53, CLIENT, 5000)
    assert checksum_problems(back) == []
    counters = tm.counters()
    assert counters["translated.fragment"] == len(fragments(request, 1480)) - 1 + len(fragments(answer, 1480)) - 1
    assert not any(name.startswith(("invalid.", "unsupported.")) for name, count in counters.items() if count)


def test_snat_of_a_fragmented_datagram_uses_the_port_block() -> None:
    tm = TrafficManager(lab_config_with_dns())
    out = flow(reassemble(through(tm, fragments(udp(SERVER1, 6000, REMOTE, 5060, BULK), 1280))))
    assert (out.src, out.sport) == (XLATE, FIRST_PORT)
    out6 = flow(reassemble(through(tm, fragments(udp(SERVER1_6, 6000, REMOTE6, 5060, BULK), 1280))))
    assert (out6.src, out6.sport) == (XLATE6, FIRST_PORT)


def test_early_fragments_whose_first_never_comes_expire_and_are_counted() -> None:
    tm = TrafficManager(lab_config_with_dns())
    pieces = fragments(udp(CLIENT, 5000, VIP, 53, BULK), 1480)
    assert through(tm, pieces[1:], now=10.0) == []
    assert tm.snapshot()["fragments"]["held_fragments"] == len(pieces) - 1
    assert tm.next_deadline() == 40.0
    tm.expire(39.9)
    assert tm.snapshot()["fragments"]["held_fragments"] == len(pieces) - 1
    tm.expire(40.0)
    assert tm.snapshot()["fragments"] == {"datagrams": 0, "held_fragments": 0, "held_bytes": 0}
    assert tm.counters()["dropped.fragment_timeout"] == len(pieces) - 1
    assert tm.next_deadline() is None


def test_a_flood_of_early_fragments_from_one_source_is_bounded() -> None:
    tm = TrafficManager(lab_config_with_dns())
    refused = 0
    for ident in range(400):      # 400 datagrams' worth of non-first fragments, firsts never sent
        datagram = udp(CLIENT, 5000 + ident, VIP, 53, DNS_SIZED)
        _, *rest = _v4_fragments_with_id(datagram, ident)
        for piece in rest:
            refused += tm.receive(piece, 1.0).reason == "fragment-limit"
    limits = tm._fragments.limits
    assert tm.snapshot()["fragments"]["held_fragments"] == limits.max_held_per_source
    assert refused == 400 * 2 - limits.max_held_per_source
    # Another source still gets its fragments through.
    other = udp("198.51.100.11", 5000, VIP, 53, DNS_SIZED)
    expect(TrafficManager(lab_config_with_dns()).receive(other, 1.0).packet, through(tm, fragments(other, 1480)[::-1]),
           fragments(other, 1480))


def _v4_fragments_with_id(datagram: bytes, ident: int) -> list[bytes]:
    patched = datagram[:4] + ident.to_bytes(2, "big") + datagram[6:]
    return fragments(patched, 1480)


def test_a_first_fragment_that_is_dropped_takes_its_held_fragments_with_it() -> None:
    tm = TrafficManager(lab_config_with_dns())
    first, *rest = fragments(udp(CLIENT, 5000, VIP, 5353, DNS_SIZED), 1480)   # no service on 5353
    assert through(tm, rest) == []
    assert tm.receive(first, 1.0).reason == "no-service"
    assert tm.counters()["dropped.fragment_orphan"] == len(rest)
    assert tm.snapshot()["fragments"]["held_fragments"] == 0


def test_a_marked_fragment_without_translation_goes_back_for_a_second_chance() -> None:
    tm = TrafficManager(lab_config_with_dns())
    pieces = fragments(udp(CLIENT, 5000, VIP, 53, DNS_SIZED), 1480)
    assert tm.receive(pieces[1], 1.0, SECOND_CHANCE).action == "bounce"
    assert tm.receive(pieces[0], 1.0, SECOND_CHANCE).action == "bounce"   # UDP: ask the draining TM first


def test_a_fragment_of_a_datagram_whose_connection_ended_is_not_translated() -> None:
    config = lab_config_with_dns()
    tm = TrafficManager(dataclasses.replace(config, conntrack=ConntrackConfig(1000, {"udp_unreplied": 5.0})))
    first, second, *_ = fragments(udp(CLIENT, 5000, VIP, 53, DNS_SIZED), 1480)
    assert tm.receive(first, 1.0).action == "overlay"
    assert tm.receive(second, 2.0).action == "overlay"
    tm.expire(6.0)     # the UDP connection timed out before the datagram's 30 s: no translation outlives it
    assert tm.snapshot()["fragments"]["datagrams"] == 1
    assert tm.receive(second, 6.5).action == "hold"


def test_the_hosts_own_fragments_pass_from_a_management_address_only() -> None:
    tm = TrafficManager(lab_config_with_dns())
    first, second = fragments(udp(MANAGEMENT, 8080, CLIENT, 5000, DNS_SIZED), 1480)[:2]
    assert [tm.from_local(piece, 1.0).action for piece in (first, second)] == ["overlay", "overlay"]
    stray = fragments(udp(SERVER1, 8080, CLIENT, 5000, DNS_SIZED), 1480)[1]
    assert tm.from_local(stray, 1.0).reason == "not-management-source"


def test_ipv6_fragments_with_destination_options_after_the_fragment_header() -> None:
    """Only the first fragment carries the headers after the fragment header: the datagram key must come
    from what every fragment repeats (the fragment header's next header), or the rest would wait in vain."""
    plain = udp(CLIENT6, 5000, VIP6, 53, DNS_SIZED)
    options = bytes([17, 0, 1, 4, 0, 0, 0, 0])          # destination options: PadN, next header UDP
    length = int.from_bytes(plain[4:6], "big") + len(options)
    datagram = plain[:4] + length.to_bytes(2, "big") + bytes([60]) + plain[7:40] + options + plain[40:]
    translated = TrafficManager(lab_config_with_dns()).receive(datagram, 1.0).packet
    assert translated is not None
    pieces = fragments(datagram, 1280)
    tm = TrafficManager(lab_config_with_dns())
    expect(translated, through(tm, pieces), pieces)
    assert tm.snapshot()["fragments"]["held_fragments"] == 0
