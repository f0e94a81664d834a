"""The distributor's per-packet path, shared by the agent's own loop and its workers' (runtime/workers.py):
TUN packets and underlay datagrams into the core, its verdicts out to the sockets and the TUN.

Closures over locals: no attribute lookups, no Optional checks per packet. `reconfigure` changes the core
in place, so they stay valid across reloads.
"""

from __future__ import annotations

from collections.abc import Callable

from overlay.distributor.core import ACTION_FANOUT, ACTION_FORWARD, ACTION_LOCAL, ACTION_TM, PINNED, Distributor, Verdict
from overlay.runtime.tun import TunDevice
from overlay.runtime.udp import UnderlayEndpoint

Peer = tuple[str, int]


def packet_handlers(core: Distributor, tun: TunDevice, udp: UnderlayEndpoint, on_keepalive: Callable[[bytes], None],
                    ) -> tuple[Callable[[bytes], None], Callable[[bytes, Peer], None], Callable[[list[bytes]], None]]:
    """(from_tun, from_overlay, from_tun_train) callbacks for `TunDevice.start` and `UnderlayEndpoint.start`."""
    tun_write, udp_send, udp_send_all = tun.write, udp.send, udp.send_all

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

    return from_tun, from_overlay, from_tun_train
