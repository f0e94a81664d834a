"""Micro-benchmark of TM state replication (overlay/tm/replication.py): what one new connection costs.

Run: `python3 tests/tm/bench_replication.py`. It reports; it never asserts timings. Rounds interleave
every path, and ratios are against the same paths measured in the same round with replication off:

- the TM's new-connection path (a SYN that opens a DNAT connection) with replication on vs off;
- exporting, at the sender, and importing, at the standby, one entry (ns per connection);
- the distributor's fan-out of one entry (decode, decide the row, encode for the second choice);
- the established path with replication on vs off (it should not move: nothing is replicated per packet);
- strict mode: a new connection held, exported, acknowledged and released, against the same with
  replication on but not strict (the SYN passes at once, the export comes later);
- bytes on the wire per replicated connection (entry, and the batch's share of GRE + UDP + IP).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from overlay.config import load_node_config
from overlay.distributor.core import Distributor
from overlay.tm.config import ReplicationConfig
from overlay.tm.core import TrafficManager
from overlay.tm.replication import BATCH_BYTES
from tests.tm.bench_tm import established_tm, syn_packets
from tests.tm.conftest import lab_config

CONFIG = Path(__file__).resolve().parents[2] / "config"


def replicating(on: bool, strict: bool = False) -> TrafficManager:
    config = lab_config()
    return TrafficManager(dataclasses.replace(config, replication=ReplicationConfig(enabled=on, strict=strict)))


def open_export_ack(strict: bool, syns: list[bytes], per_batch: int | None = None) -> float:
    """ns per connection: its SYN, its export, and its batch's ack (which, in strict mode, releases the
    held SYN). The ack names one standby, as the distributor's copy would. `per_batch`: export after
    every so many SYNs (strict mode flushes once per loop iteration: at low load, one a batch)."""
    tm = replicating(True, strict)
    step = per_batch or len(syns)
    start = time.perf_counter_ns()
    for first in range(0, len(syns), step):
        for packet in syns[first:first + step]:
            tm.receive(packet, 1.0)
        for batch in tm.export_replication(1.0):
            tm.replication_acked(b"\x01\x01\x00\x00" + batch[4:8], 1.001)
    elapsed = time.perf_counter_ns() - start
    assert tm.snapshot()["replication"]["released_acked"] == (len(syns) if strict else 0)
    return elapsed / len(syns)


def new_connections(on: bool, syns: list[bytes]) -> float:
    tm = replicating(on)
    start = time.perf_counter_ns()
    for packet in syns:
        tm.receive(packet, 1.0)
    return (time.perf_counter_ns() - start) / len(syns)


def export_import(syns: list[bytes]) -> tuple[float, float, int, int]:
    """(export ns per entry, import ns per entry, entries, bytes of the batches)."""
    sender, standby = replicating(True), replicating(True)
    for packet in syns:
        sender.receive(packet, 1.0)
    start = time.perf_counter_ns()
    batches = sender.export_replication(1.0)
    exported = time.perf_counter_ns() - start
    start = time.perf_counter_ns()
    for batch in batches:
        standby.import_replication(batch, 1.0)
    imported = time.perf_counter_ns() - start
    return exported / len(syns), imported / len(syns), len(syns), sum(map(len, batches))


def fanout(syns: list[bytes]) -> float:
    """The distributor's work per entry: decode, decide each entry's row, encode per target."""
    node = load_node_config(CONFIG / "distributor.toml")
    assert node.distributor is not None
    distributor = Distributor(node.distributor)
    sender = replicating(True)
    for packet in syns:
        sender.receive(packet, 1.0)
    from overlay import gre
    batches = [gre.encapsulate(batch, protocol=gre.REPLICATION_PROTOCOL) for batch in sender.export_replication(1.0)]
    peer = ("192.0.2.71", 4754)
    start = time.perf_counter_ns()
    for batch in batches:
        distributor.from_overlay(batch, peer)
    return (time.perf_counter_ns() - start) / len(syns)


def established(on: bool, calls: int) -> float:
    tm, packets = established_tm()
    if on:
        tm._replicate = True   # the same connections, with replication switched on for the measurement
    packet = packets["established dnat (client → VIP)"]
    receive = tm.receive
    start = time.perf_counter_ns()
    for _ in range(calls):
        receive(packet, 1.0)
    return (time.perf_counter_ns() - start) / calls


def main(rounds: int = 9, connections: int = 4000, calls: int = 20000) -> None:
    syns = syn_packets(connections)
    samples: dict[str, list[float]] = {}
    sizes = (0, 0)
    for _ in range(rounds):
        samples.setdefault("new connection, off", []).append(new_connections(False, syns))
        samples.setdefault("new connection, on", []).append(new_connections(True, syns))
        exported, imported, entries, size = export_import(syns)
        samples.setdefault("export, per connection", []).append(exported)
        samples.setdefault("import at the standby, per connection", []).append(imported)
        samples.setdefault("distributor fan-out, per connection", []).append(fanout(syns))
        samples.setdefault("open + export + ack, on", []).append(open_export_ack(False, syns))
        samples.setdefault("open + export + ack, strict", []).append(open_export_ack(True, syns))
        samples.setdefault("... strict, one connection a batch", []).append(open_export_ack(True, syns, 1))
        samples.setdefault("established, off", []).append(established(False, calls))
        samples.setdefault("established, on", []).append(established(True, calls))
        sizes = (entries, size)
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'path':44} {'ns':>8}")
    for name, value in median.items():
        print(f"{name:44} {value:8.0f}")
    print(f"new connection on/off: {median['new connection, on'] / median['new connection, off']:.2f}x; "
          f"established on/off: {median['established, on'] / median['established, off']:.2f}x; "
          f"strict/on per new connection: {median['open + export + ack, strict'] / median['open + export + ack, on']:.2f}x")
    entries, size = sizes
    batches = -(-size // BATCH_BYTES)
    overhead = batches * (20 + 8 + 4)   # IPv4 + UDP + GRE per batch datagram (no auth)
    print(f"bytes per replicated connection: {size / entries:.1f} entry + {overhead / entries:.1f} headers "
          f"(+34 per datagram with [auth]), sent twice: TM -> distributor -> standby; each batch's ack "
          f"{8 + 20 + 8 + 4} bytes back, twice (standby -> distributor -> TM)")


if __name__ == "__main__":
    main()
