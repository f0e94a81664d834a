"""`overlay replay`: run a capture through the distributor core offline and write what would leave.

Input: pcap or pcapng (dpkt), Ethernet, raw IP, Linux cooked (SLL/SLL2) or BSD loopback link types.
Output in DIR: `<tm>.pcap` per TM with the GRE-in-UDP packets as they would leave the distributor (outer
IPv4/IPv6 + UDP to the TM's underlay address and port, source port from the flow's entropy),
`forward.pcap` (what would be written back into the TUN or sent to an edge), `drop.pcap`, and
`summary.json` with counts per TM, per table cell and per reason.
"""

from __future__ import annotations

import json
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Iterator

import dpkt

from overlay.distributor.core import ACTION_DROP, ACTION_FORWARD, ACTION_TM, Distributor

# RFC 8086 leaves the source port to the sender for entropy; replay shows the dynamic range it would use.
ENTROPY_PORT_BASE = 49152

DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_RAW_ALT, DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = (
    0, 1, 101, 12, 108, 113, 228, 229, 276)


class ReplayError(ValueError):
    pass


def _open(handle: BinaryIO):  # type: ignore[no-untyped-def]
    magic = handle.read(4)
    handle.seek(0)
    try:
        if magic == b"\x0a\x0d\x0d\x0a":
            return dpkt.pcapng.Reader(handle)
        return dpkt.pcap.Reader(handle)
    except (ValueError, dpkt.UnpackError) as exc:
        raise ReplayError(f"not a pcap or pcapng file: {exc}") from None


def ip_packets(path: Path) -> Iterator[tuple[float, bytes | None]]:
    """(timestamp, IP packet bytes or None when the frame carries no IP) for every frame."""
    with path.open("rb") as handle:
        reader = _open(handle)
        linktype = reader.datalink()
        for timestamp, frame in reader:
            yield timestamp, _ip_of(linktype, frame)


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
    total = not_ip = 0
    try:
        for name in ("forward", "drop"):
            writer(name)
        for tm in distributor.config.tms:
            writer(tm.name)
        for timestamp, packet in ip_packets(pcap):
            total += 1
            if packet is None:
                not_ip += 1
                continue
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
        "not_ip": not_ip,
        "actions": dict(actions),
        "tm": {tm.name: per_tm.get(tm.name, 0) for tm in distributor.config.tms},
        "cells": dict(sorted(per_cell.items())),
        "reasons": dict(sorted(per_reason.items())),
        "files": sorted(f"{name}.pcap" for name in writers),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
