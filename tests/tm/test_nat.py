"""NAT mode, packet by packet: conversations through tm1 of the reference lab.

Each case is a conversation run on a fresh TM: every step gives the packet sent in, the expected action
and reason, and the expected addresses and ports of what comes out. Every emitted packet's checksums
are recomputed from scratch by the oracle in `packets.py`.
"""

from __future__ import annotations

import pytest

from overlay.tm.core import TrafficManager

from .addresses import (
    CLIENT, CLIENT6, CLIENT_B, FIRST_PORT, MANAGEMENT, REMOTE, REMOTE6, SERVER1, SERVER1_6, SERVER2, SERVER2_6,
    VIP, VIP6, XLATE, XLATE6,
)
from .conftest import lab_config_with_dns
from .packets import ACK, FIN, RST, SYN, Flow, checksum_problems, echo, flow, payload, tcp, udp, udp_without_checksum

T, U, I = "tcp", "udp", "icmp"

CONVERSATIONS = [
    {
        "description": "IPv4 client to the VIP: DNAT to server1, reply reverse-DNATed, data keeps the server",
        "steps": [
            (tcp(CLIENT, 40000, VIP, 80, SYN), "overlay", "dnat", Flow(T, CLIENT, 40000, SERVER1, 80)),
            (tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), "overlay", "reverse-dnat", Flow(T, VIP, 80, CLIENT, 40000)),
            (tcp(CLIENT, 40000, VIP, 80, ACK, b"GET / HTTP/1.0\r\n\r\n"), "overlay", "dnat",
             Flow(T, CLIENT, 40000, SERVER1, 80)),
            (tcp(SERVER1, 80, CLIENT, 40000, ACK, b"HTTP/1.0 200 OK\r\n"), "overlay", "reverse-dnat",
             Flow(T, VIP, 80, CLIENT, 40000)),
        ],
    },
    {
        "description": "IPv6 client to the VIP: DNAT and reverse DNAT",
        "steps": [
            (tcp(CLIENT6, 40000, VIP6, 80, SYN), "overlay", "dnat", Flow(T, CLIENT6, 40000, SERVER1_6, 80)),
            (tcp(SERVER1_6, 80, CLIENT6, 40000, SYN | ACK), "overlay", "reverse-dnat",
             Flow(T, VIP6, 80, CLIENT6, 40000)),
        ],
    },
    {
        "description": "round robin: the second connection goes to server2, each keeps its server",
        "steps": [
            (tcp(CLIENT, 40000, VIP, 80, SYN), "overlay", "dnat", Flow(T, CLIENT, 40000, SERVER1, 80)),
            (tcp(CLIENT_B, 40001, VIP, 80, SYN), "overlay", "dnat", Flow(T, CLIENT_B, 40001, SERVER2, 80)),
            (tcp(CLIENT, 40000, VIP, 80, ACK), "overlay", "dnat", Flow(T, CLIENT, 40000, SERVER1, 80)),
            (tcp(SERVER2, 80, CLIENT_B, 40001, SYN | ACK), "overlay", "reverse-dnat",
             Flow(T, VIP, 80, CLIENT_B, 40001)),
        ],
    },
    {
        "description": "UDP service, IPv4: server port differs from the virtual port and is restored",
        "steps": [
            (udp(CLIENT, 5000, VIP, 53), "overlay", "dnat", Flow(U, CLIENT, 5000, SERVER1, 53)),
            (udp(CLIENT_B, 5000, VIP, 53), "overlay", "dnat", Flow(U, CLIENT_B, 5000, SERVER2, 5353)),
            (udp(SERVER2, 5353, CLIENT_B, 5000), "overlay", "reverse-dnat", Flow(U, VIP, 53, CLIENT_B, 5000)),
        ],
    },
    {
        "description": "UDP service, IPv6",
        "steps": [
            (udp(CLIENT6, 5000, VIP6, 53), "overlay", "dnat", Flow(U, CLIENT6, 5000, SERVER1_6, 53)),
            (udp(SERVER1_6, 53, CLIENT6, 5000), "overlay", "reverse-dnat", Flow(U, VIP6, 53, CLIENT6, 5000)),
        ],
    },
    {
        "description": "server-originated TCP, IPv4: SNAT to the xlate address from the port block",
        "steps": [
            (tcp(SERVER1, 5555, REMOTE, 443, SYN), "overlay", "snat", Flow(T, XLATE, FIRST_PORT, REMOTE, 443)),
            (tcp(REMOTE, 443, XLATE, FIRST_PORT, SYN | ACK), "overlay", "reverse-snat",
             Flow(T, REMOTE, 443, SERVER1, 5555)),
            (tcp(SERVER2, 5555, REMOTE, 443, SYN), "overlay", "snat",
             Flow(T, XLATE, FIRST_PORT + 1, REMOTE, 443)),
        ],
    },
    {
        "description": "server-originated UDP, IPv6: SNAT and reverse SNAT",
        "steps": [
            (udp(SERVER2_6, 6000, REMOTE6, 123), "overlay", "snat", Flow(U, XLATE6, FIRST_PORT, REMOTE6, 123)),
            (udp(REMOTE6, 123, XLATE6, FIRST_PORT), "overlay", "reverse-snat", Flow(U, REMOTE6, 123, SERVER2_6, 6000)),
        ],
    },
    {
        "description": "UDP without checksum (IPv4) is translated and keeps checksum 0",
        "steps": [
            (udp_without_checksum(SERVER1, 6000, REMOTE, 123), "overlay", "snat",
             Flow(U, XLATE, FIRST_PORT, REMOTE, 123)),
        ],
    },
    {
        "description": "ping from a server, IPv4: the echo identifier is translated like a port",
        "steps": [
            (echo(SERVER1, REMOTE, 77), "overlay", "snat", Flow(I, XLATE, FIRST_PORT, REMOTE, 8)),
            (echo(REMOTE, XLATE, FIRST_PORT, reply=True), "overlay", "reverse-snat", Flow(I, REMOTE, 77, SERVER1, 0)),
        ],
    },
    {
        "description": "ping from a server, IPv6 (ICMPv6 checksum covers the pseudo-header)",
        "steps": [
            (echo(SERVER1_6, REMOTE6, 77), "overlay", "snat", Flow(I, XLATE6, FIRST_PORT, REMOTE6, 128)),
            (echo(REMOTE6, XLATE6, FIRST_PORT, reply=True), "overlay", "reverse-snat",
             Flow(I, REMOTE6, 77, SERVER1_6, 129)),
        ],
    },
    {
        "description": "hairpin: server2 → VIP is DNATed to server1 and SNATed, so the reply comes back",
        "steps": [
            (tcp(SERVER2, 3333, VIP, 80, SYN), "overlay", "hairpin", Flow(T, XLATE, FIRST_PORT, SERVER1, 80)),
            (tcp(SERVER1, 80, XLATE, FIRST_PORT, SYN | ACK), "overlay", "reverse-hairpin",
             Flow(T, VIP, 80, SERVER2, 3333)),
        ],
    },
    {
        "description": "hairpin to itself: server1 → VIP → server1 works through the xlate address",
        "steps": [
            (tcp(SERVER1, 3333, VIP, 80, SYN), "overlay", "hairpin", Flow(T, XLATE, FIRST_PORT, SERVER1, 80)),
            (tcp(SERVER1, 80, XLATE, FIRST_PORT, SYN | ACK), "overlay", "reverse-hairpin",
             Flow(T, VIP, 80, SERVER1, 3333)),
        ],
    },
    {
        "description": "hairpin, IPv6: server2 → VIP6 via the IPv6 xlate address",
        "steps": [
            (tcp(SERVER2_6, 3333, VIP6, 80, SYN), "overlay", "hairpin", Flow(T, XLATE6, FIRST_PORT, SERVER1_6, 80)),
            (tcp(SERVER1_6, 80, XLATE6, FIRST_PORT, SYN | ACK), "overlay", "reverse-hairpin",
             Flow(T, VIP6, 80, SERVER2_6, 3333)),
        ],
    },
    {
        "description": "management address: delivered locally, unmodified (TCP and ping)",
        "steps": [
            (tcp(CLIENT, 50000, MANAGEMENT, 8080, SYN), "local", "management",
             Flow(T, CLIENT, 50000, MANAGEMENT, 8080)),
            (echo(CLIENT, MANAGEMENT, 9), "local", "management", Flow(I, CLIENT, 9, MANAGEMENT, 8)),
        ],
    },
    {
        "description": "a new SYN after RST reopens the connection on the same server and port",
        "steps": [
            (tcp(SERVER1, 5555, REMOTE, 443, SYN), "overlay", "snat", Flow(T, XLATE, FIRST_PORT, REMOTE, 443)),
            (tcp(REMOTE, 443, XLATE, FIRST_PORT, RST | ACK), "overlay", "reverse-snat",
             Flow(T, REMOTE, 443, SERVER1, 5555)),
            (tcp(SERVER1, 5555, REMOTE, 443, SYN), "overlay", "snat", Flow(T, XLATE, FIRST_PORT, REMOTE, 443)),
        ],
    },
    # -- negative cases --------------------------------------------------------------------------
    {
        "description": "invalid: a server's reply on a TM without state (the distributor broke symmetry)",
        "steps": [(tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), "drop", "invalid:no-state", None)],
    },
    {
        "description": "invalid: mid-connection ACK to the VIP without state",
        "steps": [(tcp(CLIENT, 40000, VIP, 80, ACK, b"data"), "drop", "invalid:no-state", None)],
    },
    {
        "description": "invalid: FIN and RST without state",
        "steps": [
            (tcp(CLIENT, 40000, VIP, 80, FIN | ACK), "drop", "invalid:no-state", None),
            (tcp(CLIENT, 40000, VIP, 80, RST), "drop", "invalid:no-state", None),
        ],
    },
    {
        "description": "a SYN or a ping to the xlate address opens nothing, and is no symmetry failure",
        "steps": [
            (tcp(REMOTE, 443, XLATE, 2000, SYN), "drop", "no-rule", None),
            (echo(REMOTE, XLATE, 2000), "drop", "no-rule", None),
        ],
    },
    {
        "description": "invalid: a TCP ACK to the xlate address without state",
        "steps": [(tcp(REMOTE, 443, XLATE, 2000, ACK), "drop", "invalid:no-state", None)],
    },
    {
        "description": "invalid: UDP to the xlate address without state",
        "steps": [(udp(REMOTE, 123, XLATE, 2000), "drop", "invalid:no-state", None)],
    },
    {
        # Decided by state, not by port: a pool member may talk UDP from its service port on its own (an
        # NTP or DNS server querying upstream). A reply whose state is elsewhere is the distributor's to
        # mark (second chance), not ours to guess.
        "description": "a stateless UDP packet from a server's service port opens like any NAT-able source",
        "steps": [
            (udp(SERVER1, 53, REMOTE, 53), "overlay", "snat", Flow(U, XLATE, FIRST_PORT, REMOTE, 53)),
            (udp(REMOTE, 53, XLATE, FIRST_PORT), "overlay", "reverse-snat", Flow(U, REMOTE, 53, SERVER1, 53)),
        ],
    },
    {
        "description": "invalid: echo reply without state",
        "steps": [(echo(REMOTE, XLATE, 5000, reply=True), "drop", "invalid:no-state", None)],
    },
    {
        "description": "invalid: SYN with RST is never an opener",
        "steps": [(tcp(CLIENT, 40000, VIP, 80, SYN | RST), "drop", "malformed:tcp-flags", None)],
    },
    {
        "description": "reply to the wrong xlate port after a real connection: still invalid",
        "steps": [
            (tcp(SERVER1, 5555, REMOTE, 443, SYN), "overlay", "snat", Flow(T, XLATE, FIRST_PORT, REMOTE, 443)),
            (tcp(REMOTE, 443, XLATE, FIRST_PORT + 1, SYN | ACK), "drop", "invalid:no-state", None),
        ],
    },
    {
        "description": "no service on that port of the VIP",
        "steps": [(tcp(CLIENT, 40000, VIP, 443, SYN), "drop", "no-service", None)],
    },
    {
        "description": "ping to the VIP: no ICMP service",
        "steps": [(echo(CLIENT, VIP, 1), "drop", "no-service", None)],
    },
    {
        "description": "outside → inside host directly: neither a service nor NAT-able",
        "steps": [(tcp(CLIENT, 40000, SERVER1, 22, SYN), "drop", "no-rule", None)],
    },
]


