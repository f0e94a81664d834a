"""The lab's UDP echo service (servers behind the VIP, and the remote host for source-NATed flows).

Every datagram comes back the same size, its first `HEADER` bytes replaced by who answered and the source
it saw (`"server1 198.51.100.100 40000"`, space-padded), the rest unchanged: a test checks the payload
survived (fragments included), which server a UDP flow reached and which public source a source-NATed
flow left with. Shorter datagrams come back as the header alone.

IPv6 sockets fragment at 1280 bytes (IPV6_MTU), as DNS software does (IPV6_USE_MIN_MTU), so a datagram
never waits on path MTU discovery; IPv4 sockets send without DF, so routers may fragment again. Answers
leave from the address the datagram was sent to (IP_PKTINFO), as a multi-homed server must for its
answers to match the client's (and every NAT's) view of the flow.

Run: `python -m overlay.lab.udpecho --name server1 --port 5300 --seconds 300` (0.0.0.0 and ::; exits
after `--seconds`, bounded like every lab process).
"""

from __future__ import annotations

import argparse
import select
import socket
import time

HEADER = 64
MAX_DATAGRAM = 65535
IPV6_MIN_MTU = 1280
_IPV6_MTU = 24          # <linux/in6.h>: not in the socket module
_IP_MTU_DISCOVER = 10   # <linux/in.h>
_IP_PMTUDISC_DONT = 0
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_CMSG_SPACE = socket.CMSG_SPACE(20)


def open_socket(family: socket.AddressFamily, address: tuple[str, int] | None = None) -> socket.socket:
    """A UDP socket set up as the lab's UDP peers use them (see the module docstring)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU, IPV6_MIN_MTU)
    else:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    if address is not None:
        sock.bind(address)
    return sock


def header(name: str, peer: tuple[str, int]) -> bytes:
    return f"{name} {peer[0]} {peer[1]}".encode().ljust(HEADER)


def parse_header(datagram: bytes) -> tuple[str, str, int]:
    """(server name, source it saw, source port) from an echoed datagram."""
    name, host, port = datagram[:HEADER].decode().split()
    return name, host, int(port)


def _answer_from_destination(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The pktinfo to send with: the received one's destination address as our source, any interface."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:   # in_pktinfo: ifindex, spec_dst, addr
            return [(level, kind, bytes(4) + data[8:12] + bytes(4))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:   # in6_pktinfo: addr, ifindex
            return [(level, kind, data[:16] + bytes(4))]
    return []


def serve(name: str, port: int, seconds: float) -> None:
    sockets = [open_socket(socket.AF_INET, ("0.0.0.0", port)), open_socket(socket.AF_INET6, ("::", port))]
    sockets[0].setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    sockets[1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(sockets, [], [], min(left, 1.0))
        for sock in ready:
            data, ancillary, _, peer = sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            sock.sendmsg([header(name, peer) + data[HEADER:]], _answer_from_destination(ancillary), 0, peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=5300)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()
    serve(args.name, args.port, args.seconds)


if __name__ == "__main__":
    main()
