"""The distributor's control plane against a large fleet (issue 10): how long the packet loop waits for a
table rebuild when a TM goes down, is drained, comes back, and for a reload and a status snapshot. Reports
only (never asserts timings).

    python -m tests.distributor.bench_rebuild [--tms 1000]

Every step is the real `Distributor` method the agent calls; the first build is the one full build, the
rest derive from recent tables (overlay/selection.py, `table_for`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from overlay import selection
from overlay.config import parse_node_config
from overlay.distributor.config import DistributorConfig
from overlay.distributor.core import Distributor
from overlay.runtime.tables import TableBuilder

CONFIG = Path(__file__).resolve().parents[2] / "config" / "distributor.toml"


def fleet_config(tms: int) -> str:
    """The reference distributor with `tms` TMs (one underlay address, a port each; no xlate)."""
    text = CONFIG.read_text()
    head = text[:text.index("[[tm]]")]
    tail = text[text.index("[decision"):] if "[decision" in text else text[text.index("[health]"):]
    tables = "".join(f'[[tm]]\nname = "tm{i:04}"\nid = {i + 1}\nunderlay = "192.0.2.71:{10000 + i}"\nweight = {1 + i % 2}\n\n'
                     for i in range(tms))
    return head + tables + tail


def timed(label: str, function) -> None:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    function()
    print(f"{label:44} {(time.perf_counter() - start) * 1000:9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tms", type=int, default=1000)
    args = parser.parse_args()
    text = fleet_config(args.tms)
    node = parse_node_config(text, "bench", CONFIG.parent)
    assert node.distributor is not None
    selection._recent.clear()
    print(f"{args.tms} TMs, weights 1 and 2, {1 << node.distributor.rows_log2} rows")
    holder: dict[str, Distributor] = {}
    timed("start: the one full build", lambda: holder.setdefault("core", Distributor(node.distributor)))  # type: ignore[arg-type]
    core = holder["core"]
    timed("a TM goes down (health)", lambda: core.set_tm_up("tm0042", False))
    timed("it comes back", lambda: core.set_tm_up("tm0042", True))
    timed("drain a TM", lambda: core.set_tm_state("tm0007", "draining"))
    timed("enable it again", lambda: core.set_tm_state("tm0007", "enabled"))
    timed("a second TM down while one is down", lambda: (core.set_tm_up("tm0042", False), core.set_tm_up("tm0043", False)))
    more = parse_node_config(fleet_config(args.tms + 1), "bench", CONFIG.parent)
    assert more.distributor is not None
    timed("reload adding a TM: dry run", lambda: Distributor(more.distributor))  # type: ignore[arg-type]
    timed("reload adding a TM: apply (reuses the dry run)", lambda: core.reconfigure(more.distributor))  # type: ignore[arg-type]
    timed("status snapshot", core.snapshot)
    timed("status snapshot again", core.snapshot)
    for one_by_one in (False, True):
        for off_loop in (False, True):
            stall, took = loop_stall(node.distributor, off_loop, one_by_one)  # type: ignore[arg-type]
            where = "off the loop (TableBuilder)" if off_loop else "on the loop"
            what = "twenty TMs down one after another" if one_by_one else "ten TMs down at once (a full build)"
            print(f"{what}, {where:27}: the loop stalled at most {stall * 1000:7.1f} ms "
                  f"of the {took * 1000:.0f} ms until the table of the last change")


def loop_stall(config: DistributorConfig, off_loop: bool, one_by_one: bool = False) -> tuple[float, float]:
    """The longest gap between two turns of an event loop (a 1 ms ticker) while ten TMs go down at once —
    a change no table derives — or twenty one after another (as health checks report them), and how long
    until the table of the last change is in place."""
    selection._recent.clear()
    core = Distributor(config)

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        builder = TableBuilder(loop)
        if off_loop:
            core.prepare_tables = builder
        gaps = [0.0]
        last = [loop.time()]

        def tick() -> None:
            now = loop.time()
            gaps[0] = max(gaps[0], now - last[0])
            last[0] = now
            loop.call_later(0.001, tick)

        tick()
        await asyncio.sleep(0.05)
        gaps[0], before, start = 0.0, core.table, time.perf_counter()
        admin, up, returning = core.fleet_state()
        names = sorted(up)[10:30] if one_by_one else sorted(up)[10:20]
        if one_by_one:
            for name in names:     # as separate health passes report them: one loop turn each
                core.set_tm_up(name, False)
                await asyncio.sleep(0)
        else:
            core.apply_fleet_state(admin, {**up, **dict.fromkeys(names, False)}, returning)
        while core.table is before or core.building or set(names) & set(core.table.names):
            await asyncio.sleep(0.001)
        took = time.perf_counter() - start
        await asyncio.sleep(0.01)
        builder.close()
        return gaps[0], took

    return asyncio.run(run())


if __name__ == "__main__":
    main()
