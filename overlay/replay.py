"""`overlay replay`: run a capture through the distributor core offline and write what would leave.

Input: pcap or pcapng (dpkt), Ethernet, raw IP, Linux cooked (SLL/SLL2) or BSD loopback link types. A
pcapng file may hold several interfaces (and sections): each frame is read with its own interface's link
type and timestamp resolution. The IP packet is what its header says: link-layer padding and trailers
after it are cut off, as the kernel does before a packet reaches the TUN.
Output in DIR: `<tm>.pcap` per TM with the GRE-in-UDP packets as they would leave the distributor (outer
IPv4/IPv6 + UDP to the TM's underlay address and port, source port from the flow's entropy),
`forward.pcap` (what would be written back into the TUN or sent to an edge), `drop.pcap`, and
`summary.json` with counts per TM, per table cell and per reason. Two kinds of damage are reported
instead of being passed off as malformed packets: frames the capture's snaplen cut (`cut_by_snaplen`, not
replayed), and a file that ends inside a record (`truncated`: what came before is replayed).
"""

from __future__ import annotations

import io
import json
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dpkt
from dpkt import pcapng

from overlay.distributor.core import ACTION_DROP, ACTION_FORWARD, ACTION_TM, Distributor

# RFC 8086 leaves the source port to the sender for entropy; replay shows the dynamic range it would use.
ENTROPY_PORT_BASE = 49152

DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_RAW_ALT, DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = (
    0, 1, 101, 12, 108, 113, 228, 229, 276)
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_PCAPNG_BYTE_ORDERS = {struct.pack("<I", pcapng.BYTE_ORDER_MAGIC): True, struct.pack(">I", pcapng.BYTE_ORDER_MAGIC): False}
_NANOSECOND_MAGICS = (dpkt.pcap.TCPDUMP_MAGIC_NANO, dpkt.pcap.PMUDPCT_MAGIC_NANO)


class ReplayError(ValueError):
    pass


class _Truncated(Exception):
    """The file ends (or stops being readable) inside a record; every frame before it was read."""


@dataclass(frozen=True, slots=True)
class Frame:
    timestamp: float
    linktype: int
    data: bytes
    length: int  # on the wire: more than len(data) when the capture's snaplen cut the frame


class Capture:
    """The frames of a pcap or pcapng file. The file header is checked at once (ReplayError); a file
    that ends inside a record ends the iteration there, and `truncated` then says where."""

    def __init__(self, handle: BinaryIO):
        self.truncated: str | None = None
        self._frames = _open(handle)

    def __iter__(self) -> Iterator[Frame]:
        try:
            yield from self._frames
        except _Truncated as exc:
            self.truncated = str(exc)


def _open(handle: BinaryIO) -> Iterator[Frame]:
    # Lengths in a cut or corrupt file can be anything up to 4 GiB: they are checked against the file's
    # size before anything is read, so that no read allocates for bytes that are not there.
    size = handle.seek(0, io.SEEK_END)
    handle.seek(0)
    start = handle.read(12)
    handle.seek(0)
    if start[:4] == _PCAPNG_MAGIC:
        if start[8:] not in _PCAPNG_BYTE_ORDERS:
            raise ReplayError("not a pcap or pcapng file: no byte-order magic in the pcapng section header")
        return _pcapng_frames(handle, size)
    try:
        reader = dpkt.pcap.Reader(handle)  # reads and checks the 24-byte file header, nothing more
    except (ValueError, dpkt.UnpackError) as exc:
        raise ReplayError(f"not a pcap or pcapng file: {exc}") from None
    return _pcap_frames(handle, size, int.from_bytes(start[:4], "big"), reader.datalink())


def _pcap_frames(handle: BinaryIO, size: int, magic: int, datalink: int) -> Iterator[Frame]:
    # dpkt's own iterator hides each record's original length and yields a cut record as if whole.
    record_header = dpkt.pcap.MAGIC_TO_PKT_HDR[magic]
    divisor = 1e9 if magic in _NANOSECOND_MAGICS else 1e6
    linktype = datalink & 0xFFFF  # the upper half carries FCS information, not the link type
    while header_bytes := handle.read(record_header.__hdr_len__):
        if len(header_bytes) < record_header.__hdr_len__:
            raise _Truncated(f"the file ends inside a record header at byte {handle.tell()}")
        header = record_header(header_bytes)
        if handle.tell() + header.caplen > size:
            raise _Truncated(f"the file ends inside a {header.caplen}-byte record at byte {handle.tell()}")
        data = handle.read(header.caplen)
        yield Frame(header.tv_sec + header.tv_usec / divisor, linktype, data, header.len)


@dataclass(frozen=True, slots=True)
class _Interface:
    linktype: int
    snaplen: int
    divisor: float  # timestamp units per second
    offset: int  # seconds added to every timestamp


