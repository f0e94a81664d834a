"""The fuzz corpus's valid seeds, written as packet files: `python -m tests.fuzz.seeds` (re)writes
tests/fuzz/corpus/{ip,gre}/*.hex from the test suites' packet builders. Files added by hand (inputs a
fuzz run found) are left alone.

The seeds cover each parser branch worth mutating from: IPv4 with and without options, first and later
fragments, IPv6 with skipped and refused extension headers, TCP, UDP, ICMP echo and ICMP errors quoting
each, in the reference lab's address plan (so the TM core finds services, xlate addresses and state);
and GRE-in-UDP payloads of every kind the distributor accepts, plus the header flags it must refuse.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt

from overlay import gre
from tests.distributor import packets as P
from tests.tm.addresses import (
    CLIENT, CLIENT6, MANAGEMENT, REMOTE, REMOTE6, ROUTER, ROUTER6, SERVER1, SERVER1_6, VIP, VIP6, XLATE, XLATE6,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
ACK = P.TCP_ACK

_TCP_SYN = P.tcp(CLIENT, 40000, VIP, 80)
_TCP6_SYN = P.tcp(CLIENT6, 40000, VIP6, 80)
_SNAT_UDP = P.udp(SERVER1, 6000, REMOTE, 53, payload=b"query")

IP_SEEDS: dict[str, bytes] = {
    "v4-tcp-syn-to-vip": _TCP_SYN,
    "v4-tcp-synack-server-to-client": P.tcp(SERVER1, 80, CLIENT, 40000, flags=P.TCP_SYN | ACK),
    "v4-tcp-ack-payload": P.tcp(CLIENT, 40000, VIP, 80, flags=ACK, payload=b"GET / HTTP/1.1\r\n\r\n", df=True),
    "v4-tcp-rst": P.tcp(CLIENT, 40000, VIP, 80, flags=dpkt.tcp.TH_RST),
    "v4-ip-options": P.tcp(CLIENT, 40001, VIP, 80, options=b"\x01\x01\x01\x00"),
    "v4-udp-to-vip-dns": P.udp(CLIENT, 5353, VIP, 53, payload=b"dns?"),
    "v4-udp-snat-out": _SNAT_UDP,
    "v4-udp-reply-to-xlate": P.udp(REMOTE, 53, XLATE, 1024, payload=b"answer"),
    "v4-echo-request-out": P.echo(SERVER1, REMOTE, 7),
    "v4-echo-reply-to-xlate": P.echo(REMOTE, XLATE, 1024, request=False),
    "v4-icmp-too-big-about-reply": P.icmp_error(ROUTER, P.tcp(VIP, 80, CLIENT, 40000, flags=ACK, df=True)),
    "v4-icmp-unreachable-about-snat": P.icmp_error(ROUTER, P.udp(XLATE, 1024, REMOTE, 53), kind="unreachable"),
    "v4-icmp-time-exceeded-about-syn": P.icmp_error(ROUTER, _TCP_SYN, kind="time-exceeded"),
    "v4-first-fragment": P.udp(CLIENT, 5353, VIP, 53, payload=b"f" * 64, mf=True),
    "v4-later-fragment": P.ip(CLIENT, VIP, 17, b"g" * 64, offset_units=9),
    "v4-from-management": P.tcp(MANAGEMENT, 22, REMOTE, 50000, flags=ACK),
    "v6-tcp-syn-to-vip": _TCP6_SYN,
    "v6-udp-snat-out": P.udp(SERVER1_6, 6000, REMOTE6, 53, payload=b"query"),
    "v6-echo-reply-to-xlate": P.echo(REMOTE6, XLATE6, 1024, request=False),
    "v6-icmp-too-big-about-reply": P.icmp_error(ROUTER6, P.tcp(VIP6, 80, CLIENT6, 40000, flags=ACK)),
    "v6-hop-by-hop-and-dest-opts": P.tcp(CLIENT6, 40002, VIP6, 80, extensions=((P.HOP_BY_HOP, b""), (P.DEST_OPTS, b""))),
    "v6-routing-header": P.tcp(CLIENT6, 40003, VIP6, 80, extensions=((P.ROUTING, b""),)),
    "v6-first-fragment": P.udp(CLIENT6, 5353, VIP6, 53, payload=b"f" * 64,
                               extensions=((P.FRAGMENT, P.fragment_body(0, True)),)),
    "v6-later-fragment": P.ipv6(CLIENT6, VIP6, 17, b"g" * 64, extensions=((P.FRAGMENT, P.fragment_body(9, False)),)),
}

_SECOND_CHANCE_KEY = gre.make_key(None, gre.default_tm_id("tm2"))
GRE_SEEDS: dict[str, bytes] = {
    "plain-v4": gre.encapsulate(_SNAT_UDP),
    "plain-v6": gre.encapsulate(_TCP6_SYN),
    "keyed": gre.encapsulate(_TCP_SYN, key=0x5),
    "checksum-key-sequence": struct.pack("!HH", gre.FLAG_CHECKSUM | gre.FLAG_KEY | gre.FLAG_SEQUENCE, gre.PROTO_IPV4)
    + bytes(12) + _TCP_SYN,
    "keepalive": gre.encapsulate(bytes(32), protocol=gre.KEEPALIVE_PROTOCOL),
    "second-chance": gre.encapsulate(_TCP_SYN, key=_SECOND_CHANCE_KEY, protocol=gre.SECOND_CHANCE_PROTOCOL),
    "declined": gre.encapsulate(P.udp(CLIENT, 5353, VIP, 53), key=gre.LAST_CHANCE, protocol=gre.DECLINED_PROTOCOL),
    "routing-flag": struct.pack("!HH", gre.FLAG_ROUTING, gre.PROTO_IPV4) + _TCP_SYN,
}


def write() -> None:
    for kind, seeds in (("ip", IP_SEEDS), ("gre", GRE_SEEDS)):
        (CORPUS / kind).mkdir(parents=True, exist_ok=True)
        for name, packet in seeds.items():
            (CORPUS / kind / f"seed-{name}.hex").write_text(packet.hex() + "\n")


if __name__ == "__main__":
    write()
