"""Connection states, which are also the timeout classes, and the TCP state machine.

Each state has one idle timeout (`[tm.conntrack.timeouts]`, keys = `STATE_NAMES`). The TCP machine is
the one of Linux conntrack without sequence-window tracking: it follows flags per direction
(0 = original, the direction of the opener; 1 = reply).

    SYN_SENT --reply SYN+ACK--> SYN_RECV --orig ACK--> ESTABLISHED
    ESTABLISHED --FIN from X--> FIN_WAIT (X is the "closer")
    FIN_WAIT --ACK from the other side--> CLOSE_WAIT (half-closed: the other side may still send)
    FIN_WAIT, CLOSE_WAIT --FIN from the other side--> LAST_ACK
    LAST_ACK --ACK from the closer--> TIME_WAIT
    any --RST--> CLOSE;  FIN_WAIT ... CLOSE --bare SYN from orig--> SYN_SENT (port pair reused: reopen)
"""

from __future__ import annotations

TCP_SYN_SENT = 0
TCP_SYN_RECV = 1
TCP_ESTABLISHED = 2
TCP_FIN_WAIT = 3
TCP_CLOSE_WAIT = 4
TCP_LAST_ACK = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
UDP_UNREPLIED = 8
UDP_REPLIED = 9
ICMP_ECHO = 10

STATE_NAMES = (
    "tcp_syn_sent", "tcp_syn_recv", "tcp_established", "tcp_fin_wait", "tcp_close_wait", "tcp_last_ack",
    "tcp_time_wait", "tcp_close", "udp_unreplied", "udp_replied", "icmp",
)

# When the table is full, a new connection may evict the oldest entry of these states, tried in this
# order; connections that carry data (established, half-closed, replied UDP) are never evicted.
EVICTABLE = (
    TCP_CLOSE, TCP_TIME_WAIT, TCP_LAST_ACK, TCP_FIN_WAIT, TCP_SYN_SENT, TCP_SYN_RECV, UDP_UNREPLIED, ICMP_ECHO,
)

FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10


def tcp_opens(flags: int) -> bool:
    """Only a bare SYN (no ACK, RST, FIN) opens a connection."""
    return flags & (SYN | ACK | RST | FIN) == SYN


def tcp_next(state: int, direction: int, flags: int, closer: int) -> tuple[int, int]:
    """(next state, closer) after a packet with `flags` in `direction`; `closer` is the direction of the
    first FIN (-1 before any)."""
    if flags & RST:
        return TCP_CLOSE, closer
    if state >= TCP_FIN_WAIT and direction == 0 and tcp_opens(flags):
        # A bare SYN from the original side of a closing connection: the client reuses the port pair
        # for a new connection (common with busy clients), so the entry starts over.
        return TCP_SYN_SENT, -1
    if state == TCP_ESTABLISHED:
        if flags & FIN:
            return TCP_FIN_WAIT, direction
        return state, closer
    if state == TCP_SYN_SENT:
        if direction == 1 and flags & (SYN | ACK) == SYN | ACK:
            return TCP_SYN_RECV, closer
        return state, closer
    if state == TCP_SYN_RECV:
        if direction == 0 and flags & FIN:
            return TCP_FIN_WAIT, direction
        if direction == 0 and flags & (SYN | ACK) == ACK:
            return TCP_ESTABLISHED, closer
        return state, closer
    if state == TCP_FIN_WAIT or state == TCP_CLOSE_WAIT:
        if direction != closer:
            if flags & FIN:
                return TCP_LAST_ACK, closer
            if state == TCP_FIN_WAIT and flags & ACK:
                return TCP_CLOSE_WAIT, closer
        return state, closer
    if state == TCP_LAST_ACK:
        if direction == closer and flags & (ACK | FIN | SYN) == ACK:
            return TCP_TIME_WAIT, closer
        return state, closer
    return state, closer
