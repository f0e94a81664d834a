"""The distributor's per-packet path, shared by the agent's own loop and its workers' (runtime/workers.py):
TUN packets and underlay datagrams into the core, its verdicts out to the sockets and the TUN.

Closures over locals: no attribute lookups, no Optional checks per packet. `reconfigure` changes the core
in place, so they stay valid across reloads.
"""

from __future__ import annotations

from collections.abc import Callable

from overlay.distributor.core import ACTION_FANOUT, ACTION_FORWARD, ACTION_LOCAL, ACTION_TM, PINNED, Distributor, Verdict
from overlay import compiled
from overlay.runtime.tun import TunDevice
from overlay.runtime.udp import UnderlayEndpoint

Peer = tuple[str, int]


def packet_handlers(core: Distributor, tun: TunDevice, udp: UnderlayEndpoint, on_keepalive: Callable[[bytes], None],
                    ) -> tuple[Callable[[bytes], None], Callable[[bytes, Peer], None], Callable[[list[bytes]], None],
                               Callable[[list[bytes], Peer], None], Callable[[list[bytes]], None],
                               Callable[[list[tuple[bytes, Peer]]], None]]:
    """(from_tun, from_overlay, from_tun_train, from_overlay_train, from_tun_batch, from_overlay_batch)
    callbacks for `TunDevice.start` and `UnderlayEndpoint.start`."""
    tun_write, tun_write_all, udp_send, udp_send_all = tun.write, tun.write_all, udp.send, udp.send_all

    def execute(verdict: Verdict) -> None:
        action = verdict.action
        if action == ACTION_TM:
            udp_send(verdict.packet, verdict.dest, verdict.flow_hash)  # type: ignore[arg-type]
        elif action == ACTION_FANOUT:
            for datagram, destination in verdict.fanout:  # type: ignore[union-attr]
                udp_send(datagram, destination, PINNED)
        elif action == ACTION_FORWARD:
            if verdict.dest is None:
                tun_write(verdict.packet)  # type: ignore[arg-type]
            else:
                udp_send(verdict.packet, verdict.dest, verdict.flow_hash)  # type: ignore[arg-type]

    def from_tun(packet: bytes) -> None:
        execute(core.from_tun(packet))

    sockets = len(udp.send_sockets)
    distribute, udp_queue_all = compiled.distribute, udp.queue_all

    def from_tun_batch(packets: list[bytes]) -> None:
        # A batch of TUN packets: the fast path in C (`_fastio.distribute`) for as many as it serves, in
        # order; the first it does not serve through `from_tun`, then on from the next.
        state = core.compiled_state(sockets)
        if state is None:
            for packet in packets:
                execute(core.from_tun(packet))
            return
        index, count = 0, len(packets)
        while index < count:
            queues, combos, stop = distribute(packets, index, state)  # type: ignore[misc]
            if combos:
                core.count_compiled(combos)
                udp_queue_all(queues)
            if stop < count:
                execute(core.from_tun(packets[stop]))
                stop += 1
                state = core.compiled_state(sockets)    # the full path may have replaced the cache
                if state is None:
                    for packet in packets[stop:]:
                        execute(core.from_tun(packet))
                    return
            index = stop

    deliver = compiled.deliver

    def from_overlay_batch(items: list[tuple[bytes, Peer]]) -> None:
        # Datagrams of a receive batch: a TM's data into the TUN in C (`_fastio.deliver`) for as many as it
        # serves, in order; the first it does not serve through `from_overlay`, then on from the next.
        state = core.delivery_state()
        if state is None:
            for payload, peer in items:
                from_overlay(payload, peer)
            return
        index, count = 0, len(items)
        while index < count:
            inners, stop = deliver(items, index, state)  # type: ignore[misc]
            if inners:
                core.forwarded_from_tm(len(inners))
                tun_write_all(inners)
            if stop < count:
                from_overlay(*items[stop])
                stop += 1
            index = stop

    def from_tun_train(segments: list[bytes]) -> None:
        # A TSO super-packet's segments: one decision for all of them where the fast path serves the
        # first (runtime/offload.py); else each its own.
        verdict = core.from_tun_train(segments)
        if verdict is None:
            for segment in segments:
                execute(core.from_tun(segment))
        else:
            udp_send_all(verdict.train, verdict.dest, verdict.flow_hash)  # type: ignore[arg-type]

    def from_overlay(payload: bytes, peer: Peer) -> None:
        verdict = core.from_overlay(payload, peer)
        if verdict.action == ACTION_LOCAL:
            # The only "local" verdict is an echoed keepalive: the health checker matches it.
            on_keepalive(verdict.packet or b"")
        else:
            execute(verdict)

    def from_overlay_train(payloads: list[bytes], peer: Peer) -> None:
        # A UDP GRO train from one peer (a TM's GSO send). Where the first of a run of one TCP flow goes
        # into the TUN as it came, so does every packet of the run (flow_run: the same outer header, the
        # same flow, headers differing only as a stream's segments do): the rest skip the decision.
        index, count = 0, len(payloads)
        while index < count:
            payload = payloads[index]
            verdict = core.from_overlay(payload, peer)
            action = verdict.action
            if action == ACTION_FORWARD and verdict.dest is None and verdict.reason == "from-tm" and core.auth is None:
                inner: bytes = verdict.packet  # type: ignore[assignment]
                tun_write(inner)
                offset = len(payload) - len(inner)
                run = compiled.flow_run(payloads, index, offset) if index + 1 < count else 1
                if run > 1:
                    core.forwarded_from_tm(run - 1)
                    tun_write_all([each[offset:] for each in payloads[index + 1:index + run]])
                index += run
                continue
            if action == ACTION_LOCAL:
                on_keepalive(verdict.packet or b"")
            else:
                execute(verdict)
            index += 1

    return from_tun, from_overlay, from_tun_train, from_overlay_train, from_tun_batch, from_overlay_batch
