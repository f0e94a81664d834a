"""`overlay replay` reading captures as they come from real capture tools (issue 12): pcapng with several
interfaces of different link types, files cut short, frames cut by the snaplen, Ethernet padding.

The captures are built here byte by byte (pcapng blocks, pcap records), independently of the reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import dpkt
import pytest

from overlay import gre
from overlay.cli import main
from overlay.flowspec import build_packet

CONFIG = str(Path(__file__).resolve().parents[1] / "config" / "distributor.toml")
ETHERNET, RAW = 1, 101
BASE = 1_700_000_000


def packets(count: int, size: int = 0) -> list[bytes]:
    return [build_packet(f"tcp 198.51.100.{100 + i % 100}:{40000 + i} > 203.0.113.80:80 size {size}") for i in range(count)]


def ethernet(packet: bytes, pad_to: int = 0) -> bytes:
    frame = b"\x02" * 6 + b"\x04" * 6 + (b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00") + packet
    return frame + b"\0" * max(0, pad_to - len(frame))


# -- pcapng, block by block, in either byte order ("<" or ">") ------------------------------------------
def block(kind: int, body: bytes, order: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(order + "II", kind, 12 + len(body)) + body + struct.pack(order + "I", 12 + len(body))


def shb(order: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def idb(linktype: int, tsresol: int | None = None, order: str = "<") -> bytes:
    options = b"" if tsresol is None else struct.pack(order + "HHB3x", 9, 1, tsresol) + struct.pack(order + "HH", 0, 0)
    return block(1, struct.pack(order + "HHI", linktype, 0, 65535) + options, order)


def epb(interface: int, seconds: float, data: bytes, resolution: int = 10**6, length: int | None = None, order: str = "<") -> bytes:
    units = round(seconds * resolution)
    header = struct.pack(order + "IIIII", interface, units >> 32, units & 0xFFFFFFFF, len(data), len(data) if length is None else length)
    return block(6, header + data, order)


# -- classic pcap ---------------------------------------------------------------------------------------
def pcap(linktype: int, records: list[tuple[float, bytes, int]], snaplen: int = 65535) -> bytes:
    """records: (timestamp, captured bytes, original length)."""
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)
    for seconds, frame, length in records:
        data += struct.pack("<IIII", int(seconds), round(seconds % 1 * 10**6), len(frame), length) + frame
    return data


def replay(tmp_path: Path, capsys: pytest.CaptureFixture[str], capture: bytes) -> tuple[int, dict, str]:
    source = tmp_path / "in.pcapng"
    source.write_bytes(capture)
    out = tmp_path / "out"
    code = main(["replay", "--config", CONFIG, "--pcap", str(source), "--out", str(out)])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, json.loads((out / "summary.json").read_text()), err


def inner_packets(out: Path, summary: dict) -> list[tuple[float, bytes]]:
    """(timestamp, inner packet) of everything replay sent to the TMs."""
    found = []
    for tm in summary["tm"]:
        for timestamp, frame in dpkt.pcap.Reader((out / f"{tm}.pcap").open("rb")):
            decapsulated = gre.decapsulate(bytes(dpkt.ip.IP(frame).data.data))
            assert decapsulated is not None
            found.append((timestamp, decapsulated.inner))
    return sorted(found)


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_each_pcapng_frame_is_read_with_its_own_interfaces_link_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], order: str
) -> None:
    """Interface 0 is Ethernet with microseconds, interface 1 raw IP with nanoseconds."""
    sent = packets(40)
    capture = shb(order) + idb(ETHERNET, order=order) + idb(RAW, tsresol=9, order=order)
    for i, packet in enumerate(sent):
        if i % 2:
            capture += epb(1, BASE + i, packet, resolution=10**9, order=order)
        else:
            capture += epb(0, BASE + i, ethernet(packet), order=order)
    code, summary, err = replay(tmp_path, capsys, capture)
    assert code == 0, err
    assert summary["packets"] == 40 and summary["not_ip"] == 0 and summary["actions"] == {"tm": 40}
    assert summary["truncated"] is False
    found = inner_packets(tmp_path / "out", summary)
    assert [packet for _, packet in found] == sent
    assert [timestamp for timestamp, _ in found] == pytest.approx([BASE + i for i in range(40)])


def test_a_second_pcapng_section_brings_its_own_interfaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sent = packets(4)
    capture = shb() + idb(ETHERNET) + epb(0, BASE, ethernet(sent[0])) + epb(0, BASE + 1, ethernet(sent[1]))
    capture += shb() + idb(RAW) + epb(0, BASE + 2, sent[2]) + epb(0, BASE + 3, sent[3])
    code, summary, err = replay(tmp_path, capsys, capture)
    assert code == 0, err
    assert summary["actions"] == {"tm": 4} and [p for _, p in inner_packets(tmp_path / "out", summary)] == sent


@pytest.mark.parametrize("cut", [1, 7, 30, -1], ids=["in-block-header", "in-epb-header", "in-packet", "in-trailer"])
def test_a_truncated_pcapng_replays_what_is_there_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int) -> None:
    sent = packets(10)
    blocks = [epb(0, BASE + i, packet) for i, packet in enumerate(sent)]
    capture = shb() + idb(RAW) + b"".join(blocks[:6]) + blocks[6][:cut]
    code, summary, err = replay(tmp_path, capsys, capture)
    assert code == 3
    assert summary["truncated"] is True and summary["packets"] == 6 and summary["actions"] == {"tm": 6}
    assert any("truncated" in warning for warning in summary["warnings"])
    assert "warning:" in err and "truncated" in err
    assert [p for _, p in inner_packets(tmp_path / "out", summary)] == sent[:6]


@pytest.mark.parametrize("length", [0xFFFFFFF0, 8, 70], ids=["4-GiB", "too-small", "unaligned"])
def test_a_block_length_that_cannot_be_is_where_reading_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str], length: int) -> None:
    sent = packets(3)
    capture = shb() + idb(RAW) + b"".join(epb(0, BASE + i, p) for i, p in enumerate(sent)) + struct.pack("<II", 6, length) + bytes(80)
    code, summary, _ = replay(tmp_path, capsys, capture)
    assert code == 3 and summary["truncated"] is True and summary["actions"] == {"tm": 3}


def test_a_pcap_record_longer_than_the_file_is_where_reading_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sent = packets(2)
    capture = pcap(RAW, [(BASE + i, p, len(p)) for i, p in enumerate(sent)]) + struct.pack("<IIII", BASE, 0, 0xFFFFFFF0, 0xFFFFFFF0)
    code, summary, _ = replay(tmp_path, capsys, capture)
    assert code == 3 and summary["truncated"] is True and summary["actions"] == {"tm": 2}


def test_a_truncated_pcap_replays_what_is_there_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sent = packets(5)
    capture = pcap(RAW, [(BASE + i, packet, len(packet)) for i, packet in enumerate(sent)])[:-10]
    code, summary, err = replay(tmp_path, capsys, capture)
    assert code == 3 and summary["truncated"] is True
    assert summary["packets"] == 4 and summary["actions"] == {"tm": 4}
    assert "truncated" in err


def test_frames_cut_by_the_snaplen_are_counted_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = packets(3)
    big = packets(4, size=400)
    records = [(BASE + i, ethernet(p), 14 + len(p)) for i, p in enumerate(whole)]
    records += [(BASE + 10 + i, ethernet(p)[:96], 14 + len(p)) for i, p in enumerate(big)]  # tcpdump -s 96
    code, summary, err = replay(tmp_path, capsys, pcap(ETHERNET, records, snaplen=96))
    assert code == 0, err
    assert summary["packets"] == 7 and summary["cut_by_snaplen"] == 4
    assert summary["actions"] == {"tm": 3} and "malformed:truncated-ipv4" not in summary["reasons"]
    assert any("snaplen" in warning for warning in summary["warnings"]) and "snaplen" in err


def test_pcapng_frames_cut_by_the_snaplen_are_counted_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole, big = packets(1)[0], packets(1, size=400)[0]
    capture = shb() + idb(RAW) + epb(0, BASE, whole) + epb(0, BASE + 1, big[:96], length=len(big))
    code, summary, err = replay(tmp_path, capsys, capture)
    assert code == 0, err
    assert (summary["packets"], summary["cut_by_snaplen"], summary["actions"]) == (2, 1, {"tm": 1})


def test_a_frame_cut_only_in_its_trailer_is_whole_ip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The capture kept the IP packet and dropped the Ethernet FCS: nothing of the packet is missing."""
    sent = packets(2, size=100)
    records = [(BASE + i, ethernet(p), 14 + len(p) + 4) for i, p in enumerate(sent)]
    code, summary, err = replay(tmp_path, capsys, pcap(ETHERNET, records))
    assert code == 0, err
    assert summary["cut_by_snaplen"] == 0 and summary["actions"] == {"tm": 2}


