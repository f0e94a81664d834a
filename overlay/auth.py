"""Authentication (and, optionally, encryption) of every datagram between overlay nodes. Sans-I/O: bytes
and key material in, bytes or a named reason out; the caller passes the counter's start.

Why: without it anyone who can reach UDP 4754 injects packets — a TM accepts by source address, which
anyone on the path can forge, and the distributor writes what it is handed into the protected network.

Keys (pyca `cryptography`: maintained, audited bindings to OpenSSL's constant-time primitives). Every node
has an X25519 key pair (`overlay keygen`); configs name their peers' public keys. Each ordered pair of
nodes derives its own key from the static-static X25519 secret with HKDF-SHA256 (info: sender's and
receiver's public keys), so no secret is shared by more than two nodes and a leaked node key exposes only
that node's traffic. Datagrams are sealed with ChaCha20-Poly1305 (WireGuard's AEAD):

    0       1       2               6               10                      18
    +-------+-------+---------------+---------------+-----------------------+---------------+------+
    | 0x4F  | flags | sender key id | receiver kid  | counter (64 bit)      | GRE payload   | tag  |
    +-------+-------+---------------+---------------+-----------------------+---------------+------+
      flags bit 0: payload encrypted (else only authenticated: header and payload are the AEAD's
      associated data, the tag covers both); bits 1-7: the sender's lane (below). Key ids: the first 4
      bytes of SHA-256 of the public key.

The first byte is never a GRE header we accept (0x40 is GRE's deprecated routing bit), so a node tells a
sealed datagram from a plain one by its first byte, and one that requires authentication drops plain GRE.

Replay: the nonce is the lane (32 bits) and the counter (64), which starts at the wall clock in nanoseconds
(so it keeps rising across restarts: a restarted node never reuses a nonce, and its peers' windows accept
it at once) and counts up per datagram. Lanes: a node's packet loops (`[node] workers`) seal with the same
key, each from a counter of its own, worker i in lane i — the lane in the nonce keeps their nonces apart,
and the lane in the header gives each its own replay window at the receiver (their counters interleave
far apart: one window would refuse the slower loop's as too old). Lane 0 is the one-process format, so a
node without workers talks to any peer; a peer must know lanes before it hears from lane 1 and up (older
peers refuse a lane as `auth:malformed`). Each receiver keeps, per sender key and lane, the highest
counter seen and a window of the WINDOW below it: a counter seen before, or older than the window, is
dropped — but only after the tag verified, so forgeries cannot move the window (overlay/antireplay.py). A
receiver with several packet loops keeps one set of windows for them all, in shared memory: a replay may
be sent to any of its sockets, and whichever loop it reaches meets the window that saw the original.

Rotation without loss: a node lists several private keys (the first signs, all are accepted) and several
public keys per peer (the first is sealed to, all are accepted), so old and new keys overlap while
configs change one node at a time (docs/clouds.md, "Key rotation").
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from overlay import antireplay
from overlay.antireplay import WINDOW, LocalWindows, SharedWindows

MARKER = 0x4F
FLAG_ENCRYPTED = 0x01
LANE_SHIFT = 1
LANES = 128            # flags bits 1-7: the sealing worker (lane 0: a node's only or first loop)
OPEN_LANES = 64        # lanes a receiver opens: one per worker at most (`[node] workers` <= 64); above, malformed
_HEADER = struct.Struct("!BBIIQ")
HEADER_SIZE = _HEADER.size   # 18
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE   # bytes a sealed datagram adds (MTU arithmetic)
_NONCE_PAD = bytes(4)   # ChaCha20-Poly1305 takes 96-bit nonces: 32 zero bits, then the 64-bit counter
MODES = ("off", "authenticate", "encrypt")

# Reasons a datagram is refused (counted by the node cores under `auth:...`).
UNAUTHENTICATED = "auth:unauthenticated"   # plain GRE where authentication is required
MALFORMED = "auth:malformed"               # shorter than header and tag, or an unknown version
UNKNOWN_KEY = "auth:unknown-key"           # sealed by a key no peer has, or to a key we do not hold
BAD_TAG = "auth:bad-tag"                   # forged, corrupted, or sealed with another key
REPLAYED = antireplay.REPLAYED            # a counter already seen from that key and lane
TOO_OLD = antireplay.TOO_OLD               # a counter below the replay window
NO_WINDOW = antireplay.NO_WINDOW           # a node's shared replay windows are all taken (a new key or lane)
REASONS = (UNAUTHENTICATED, MALFORMED, UNKNOWN_KEY, BAD_TAG, REPLAYED, TOO_OLD, NO_WINDOW)


def key_id(public_key: bytes) -> int:
    return int.from_bytes(hashlib.sha256(b"overlay-key-id\0" + public_key).digest()[:4], "big")


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decode_key(text: str) -> bytes:
    """A base64 32-byte key; ValueError naming what is wrong."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"a key is 32 bytes, this is {len(raw)}")
    return raw


