"""Virtual services and the choice of a server for each new connection.

Policies (all honour per-server weights; weight 0 drains a server: it keeps its connections, gets no
new ones):
- round-robin: smooth weighted round robin (nginx's): weights 5,1,1 give a a b a c a a, not a a a a a b c.
- least-connections: the server with the fewest tracked connections per unit of weight.
- source-hash: weighted rendezvous hashing of the client address: the same client always gets the same
  server while the pool is unchanged, and removing a server only moves that server's clients.
Choosing is O(number of servers) and happens once per connection, never per packet.
"""

from __future__ import annotations

import hashlib
import math

from overlay.tm.config import ServerConfig, ServiceConfig


class Server:
    __slots__ = ("address", "port", "weight", "packed", "port_bytes", "connections", "_current", "_seed")

    def __init__(self, config: ServerConfig) -> None:
        self.address = config.address
        self.port = config.port
        self.weight = config.weight
        self.packed = config.address.packed
        self.port_bytes = config.port.to_bytes(2, "big")
        self.connections = 0        # live tracked connections DNATed to this server
        self._current = 0           # smooth round-robin state
        self._seed = self.packed + self.port_bytes

    def rendezvous_score(self, client: bytes) -> float:
        digest = hashlib.blake2b(client, digest_size=8, key=self._seed).digest()
        # A uniform value in (0, 1]; -weight / ln(u) is the weighted rendezvous score (larger wins).
        uniform = (int.from_bytes(digest, "big") + 1) / 2.0**64
        return -self.weight / math.log(uniform) if uniform < 1.0 else math.inf


class Service:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.name = config.name
        self.servers = [Server(server) for server in config.servers]
        self._choose = {
            "round-robin": self._round_robin,
            "least-connections": self._least_connections,
            "source-hash": self._source_hash,
        }[config.policy]

    def choose(self, client: bytes) -> Server | None:
        """The server for a new connection from `client` (packed address), or None if all are drained."""
        return self._choose(client)

    def _round_robin(self, client: bytes) -> Server | None:
        best: Server | None = None
        total = 0
        for server in self.servers:
            if server.weight <= 0:
                continue
            server._current += server.weight
            total += server.weight
            if best is None or server._current > best._current:
                best = server
        if best is not None:
            best._current -= total
        return best

    def _least_connections(self, client: bytes) -> Server | None:
        best: Server | None = None
        for server in self.servers:
            if server.weight <= 0:
                continue
            # Compare connections/weight without division: a.c * b.w < b.c * a.w.
            if best is None or server.connections * best.weight < best.connections * server.weight:
                best = server
        return best

    def _source_hash(self, client: bytes) -> Server | None:
        best: Server | None = None
        best_score = -1.0
        for server in self.servers:
            if server.weight <= 0:
                continue
            score = server.rendezvous_score(client)
            if score > best_score:
                best, best_score = server, score
        return best

    def find(self, packed: bytes, port: int) -> Server | None:
        """The pool member at address:port (to carry connections over a reconfiguration)."""
        for server in self.servers:
            if server.packed == packed and server.port == port:
                return server
        return None

    def status(self) -> dict:
        config = self.config
        return {
            "name": self.name,
            "virtual": str(config.virtual),
            "port": config.port,
            "protocol": config.protocol,
            "policy": config.policy,
            "servers": [
                {"address": str(s.address), "port": s.port, "weight": s.weight, "connections": s.connections}
                for s in self.servers
            ],
        }