def test_ethernet_padding_is_not_part_of_the_packet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 40-byte TCP segment rides in a 60-byte minimum Ethernet frame: 6 bytes of padding, which must
    reach neither a TM nor forward.pcap; nor must a trailer after an IPv6 packet."""
    sent = packets(3)
    routed = build_packet("tcp 198.51.100.20:80 > 203.0.113.50:1234")
    six = build_packet("udp [2001:db8:1::1]:1 > [2001:db8:80::80]:53")
    frames = [ethernet(p, pad_to=60) for p in sent] + [ethernet(routed, pad_to=60), ethernet(six) + b"\xde\xad\xbe\xef"]
    records = [(BASE + i, frame, len(frame)) for i, frame in enumerate(frames)]
    code, summary, err = replay(tmp_path, capsys, pcap(ETHERNET, records))
    assert code == 0, err
    assert summary["actions"] == {"tm": 4, "forward": 1}
    assert [p for _, p in inner_packets(tmp_path / "out", summary) if p[0] >> 4 == 4] == sent
    assert [p for _, p in inner_packets(tmp_path / "out", summary) if p[0] >> 4 == 6] == [six]
    assert [bytes(f) for _, f in dpkt.pcap.Reader((tmp_path / "out" / "forward.pcap").open("rb"))] == [routed]
