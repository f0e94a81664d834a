"""TUN offloads (overlay/runtime/offload.py and its C twin in overlay/_fastio.c).

- The compiled and the pure-Python `split` and `coalesce` agree byte for byte on random mixes: super-packets
  of both families with options, FIN/PSH/CWR, the ECN bit, odd sizes; partial checksums; malformed headers;
  runs of segments interleaved with other flows, with a corrupted checksum, a sequence or IPv4 id gap, a PSH
  in the middle, a size change, UDP and fragments.
- `split(coalesce(run))` gives the run back: a super-packet holds exactly the segments it was made of.
- The kernel is the oracle (lab): a super-packet written into a TUN with offloads and forwarded out of a
  TUN without them comes out as the segments `split` makes; `coalesce`'s super-packet comes out as the
  segments it was made of. Negative control: a super-packet whose partial checksum is off comes out with
  TCP checksums that no longer verify — what the oracle would show of a coalescing bug.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import struct

import pytest

from overlay.checksum import internet_checksum, pseudo_header_sum
from overlay.runtime import offload
from overlay.runtime.offload import VNET_HEADER, coalesce, split
from tests.runtime.lab import in_ns, inside, namespaces, require_lab

try:
    from overlay import _fastio  # type: ignore[attr-defined]
except ImportError:   # not built here: the reference alone is checked (by the kernel oracle)
    _fastio = None

requires_compiled = pytest.mark.skipif(_fastio is None, reason="overlay._fastio was not built")

SRC4, DST4 = bytes([198, 51, 100, 7]), bytes([203, 0, 113, 9])
SRC6 = bytes.fromhex("20010db8000a00000000000000000007")
DST6 = bytes.fromhex("20010db8000b00000000000000000009")
ACK, PSH, FIN, CWR, ECE, SYN = 0x10, 0x08, 0x01, 0x80, 0x40, 0x02


def tcp_packet(version: int, payload: bytes, *, seq: int = 1000, ip_id: int = 7, flags: int = ACK,
               options: bytes = b"", sport: int = 40000, dport: int = 80, checksum: bool = True,
               partial: bool = False, ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 TCP packet; `partial`: the TCP checksum field holds the pseudo-header sum (what a
    TUN with CSUM hands over), else the complete checksum."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 555, (20 + len(options)) // 4 << 4,
                                flags, 4096, 0, 0) + options + payload)
    if version == 4:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id & 0xFFFF, 0x4000, ttl, 6, 0,
                                       SRC4, DST4))
        header[10:12] = internet_checksum(header).to_bytes(2, "big")
        src, dst = SRC4, DST4
    else:
        header = bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, ttl, SRC6, DST6))
        src, dst = SRC6, DST6
    pseudo = pseudo_header_sum(src, dst, 6, len(tcp))
    if partial:
        tcp[16:18] = pseudo.to_bytes(2, "big")
    elif checksum:
        tcp[16:18] = internet_checksum(tcp, pseudo).to_bytes(2, "big")
    return bytes(header + tcp)


def udp_packet(version: int, payload: bytes, *, fragment: bool = False) -> bytes:
    udp = bytearray(struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload)
    if version == 4:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 9, 0x2000 if fragment else 0, 64, 17,
                                       0, SRC4, DST4))
        header[10:12] = internet_checksum(header).to_bytes(2, "big")
        src, dst = SRC4, DST4
    else:
        header = bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, SRC6, DST6))
        src, dst = SRC6, DST6
    udp[6:8] = (internet_checksum(udp, pseudo_header_sum(src, dst, 17, len(udp))) or 0xFFFF).to_bytes(2, "big")
    return bytes(header + udp)


def super_read(version: int, payload: bytes, mss: int, *, flags: int = ACK | PSH, options: bytes = b"",
               ecn: bool = False, seq: int = 1000, ip_id: int = 7) -> tuple[bytes, bytes]:
    """(vnet header, packet) as a TUN with TSO hands over a super-packet."""
    packet = tcp_packet(version, payload, seq=seq, ip_id=ip_id, flags=flags, options=options, partial=True)
    l4 = 20 if version == 4 else 40
    gso = (offload.GSO_TCPV4 if version == 4 else offload.GSO_TCPV6) | (offload.GSO_ECN if ecn else 0)
    return VNET_HEADER.pack(offload.F_NEEDS_CSUM, gso, l4 + 20 + len(options), mss, l4, 16), packet


def random_super(rng: random.Random) -> tuple[bytes, bytes]:
    version = rng.choice((4, 6))
    mss = rng.choice((536, 1000, 1208, 1448, 1460, 7))
    size = rng.choice((0, 1, mss - 1, mss, mss + 1, 3 * mss, rng.randrange(1, 64000)))
    options = rng.choice((b"", b"\x01\x01\x08\x0a" + rng.randbytes(8), b"\x02\x04\x05\xb4"))
    flags = ACK | rng.choice((0, PSH, FIN, PSH | FIN, CWR, CWR | PSH, ECE))
    return super_read(version, rng.randbytes(size), mss, flags=flags, options=options, ecn=rng.random() < 0.2,
                      seq=rng.randrange(1 << 32), ip_id=rng.randrange(1 << 16))


def partial_read(rng: random.Random) -> tuple[bytes, bytes]:
    """A small packet with its checksum left partial (NEEDS_CSUM, no GSO): TCP or UDP."""
    version = rng.choice((4, 6))
    l4 = 20 if version == 4 else 40
    if rng.random() < 0.5:
        packet = tcp_packet(version, rng.randbytes(rng.randrange(0, 200)), partial=True)
        offset = 16
    else:
        packet = bytearray(udp_packet(version, rng.randbytes(rng.randrange(0, 200))))
        src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
        packet[l4 + 6:l4 + 8] = pseudo_header_sum(src, dst, 17, len(packet) - l4).to_bytes(2, "big")
        packet, offset = bytes(packet), 6
    return VNET_HEADER.pack(offload.F_NEEDS_CSUM, 0, 0, 0, l4, offset), packet


MALFORMED = [
    (b"\x00" * 4, b""),                                                           # a short header
    (VNET_HEADER.pack(1, 0, 0, 0, 30, 16), tcp_packet(4, b"x")),                  # checksum beyond the end
    (VNET_HEADER.pack(1, offload.GSO_UDP_L4, 28, 100, 20, 6), udp_packet(4, b"y" * 300)),   # USO: never asked
    (VNET_HEADER.pack(1, offload.GSO_TCPV6, 40, 100, 20, 16), tcp_packet(4, b"z" * 300)),   # wrong family
    (VNET_HEADER.pack(1, offload.GSO_TCPV4, 40, 0, 20, 16), tcp_packet(4, b"z" * 300)),     # gso_size 0
    (VNET_HEADER.pack(1, offload.GSO_TCPV4, 40, 100, 12, 16), tcp_packet(4, b"z" * 300)),   # TCP inside IP
    (VNET_HEADER.pack(1, offload.GSO_TCPV4, 40, 100, 20, 6), tcp_packet(4, b"z" * 300)),    # not TCP's offset
    (VNET_HEADER.pack(0, 0, 0, 0, 0, 0), b""),                                    # empty: passed on as is
]


def as_list(result: list[bytes] | bytes | str) -> list[bytes] | str:
    return result if isinstance(result, (list, str)) else [result]


@requires_compiled
def test_compiled_split_is_the_reference_on_random_reads() -> None:
    rng = random.Random(10)
    reads = [random_super(rng) for _ in range(300)] + [partial_read(rng) for _ in range(100)] + MALFORMED
    reads += [(bytes(10), tcp_packet(4, b"plain")), (bytes(10), udp_packet(6, b"plain"))]
    for header, packet in reads:
        assert as_list(_fastio.split(header, packet)) == split(header, packet), (header.hex(), len(packet))


def test_split_cuts_as_tcp_gso_segment_does() -> None:
    header, packet = super_read(4, bytes(range(256)) * 10, 1000, flags=ACK | PSH | FIN | CWR, seq=0xFFFFFF00,
                                ip_id=0xFFFF)
    segments = split(header, packet)
    assert isinstance(segments, list) and [len(each) - 40 for each in segments] == [1000, 1000, 560]
    assert [int.from_bytes(each[4:6], "big") for each in segments] == [0xFFFF, 0, 1]        # ids count up
    assert [int.from_bytes(each[24:28], "big") for each in segments] == [0xFFFFFF00, (0xFFFFFF00 + 1000) % (1 << 32),
                                                                          (0xFFFFFF00 + 2000) % (1 << 32)]
    assert [each[33] for each in segments] == [ACK | CWR, ACK, ACK | PSH | FIN]
    for each in segments:   # every checksum complete
        assert internet_checksum(each[:20]) == 0
        assert internet_checksum(each[20:], pseudo_header_sum(SRC4, DST4, 6, len(each) - 20)) == 0
    assert b"".join(each[40:] for each in segments) == packet[40:]


def test_a_partial_checksum_is_completed_and_zero_goes_out_as_ffff() -> None:
    rng = random.Random(11)
    for _ in range(50):
        header, packet = partial_read(rng)
        (completed,) = split(header, packet)
        version = completed[0] >> 4
        l4 = 20 if version == 4 else 40
        src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
        assert internet_checksum(completed[l4:], pseudo_header_sum(src, dst, completed[9] if version == 4 else
                                                                   completed[6], len(completed) - l4)) == 0


def run_of(version: int, count: int, size: int, *, last: int | None = None, seq: int = 5000, ip_id: int = 100,
           push_last: bool = True, **kwargs: object) -> list[bytes]:
    """`count` consecutive segments of one flow, as `split` makes them."""
    sizes = [size] * (count - 1) + [size if last is None else last]
    packets, offset = [], 0
    for index, each in enumerate(sizes):
        flags = ACK | (PSH if push_last and index == count - 1 else 0)
        packets.append(tcp_packet(version, bytes([index % 256]) * each, seq=seq + offset, ip_id=ip_id + index,
                                  flags=flags, **kwargs))  # type: ignore[arg-type]
        offset += each
    return packets


def test_coalesce_makes_one_super_packet_of_a_run_and_split_gives_it_back() -> None:
    for version in (4, 6):
        run = run_of(version, 30, 1448, last=700, options=b"\x01\x01\x08\x0a" + bytes(8))
        (write,) = coalesce(run)
        header, packet = write[:10], write[10:]
        flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HEADER.unpack(header)
        assert (flags, gso_size, csum_start, csum_offset) == (offload.F_NEEDS_CSUM, 1448, 20 if version == 4 else 40, 16)
        assert gso_type == (offload.GSO_TCPV4 if version == 4 else offload.GSO_TCPV6)
        assert split(header, packet) == run


def test_coalesce_keeps_apart_what_the_kernel_would_not_cut_back_the_same() -> None:
    good = run_of(4, 4, 1000)
    corrupt = list(good)
    corrupt[2] = corrupt[2][:-1] + bytes([corrupt[2][-1] ^ 1])       # a payload bit flipped: bad checksum
    gap = run_of(4, 2, 1000) + run_of(4, 2, 1000, seq=5000 + 2000 + 1, ip_id=102)  # a sequence gap
    id_gap = run_of(4, 2, 1000, push_last=False) + run_of(4, 2, 1000, seq=7000, ip_id=103)
    mid_push = run_of(4, 2, 1000) + run_of(4, 2, 1000, seq=7000, ip_id=102)   # PSH ends a run
    grows = run_of(4, 2, 500, push_last=False) + run_of(4, 1, 1000, seq=6000, ip_id=102)
    other_port = run_of(4, 2, 1000, push_last=False) + run_of(4, 2, 1000, seq=7000, ip_id=102, sport=40001)
    cases = {
        "corrupt": (corrupt, [2, 1, 1]),
        "sequence gap": (gap, [2, 2]),
        "id gap": (id_gap, [2, 2]),
        "push in the middle": (mid_push, [2, 2]),
        "a larger segment after": (grows, [2, 1]),
        "another flow": (other_port, [2, 2]),
        "syn": ([tcp_packet(4, b"", flags=SYN)] * 2, [1, 1]),
        "fin": (run_of(4, 2, 100, push_last=False)[:1] + [tcp_packet(4, b"x" * 100, seq=5100, ip_id=101, flags=ACK | FIN)],
                [1, 1]),
        "udp and fragments": ([udp_packet(4, b"a" * 100), udp_packet(4, b"a" * 100, fragment=True)], [1, 1]),
    }
    for name, (packets, expected) in cases.items():
        counted = offload.coalesce_counted(packets)
        assert [count for _, count in counted] == expected, name
        # What is not coalesced goes out unchanged, behind an empty header.
        for write, count in counted:
            if count == 1:
                assert write[:10] == offload.EMPTY_HEADER and write[10:] in packets, name


def random_mix(rng: random.Random) -> list[bytes]:
    packets: list[bytes] = []
    for _ in range(rng.randrange(1, 12)):
        choice = rng.random()
        version = rng.choice((4, 6))
        if choice < 0.5:
            count, size = rng.randrange(1, 50), rng.choice((100, 1000, 1448, 1460))
            run = run_of(version, count, size, last=rng.randrange(1, size + 1), seq=rng.randrange(1 << 32),
                         ip_id=rng.randrange(1 << 16), push_last=rng.random() < 0.5, sport=rng.choice((1, 2)))
            if rng.random() < 0.3:   # damage one
                index = rng.randrange(len(run))
                damaged = bytearray(run[index])
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
                run[index] = bytes(damaged)
            packets += run
        elif choice < 0.7:
            packets.append(udp_packet(version, rng.randbytes(rng.randrange(0, 300)), fragment=rng.random() < 0.3))
        elif choice < 0.8:
            packets.append(rng.randbytes(rng.randrange(0, 80)))
        else:
            packets.append(tcp_packet(version, rng.randbytes(rng.randrange(0, 100)),
                                      flags=rng.choice((SYN, ACK, ACK | FIN, ACK | PSH, ACK | CWR))))
    return packets


@requires_compiled
def test_compiled_coalesce_is_the_reference_on_random_mixes() -> None:
    rng = random.Random(12)
    for _ in range(200):
        packets = random_mix(rng)
        assert _fastio.coalesce(packets) == coalesce(packets)


def test_every_write_splits_back_into_the_packets_it_carries() -> None:
    rng = random.Random(13)
    for _ in range(100):
        packets = random_mix(rng)
        rebuilt: list[bytes] = []
        for write in coalesce(packets):
            parts = split(write[:10], write[10:])
            assert isinstance(parts, list)
            rebuilt += parts
        assert rebuilt == packets


# -- the kernel as the oracle ------------------------------------------------------------------------

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def open_tun(name: str, vnet: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TUN | IFF_NO_PI | (offload.IFF_VNET_HDR if vnet else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    if vnet:
        fcntl.ioctl(fd, offload.TUNSETVNETHDRSZ, struct.pack("i", offload.VNET_HEADER_LEN))
        fcntl.ioctl(fd, offload.TUNSETOFFLOAD, offload.OFFLOADS)
    return fd


def read_all(fd: int, count: int) -> list[bytes]:
    packets: list[bytes] = []
    for _ in range(count + 200):      # bounded: neighbour discovery and the like may come in between
        if len(packets) == count or not select.select([fd], [], [], 2.0)[0]:
            break
        packet = os.read(fd, 65536)
        if (packet[9] if packet[0] >> 4 == 4 else packet[6]) != 6:
            continue                  # not TCP (IPv6 router solicitations, MLD reports): not ours
        packets.append(packet)
    return packets


def forwarded(packet: bytes) -> bytes:
    """`packet` as the kernel forwards it: one hop less."""
    out = bytearray(packet)
    if out[0] >> 4 == 4:
        out[8] -= 1
        out[10:12] = b"\0\0"
        out[10:12] = internet_checksum(out[:20]).to_bytes(2, "big")
    else:
        out[7] -= 1
    return bytes(out)


@pytest.fixture
def oracle():  # type: ignore[no-untyped-def]
    """A namespace with TUN `offin` (vnet header, CSUM|TSO4|TSO6) forwarding into TUN `plain` (none):
    what is written into `offin` comes out of `plain` as the kernel segments and checksums it."""
    require_lab()
    with namespaces("oracle") as names:
        ns = names["oracle"]
        with inside(ns):
            into, out = open_tun("offin", True), open_tun("plain", False)
        try:
            for command in (
                "sysctl -qw net.ipv4.ip_forward=1", "sysctl -qw net.ipv6.conf.all.forwarding=1",
                "sysctl -qw net.ipv4.conf.all.rp_filter=0", "sysctl -qw net.ipv4.conf.default.rp_filter=0",
                "ip link set offin up", "ip link set plain up",
                "ip addr add 192.0.2.1/32 dev offin", "ip -6 addr add 2001:db8:f::1/128 dev offin nodad",
                "ip route add 203.0.113.0/24 dev plain", "ip -6 route add 2001:db8:b::/48 dev plain",
                "sysctl -qw net.ipv4.conf.offin.rp_filter=0",
            ):
                in_ns(ns, *command.split())
            yield into, out
        finally:
            os.close(into)
            os.close(out)


@pytest.mark.lab
@pytest.mark.parametrize("version", [4, 6])
def test_the_kernel_segments_a_super_packet_as_split_does(oracle, version: int) -> None:  # type: ignore[no-untyped-def]
    into, out = oracle
    rng = random.Random(version)
    for flags in (ACK | PSH, ACK | PSH | FIN, ACK | CWR):
        header, packet = super_read(version, rng.randbytes(20000), 1400, flags=flags,
                                    options=b"\x01\x01\x08\x0a" + rng.randbytes(8), ip_id=rng.randrange(1 << 16))
        expected = split(header, packet)
        assert isinstance(expected, list) and len(expected) == 15
        os.write(into, header + packet)
        assert read_all(out, len(expected)) == [forwarded(each) for each in expected]


@pytest.mark.lab
@pytest.mark.parametrize("version", [4, 6])
def test_the_kernel_cuts_a_coalesced_super_packet_back_into_its_segments(oracle, version: int) -> None:  # type: ignore[no-untyped-def]
    into, out = oracle
    rng = random.Random(20 + version)
    run = run_of(version, 20, 1380, last=rng.randrange(1, 1380), seq=rng.randrange(1 << 32),
                 ip_id=rng.randrange(1 << 16), options=b"\x01\x01\x08\x0a" + rng.randbytes(8))
    for writes in (coalesce(run), _fastio.coalesce(run) if _fastio is not None else []):
        if not writes:
            continue
        assert len(writes) == 1
        os.write(into, writes[0])
        assert read_all(out, len(run)) == [forwarded(each) for each in run]


@pytest.mark.lab
def test_negative_control_a_wrong_partial_checksum_shows_in_every_segment(oracle) -> None:  # type: ignore[no-untyped-def]
    into, out = oracle
    run = run_of(4, 5, 1000)
    write = bytearray(coalesce(run)[0])
    write[10 + 36:10 + 38] = ((int.from_bytes(write[46:48], "big") + 1) & 0xFFFF).to_bytes(2, "big")
    os.write(into, bytes(write))
    segments = read_all(out, len(run))
    assert len(segments) == len(run)
    assert segments != [forwarded(each) for each in run]
    assert all(internet_checksum(each[20:], pseudo_header_sum(SRC4, DST4, 6, len(each) - 20)) != 0 for each in segments)


def mangled(rng: random.Random, data: bytes) -> bytes:
    """`data` cut short, or with a few bytes changed (headers included), or both."""
    out = bytearray(data[:rng.randrange(0, len(data) + 1)] if rng.random() < 0.5 else data)
    for _ in range(rng.randrange(0, 4)):
        if out:
            out[rng.randrange(min(len(out), 80))] = rng.randrange(256)
    return bytes(out)


@requires_compiled
def test_compiled_and_reference_agree_on_mangled_input() -> None:
    """Nothing the kernel makes, but nothing may crash either, and both implementations must agree."""
    rng = random.Random(14)
    for _ in range(1500):
        header, packet = random_super(rng) if rng.random() < 0.7 else partial_read(rng)
        header, packet = mangled(rng, header), mangled(rng, packet)
        assert as_list(_fastio.split(header, packet)) == split(header, packet), (header.hex(), packet.hex())
    for _ in range(200):
        packets = [mangled(rng, packet) for packet in random_mix(rng)]
        assert _fastio.coalesce(packets) == coalesce(packets)
        for start in range(len(packets)):
            assert _fastio.flow_run(packets, start, 0) == offload.flow_run(packets, start, 0)