def _pcapng_frames(handle: BinaryIO, size: int) -> Iterator[Frame]:
    """Block by block: dpkt's pcapng reader applies the first interface's link type and timestamp
    resolution to every frame and raises NeedData on a cut block. Blocks are still parsed by dpkt."""
    little = True
    interfaces: list[_Interface] = []
    while head := handle.read(8):
        start = handle.tell() - len(head)
        if len(head) == 8 and head[:4] == _PCAPNG_MAGIC:  # a section header: its byte order applies from here
            head += handle.read(4)
            if head[8:] not in _PCAPNG_BYTE_ORDERS:
                raise _Truncated(f"a section header without byte-order magic at byte {start}")
            little = _PCAPNG_BYTE_ORDERS[head[8:]]
            interfaces = []
        if len(head) < 8:
            raise _Truncated(f"the file ends inside a block header at byte {start}")
        kind, length = struct.unpack("<II" if little else ">II", head[:8])
        if length < 12 or length % 4:
            raise _Truncated(f"a block at byte {start} claims {length} bytes, no pcapng block length")
        if start + length > size:
            raise _Truncated(f"the file ends inside a {length}-byte block at byte {start}")
        body = head + handle.read(length - len(head))
        try:
            frame = _pcapng_block(kind, body, little, interfaces)
        except (dpkt.UnpackError, struct.error, IndexError, ValueError) as exc:
            raise _Truncated(f"unreadable block (type {kind}) at byte {start}: {exc}") from None
        if frame is not None:
            yield frame