@pytest.mark.parametrize("case", CONVERSATIONS, ids=[case["description"] for case in CONVERSATIONS])
def test_conversation(case: dict) -> None:
    tm = TrafficManager(lab_config_with_dns())
    now = 100.0
    for number, (packet, action, reason, expected) in enumerate(case["steps"]):
        result = tm.receive(packet, now)
        assert (result.action, result.reason) == (action, reason), f"step {number}"
        if expected is None:
            assert result.packet is None
        else:
            assert result.packet is not None
            assert flow(result.packet) == expected, f"step {number}"
            assert checksum_problems(result.packet) == [], f"step {number}"
            # Only addresses, ports and checksums change: length and payload are kept.
            assert len(result.packet) == len(packet)
            assert payload(result.packet) == payload(packet)
        now += 0.5


def test_every_result_is_counted_under_its_reason(tm: TrafficManager) -> None:
    tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 1.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 40000, SYN | ACK), 1.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 40001, ACK), 1.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 40002, ACK), 1.0)
    tm.receive(b"", 1.0)
    counters = tm.counters()
    assert counters["translated.dnat"] == 1
    assert counters["translated.reverse_dnat"] == 1
    assert counters["invalid.no_state"] == 2
    assert counters["malformed.empty"] == 1
    assert counters["packets.received"] == 5
    assert counters["conntrack.created"] == 1