@dataclass(frozen=True)
class AuthConfig:
    """`private_keys`: ours, the first seals; `peers`: name → public keys, the first is sealed to."""

    mode: str = "off"
    private_keys: tuple[bytes, ...] = ()
    peers: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.mode != "off" and not self.private_keys:
            raise ValueError("authentication needs a private key")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


class Authenticator:
    """Seals datagrams to peers and opens datagrams from them. `counter_start`: the wall clock in ns at
    start (the caller's clock); `windows`: the node's shared replay windows where it runs several packet
    loops (overlay/antireplay.py), else this loop's own."""

    def __init__(self, config: AuthConfig, counter_start: int, lane: int = 0,
                 windows: LocalWindows | SharedWindows | None = None) -> None:
        if not 0 <= lane < LANES:
            raise ValueError(f"lane must be 0 to {LANES - 1}")
        self.config = config
        self.mode = config.mode
        self.lane = lane
        self._flags = (FLAG_ENCRYPTED if config.mode == "encrypt" else 0) | lane << LANE_SHIFT
        self._nonce_pad = lane.to_bytes(4, "big")
        self._counter = counter_start
        self._private = [X25519PrivateKey.from_private_bytes(raw) for raw in config.private_keys]
        self._own_public = [public_key_of(raw) for raw in config.private_keys]
        self._own_by_id = {key_id(public): (private, public) for private, public in zip(self._private, self._own_public)}
        self._peer_by_id: dict[int, tuple[str, bytes]] = {}
        for name, keys in config.peers.items():
            for public in keys:
                self._peer_by_id[key_id(public)] = (name, public)
        self._send: dict[str, list] = {}   # peer → [header prefix, AEAD, counter]
        self._receive: dict[tuple[int, int], ChaCha20Poly1305] = {}
        self.windows = windows if windows is not None else LocalWindows()   # per (sender key id, lane)
        self._rings: dict[tuple[int, int], Any] = {}   # each sender's window at hand: one dict lookup a datagram
        self.refused = dict.fromkeys(REASONS, 0)

    def reconfigure(self, config: AuthConfig) -> Authenticator:
        """The same node with new keys (a reload): the counter keeps rising and the replay windows of
        senders whose keys stay are kept, so a reload neither reuses a nonce nor reopens a replay."""
        new = Authenticator(config, max([self._counter, *(sender[2] for sender in self._send.values())]), self.lane)
        new.windows = self.windows.kept(new._peer_by_id)
        new.refused = self.refused
        return new

    def peer_of(self, datagram: bytes) -> str | None:
        """Which peer's key a sealed datagram claims (before any check: for logs, never for trust)."""
        if len(datagram) < HEADER_SIZE or datagram[0] != MARKER:
            return None
        found = self._peer_by_id.get(int.from_bytes(datagram[2:6], "big"))
        return found[0] if found else None

    # -- sealing ----------------------------------------------------------------------------------------
    def seal(self, payload: bytes, peer: str) -> bytes:
        """`payload` sealed to `peer` (KeyError for a peer without a key)."""
        sender = self._send.get(peer)
        if sender is None:
            sender = self._send[peer] = [*self._sender(peer), self._counter]
        # One counter per peer (per key pair): each receiver sees consecutive counters, the cheap case of
        # its replay window, however many peers we talk to.
        sender[2] += 1
        prefix, aead = sender[0], sender[1]
        counter = sender[2].to_bytes(8, "big")
        header = prefix + counter
        nonce = self._nonce_pad + counter
        if self._flags & FLAG_ENCRYPTED:
            return header + aead.encrypt(nonce, payload, header)
        return header + payload + aead.encrypt(nonce, b"", header + payload)

    def _sender(self, peer: str) -> tuple[bytes, ChaCha20Poly1305]:
        their_public = self.config.peers[peer][0]
        own_private, own_public = self._private[0], self._own_public[0]
        prefix = bytes((MARKER, self._flags)) + key_id(own_public).to_bytes(4, "big") + key_id(their_public).to_bytes(4, "big")
        return prefix, _aead(own_private, own_public, their_public, sending=True)

    # -- opening ----------------------------------------------------------------------------------------
    def open(self, datagram: bytes) -> tuple[str, bytes] | str:
        """(peer name, GRE payload) of a sealed datagram, or the reason it is refused."""
        if not datagram or datagram[0] != MARKER:
            return self._refuse(UNAUTHENTICATED)
        if len(datagram) < OVERHEAD:
            return self._refuse(MALFORMED)
        _, flags, sender_id, receiver_id, counter = _HEADER.unpack_from(datagram, 0)
        lane = flags >> LANE_SHIFT
        if lane >= OPEN_LANES:
            return self._refuse(MALFORMED)   # no node has that many loops: nor a window for each
        aead = self._receive.get((sender_id, receiver_id))
        if aead is None:
            sender = self._peer_by_id.get(sender_id)
            own = self._own_by_id.get(receiver_id)
            if sender is None or own is None:
                return self._refuse(UNKNOWN_KEY)
            aead = self._receive[(sender_id, receiver_id)] = _aead(own[0], own[1], sender[1], sending=False)
        header = datagram[:HEADER_SIZE]
        nonce = (_NONCE_PAD if not lane else lane.to_bytes(4, "big")) + datagram[10:HEADER_SIZE]
        try:
            if flags & FLAG_ENCRYPTED:
                payload = aead.decrypt(nonce, datagram[HEADER_SIZE:], header)
            else:
                aead.decrypt(nonce, datagram[-TAG_SIZE:], datagram[:-TAG_SIZE])
                payload = datagram[HEADER_SIZE:-TAG_SIZE]
        except InvalidTag:
            return self._refuse(BAD_TAG)
        ring = self._rings.get((sender_id, lane))
        if ring is None:
            ring = self._rings[(sender_id, lane)] = self.windows.ring(sender_id, lane)
        refused = ring.check_and_set(counter)
        if refused is not None:
            return self._refuse(refused)
        return self._peer_by_id[sender_id][0], payload

    def _refuse(self, reason: str) -> str:
        self.refused[reason] += 1
        return reason


def _aead(own_private: X25519PrivateKey, own_public: bytes, their_public: bytes, sending: bool) -> ChaCha20Poly1305:
    """The key of one direction of one pair: HKDF over the X25519 secret, bound to both public keys in
    the direction's order (sender first), so the two directions never share a key."""
    shared = own_private.exchange(X25519PublicKey.from_public_bytes(their_public))
    order = own_public + their_public if sending else their_public + own_public
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"overlay-auth-v1", info=order).derive(shared)
    return ChaCha20Poly1305(key)


__all__ = ["AuthConfig", "Authenticator", "LANES", "OVERHEAD", "MODES", "REASONS", "WINDOW", "decode_key", "encode_key",
           "generate_private_key", "public_key_of", "key_id"]