def _pcapng_block(kind: int, body: bytes, little: bool, interfaces: list[_Interface]) -> Frame | None:
    """One block: a frame, or None after noting what a header block says (interfaces)."""
    if kind == pcapng.PCAPNG_BT_SHB:
        (pcapng.SectionHeaderBlockLE if little else pcapng.SectionHeaderBlock)(body)  # checks it parses
        return None
    if kind == pcapng.PCAPNG_BT_IDB:
        interfaces.append(_interface((pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(body), little))
        return None
    if kind in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
        if kind == pcapng.PCAPNG_BT_EPB:
            block = (pcapng.EnhancedPacketBlockLE if little else pcapng.EnhancedPacketBlock)(body)
        else:
            block = (pcapng.PacketBlockLE if little else pcapng.PacketBlock)(body)
        interface = _interface_of(interfaces, block.iface_id)
        units = (block.ts_high << 32) | block.ts_low
        return Frame(interface.offset + units / interface.divisor, interface.linktype, bytes(block.pkt_data), block.pkt_len)
    if kind == pcapng.PCAPNG_BT_SPB:
        interface = _interface_of(interfaces, 0)  # a simple packet block always belongs to interface 0
        length = struct.unpack_from("<I" if little else ">I", body, 8)[0]
        kept = min(length, interface.snaplen or length, len(body) - 16)
        return Frame(0.0, interface.linktype, body[12 : 12 + kept], length)  # it carries no timestamp
    return None  # name resolution, statistics, custom blocks: nothing to replay


def _interface(idb: pcapng.InterfaceDescriptionBlock, little: bool) -> _Interface:
    divisor, offset = 1e6, 0
    for option in idb.opts:
        if option.code == pcapng.PCAPNG_OPT_IF_TSRESOL:
            # high bit 0: a negative power of 10 (6 = microseconds); 1: a negative power of 2
            value = option.data[0]
            divisor = float(2 ** (value & 0x7F) if value & 0x80 else 10 ** (value & 0x7F))
        elif option.code == pcapng.PCAPNG_OPT_IF_TSOFFSET:
            offset = struct.unpack("<q" if little else ">q", option.data[:8])[0]
    return _Interface(idb.linktype, idb.snaplen, divisor, offset)


def _interface_of(interfaces: list[_Interface], index: int) -> _Interface:
    if index >= len(interfaces):
        raise ValueError(f"a packet of interface {index}, but the section describes {len(interfaces)}")
    return interfaces[index]


def _inner(frame: Frame) -> tuple[str, bytes]:
    """("ip", the IP packet without link-layer padding or trailer), ("not-ip", b""), or ("cut", b"")
    when the snaplen kept less of the frame than its IP header says the packet holds."""
    packet = _ip_of(frame.linktype, frame.data)
    if packet is None:
        return "not-ip", b""
    declared = _ip_length(packet)
    if declared is not None and declared < len(packet):
        return "ip", packet[:declared]
    if frame.length > len(frame.data) and (declared is None or declared > len(packet)):
        return "cut", b""
    return "ip", packet


def _ip_length(packet: bytes) -> int | None:
    """The packet's length by its own header; None where the header cannot say (too short, a jumbogram,
    nonsense), and the packet then stays as captured for the distributor to judge."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        total = struct.unpack_from("!H", packet, 2)[0]
        return total if total >= 20 else None
    if version == 6 and len(packet) >= 40:
        payload = struct.unpack_from("!H", packet, 4)[0]
        return 40 + payload if payload else None  # 0: a jumbogram, whose length is in an option
    return None


def _ip_of(linktype: int, frame: bytes) -> bytes | None:
    if linktype in (DLT_RAW, DLT_RAW_ALT, DLT_IPV4, DLT_IPV6):
        return frame
    if linktype == DLT_EN10MB:
        offset, ethertype = 12, None
        while len(frame) >= offset + 2:
            ethertype = struct.unpack_from("!H", frame, offset)[0]
            if ethertype in (0x8100, 0x88A8):  # VLAN tags: skip them
                offset += 4
                continue
            break
        return frame[offset + 2 :] if ethertype in (0x0800, 0x86DD) else None
    if linktype == DLT_LINUX_SLL:
        return frame[16:] if len(frame) >= 16 and struct.unpack_from("!H", frame, 14)[0] in (0x0800, 0x86DD) else None
    if linktype == DLT_LINUX_SLL2:
        return frame[20:] if len(frame) >= 20 and struct.unpack_from("!H", frame, 0)[0] in (0x0800, 0x86DD) else None
    if linktype in (DLT_NULL, DLT_LOOP):
        return frame[4:] if len(frame) > 4 else None
    raise ReplayError(f"unsupported link type {linktype} (Ethernet, raw IP, Linux cooked and loopback are)")


def _outer(distributor: Distributor, payload: bytes, dest: tuple[str, int], flow_hash: int, source: str, port_count: int) -> bytes:
    sport = ENTROPY_PORT_BASE + (flow_hash % port_count)
    udp = dpkt.udp.UDP(sport=sport, dport=dest[1], data=payload)
    udp.ulen = 8 + len(payload)
    if ":" in dest[0]:
        ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, source), dst=socket.inet_pton(socket.AF_INET6, dest[0]),
                           nxt=17, hlim=64, data=udp, plen=udp.ulen)
        return bytes(ip6)
    ip = dpkt.ip.IP(src=socket.inet_aton(source), dst=socket.inet_aton(dest[0]), p=17, ttl=64, data=udp)
    ip.df = 1
    ip.len = 20 + udp.ulen
    return bytes(ip)


def replay(distributor: Distributor, pcap: Path, out: Path, underlay_source: str, source_ports: int = 8) -> dict:
    with pcap.open("rb") as handle:
        capture = Capture(handle)  # a file that is no capture fails here, before any output exists
        return _replay(distributor, capture, pcap, out, underlay_source, source_ports)


def _replay(distributor: Distributor, capture: Capture, pcap: Path, out: Path, underlay_source: str, source_ports: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, dpkt.pcap.Writer] = {}
    handles: list[BinaryIO] = []

    def writer(name: str) -> dpkt.pcap.Writer:
        if name not in writers:
            handle = (out / f"{name}.pcap").open("wb")
            handles.append(handle)
            writers[name] = dpkt.pcap.Writer(handle, linktype=DLT_RAW)
        return writers[name]

    per_tm: Counter[str] = Counter()
    per_cell: Counter[str] = Counter()
    per_reason: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    skipped: Counter[str] = Counter()  # frames never given to the distributor: "not-ip", "cut"
    total = 0
    try:
        for name in ("forward", "drop"):
            writer(name)
        for tm in distributor.config.tms:
            writer(tm.name)
        for frame in capture:
            total += 1
            kind, packet = _inner(frame)
            if kind != "ip":
                skipped[kind] += 1
                continue
            timestamp = frame.timestamp
            verdict = distributor.from_tun(packet)
            actions[verdict.action] += 1
            per_reason[verdict.reason] += 1
            if verdict.cell:
                per_cell[verdict.cell] += 1
            if verdict.action == ACTION_TM:
                assert verdict.tm and verdict.dest and verdict.packet is not None
                per_tm[verdict.tm] += 1
                writer(verdict.tm).writepkt(
                    _outer(distributor, verdict.packet, verdict.dest, verdict.flow_hash, underlay_source, source_ports), timestamp
                )
            elif verdict.action == ACTION_FORWARD:
                writer("forward").writepkt(
                    verdict.packet if verdict.dest is None else _outer(distributor, verdict.packet or b"", verdict.dest, verdict.flow_hash, underlay_source, source_ports),
                    timestamp,
                )
            else:
                assert verdict.action == ACTION_DROP
                writer("drop").writepkt(packet, timestamp)
    finally:
        for handle in handles:
            handle.close()
    summary = {
        "input": str(pcap),
        "packets": total,
        "not_ip": skipped["not-ip"],
        "cut_by_snaplen": skipped["cut"],
        "truncated": capture.truncated is not None,
        "warnings": _warnings(capture, total, skipped["cut"]),
        "actions": dict(actions),
        "tm": {tm.name: per_tm.get(tm.name, 0) for tm in distributor.config.tms},
        "cells": dict(sorted(per_cell.items())),
        "reasons": dict(sorted(per_reason.items())),
        "files": sorted(f"{name}.pcap" for name in writers),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _warnings(capture: Capture, total: int, cut: int) -> list[str]:
    """What the counts alone would hide: the replay saw less than the capture tool did."""
    warnings = []
    if capture.truncated is not None:
        warnings.append(f"capture truncated: {capture.truncated}; the {total} frames before it were replayed")
    if cut:
        warnings.append(f"{cut} frames cut by the capture's snaplen before the end of their IP packet were not "
                        "replayed (capture with -s 0 to keep whole packets)")
    return warnings