def test_trailing_bytes_after_the_ip_packet_are_not_forwarded(tm: TrafficManager) -> None:
    packet = tcp(CLIENT, 40000, VIP, 80, SYN)
    result = tm.receive(packet + b"\x00" * 6, 1.0)
    assert result.packet is not None and len(result.packet) == len(packet)
    assert checksum_problems(result.packet) == []


def test_from_local_passes_management_traffic_unmodified(tm: TrafficManager) -> None:
    packet = tcp(MANAGEMENT, 8080, CLIENT, 50000, SYN | ACK)
    result = tm.from_local(packet, 1.0)
    assert (result.action, result.packet, result.reason) == ("overlay", packet, "management")
    assert tm.counters()["forwarded.management"] == 1


@pytest.mark.parametrize("packet, reason", [
    (tcp(SERVER1, 80, CLIENT, 50000, SYN | ACK), "not-management-source"),
    (b"\x45\x00", "malformed:truncated-ipv4"),
], ids=["not from a management address", "truncated"])
def test_from_local_drops_what_is_not_management_traffic(tm: TrafficManager, packet: bytes, reason: str) -> None:
    result = tm.from_local(packet, 1.0)
    assert (result.action, result.packet, result.reason) == ("drop", None, reason)


def test_no_xlate_address_of_the_family() -> None:
    import dataclasses

    from .packets import A
    config = dataclasses.replace(lab_config_with_dns(), xlate=(A(XLATE),))
    tm = TrafficManager(config)
    assert tm.receive(udp(SERVER1_6, 6000, REMOTE6, 123), 1.0).reason == "no-xlate-address"
    assert tm.receive(udp(SERVER1, 6000, REMOTE, 123), 1.0).reason == "snat"


