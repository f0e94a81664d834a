"""IP fragments through a NAT TM without reassembly: the first fragment carries the ports and finds (or
opens) its connection as any packet does; the TM remembers which translation that datagram got, keyed by
what every fragment repeats — addresses, protocol and IP identification — and applies it to the
non-first fragments, which carry no ports.

Why track instead of reassemble: the fragments leave as they came (same sizes, so the path MTU that made
them still holds; IPv6 routers cannot fragment again), nothing waits for the last fragment, and a
translation only rewrites addresses in the non-first fragments (and the IPv4 header checksum). The
transport checksum lives in the first fragment and is updated incrementally there, which is exact
without seeing the rest of the datagram (RFC 1624 arithmetic only needs the changed words).

Non-first fragments that arrive before their first fragment are held (bounded per datagram, per source
and in total) and released when it arrives; what is never claimed expires and is counted.
Sans-I/O: time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from overlay.tm.conntrack import Half


@dataclass(frozen=True)
class FragmentLimits:
    timeout: float = 30.0              # Linux's ipfrag_time: how long a datagram's fragments may straggle
    max_datagrams: int = 16384         # translations remembered at once (oldest forgotten first)
    max_held_bytes: int = 4 << 20      # early fragments held in total, waiting for their first fragment
    max_held_per_datagram: int = 64    # fragments held for one datagram (64 KB / 1280-byte fragments = 52)
    max_held_per_source: int = 256     # fragments held for one source address: one sender cannot fill it all


class _Held:
    __slots__ = ("fragments", "size", "source", "expires")

    def __init__(self, source: bytes, expires: float) -> None:
        self.fragments: list[bytes] = []
        self.size = 0
        self.source = source
        self.expires = expires


class FragmentTracker:
    """Datagram key (`src + dst + protocol + identification`) → the `Half` its first fragment used."""

    def __init__(self, limits: FragmentLimits = FragmentLimits()) -> None:
        self.limits = limits
        self._translations: OrderedDict[bytes, tuple[Half, float]] = OrderedDict()
        self._held: OrderedDict[bytes, _Held] = OrderedDict()
        self._held_bytes = 0
        self._held_by_source: dict[bytes, int] = {}
        self.timed_out = 0   # held fragments whose first fragment never came

    # -- translations ---------------------------------------------------------------------------------
    def remember(self, key: bytes, half: Half, now: float) -> list[bytes]:
        """The first fragment of `key` was passed with `half`; returns the fragments held for it."""
        translations = self._translations
        translations.pop(key, None)
        translations[key] = (half, now + self.limits.timeout)  # fixed timeout: insertion order is expiry order
        if len(translations) > self.limits.max_datagrams:
            translations.popitem(last=False)
        return self.release(key)

    def lookup(self, key: bytes, now: float) -> Half | None:
        found = self._translations.get(key)
        if found is None:
            return None
        half, expires = found
        if expires <= now:
            del self._translations[key]
            return None
        return half

    # -- early fragments ------------------------------------------------------------------------------
    def hold(self, key: bytes, source: bytes, fragment: bytes, now: float) -> bool:
        """Keep a non-first fragment until its first fragment comes; False when a limit refuses it."""
        limits = self.limits
        held = self._held.get(key)
        if held is not None and len(held.fragments) >= limits.max_held_per_datagram:
            return False
        if self._held_by_source.get(source, 0) >= limits.max_held_per_source:
            return False
        if self._held_bytes + len(fragment) > limits.max_held_bytes:
            return False
        if held is None:
            held = self._held[key] = _Held(source, now + limits.timeout)
        held.fragments.append(fragment)
        held.size += len(fragment)
        self._held_bytes += len(fragment)
        self._held_by_source[source] = self._held_by_source.get(source, 0) + 1
        return True

    def release(self, key: bytes) -> list[bytes]:
        """Forget what was held for `key` and return it (empty when nothing was)."""
        held = self._held.pop(key, None)
        if held is None:
            return []
        self._held_bytes -= held.size
        left = self._held_by_source[held.source] - len(held.fragments)
        if left:
            self._held_by_source[held.source] = left
        else:
            del self._held_by_source[held.source]
        return held.fragments

    # -- time -----------------------------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Forget translations and held fragments past their time; how many held fragments were lost."""
        translations = self._translations
        while translations:
            key, (_, expires) = next(iter(translations.items()))
            if expires > now:
                break
            del translations[key]
        lost = 0
        while self._held:
            key, held = next(iter(self._held.items()))
            if held.expires > now:
                break
            lost += len(self.release(key))
        self.timed_out += lost
        return lost

    def next_deadline(self) -> float | None:
        deadlines = [entry[1] for entry in (next(iter(self._translations.values()), None),) if entry]
        if self._held:
            deadlines.append(next(iter(self._held.values())).expires)
        return min(deadlines) if deadlines else None

    def status(self) -> dict[str, int]:
        return {"datagrams": len(self._translations), "held_fragments": sum(len(h.fragments) for h in self._held.values()),
                "held_bytes": self._held_bytes}