def test_drained_pool_refuses_new_connections() -> None:
    import dataclasses

    from overlay.tm.config import ServerConfig
    from .packets import A
    config = lab_config_with_dns()
    web = dataclasses.replace(config.services[0], servers=(ServerConfig(A(SERVER1), 80, weight=0),))
    tm = TrafficManager(dataclasses.replace(config, services=(web,) + config.services[1:]))
    assert tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 1.0).reason == "no-server"


@pytest.mark.parametrize("packet, reason", [
    (tcp(REMOTE, 443, XLATE, 40000, ACK), "invalid:foreign-port-block"),
    (tcp(REMOTE, 443, XLATE, 20000, ACK), "invalid:no-state"),
    (echo(REMOTE, XLATE, 5, reply=True), "invalid:foreign-port-block"),
], ids=["outside our block", "inside our block", "echo identifier outside our block"])
def test_replies_to_another_tms_port_block_are_reported_as_such(packet: bytes, reason: str) -> None:
    """With a shared xlate address, a reply for another TM's block points at the distributor's owner map."""
    import dataclasses
    tm = TrafficManager(dataclasses.replace(lab_config_with_dns(), port_range=(20000, 29999)))
    assert tm.receive(packet, 1.0).reason == reason


def test_snat_ports_come_from_the_configured_block() -> None:
    import dataclasses
    tm = TrafficManager(dataclasses.replace(lab_config_with_dns(), port_range=(20000, 20001)))
    ports = [flow(tm.receive(udp(SERVER1, 6000 + i, REMOTE, 123), 1.0).packet).sport for i in range(2)]
    assert sorted(ports) == [20000, 20001]
    third = tm.receive(udp(SERVER1, 6002, REMOTE, 123), 1.0)
    assert (third.action, third.reason) == ("drop", "ports-exhausted")
    assert tm.counters()["dropped.ports_exhausted"] == 1
    assert tm.snapshot()["ports"]["by_address"][XLATE]["udp"] == {"in_use": 2, "capacity": 2, "exhausted": 1}


def test_snapshot_reports_states_table_ports_services_and_drops(tm: TrafficManager) -> None:
    import json
    tm.receive(tcp(CLIENT, 40000, VIP, 80, SYN), 1.0)
    tm.receive(tcp(SERVER1, 5555, REMOTE, 443, SYN), 1.0)
    tm.receive(tcp(SERVER1, 80, CLIENT, 1, ACK), 1.0)
    tm.from_local(tcp(SERVER1, 80, CLIENT, 1, ACK), 1.0)
    snapshot = json.loads(json.dumps(tm.snapshot()))
    assert snapshot["connections"]["total"] == 2
    assert snapshot["connections"]["by_state"]["tcp_syn_sent"] == 2
    assert snapshot["table"] == {"size": 2, "limit": 65536, "fullness": 0.0}
    assert snapshot["ports"]["by_address"] == {XLATE: {"tcp": {"in_use": 1, "capacity": 64512, "exhausted": 0}}}
    web = snapshot["services"][0]
    assert (web["name"], web["virtual"], [s["connections"] for s in web["servers"]]) == ("web", VIP, [1, 0])
    assert snapshot["drops"] == {"invalid:no-state": 1, "not-management-source": 1}


def test_ipv4_options_are_kept_and_the_transport_found_after_them(tm: TrafficManager) -> None:
    import dpkt

    from .packets import A
    segment = dpkt.tcp.TCP(sport=40000, dport=80, flags=SYN, data=b"opts")
    options = b"\x94\x04\x00\x00"          # router alert, 4 bytes
    packet = bytes(dpkt.ip.IP(src=A(CLIENT).packed, dst=A(VIP).packed, p=6, hl=6, opts=options, data=segment))
    result = tm.receive(packet, 1.0)
    assert (result.action, result.reason) == ("overlay", "dnat")
    assert flow(result.packet) == Flow(T, CLIENT, 40000, SERVER1, 80)
    assert result.packet[20:24] == options
    assert checksum_problems(result.packet) == []


def test_a_udp_checksum_that_computes_to_zero_is_sent_as_all_ones(tm: TrafficManager) -> None:
    # This payload word (found by search) makes the translated datagram's checksum compute to 0,
    # which UDP must send as 0xFFFF: a 0 would mean "no checksum".
    packet = udp(SERVER1, 6000, REMOTE, 53, (38135).to_bytes(2, "big"))
    result = tm.receive(packet, 1.0)
    assert (result.reason, result.packet[26:28]) == ("snat", b"\xff\xff")
    assert checksum_problems(result.packet) == []
