"""Sans-I/O health checking of TMs by the distributor: in-band keepalives over the GRE-in-UDP path.

A keepalive travels the same way traffic does (distributor → GRE-in-UDP → TM agent → back), so a broken
tunnel, a filtered underlay or a dead agent all look the same: the echo stops. TM agents recognise a
keepalive by its GRE protocol type 0x88B5 (`overlay.gre.KEEPALIVE_PROTOCOL`, IEEE 802 local experimental)
and send the payload back unchanged.

The checker never reads a clock or touches a socket. The adapter asks `due_probes(now)` for payloads to
encapsulate and send, feeds echoes to `on_reply(payload, now)`, optional `/healthz` results to `on_http`,
calls `tick(now)` at `next_deadline()` (and after feeding replies) and applies the state changes it returns.

Decisions (docs/operations.md, "Health checks"):
- TMs known at start are *up*: a distributor that (re)starts must carry traffic at once, and a dead TM is
  found within `interval × fall + timeout` anyway. Starting down would drop everything for
  `interval × rise` after every restart. TMs *added* later by `set_tms` start *down*: the rest of the fleet
  is carrying traffic, so proving a newcomer first costs nothing and never blackholes its rows.
- One consecutive-result counter per TM: `fall` consecutive failures take a TM down, `rise` consecutive
  successes bring it back. With `http` on, `/healthz` results run through their own rise/fall track and a
  TM is up only when both tracks are.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

KEEPALIVE_MAGIC = b"OVKA"
KEEPALIVE_VERSION = 1
# magic, version, 3 reserved bytes (keep the 64-bit fields aligned), sequence, send time (ns), sender hash.
_KEEPALIVE = struct.Struct("!4sB3xQQQ")
KEEPALIVE_SIZE = _KEEPALIVE.size  # 32

ALL_DOWN_POLICIES = ("drop", "keep-last", "route")

# Reasons an echoed payload is refused (counted in `snapshot()["rejected"]`).
REJECT_LENGTH = "bad_length"
REJECT_MAGIC = "bad_magic"
REJECT_VERSION = "bad_version"
REJECT_FOREIGN = "foreign_sender"  # another distributor's keepalive (or corrupted hash)
REJECT_LATE = "late"  # ours, but its timeout already counted it as lost
REJECT_UNKNOWN = "unknown_sequence"  # never sent, already answered (duplicate), or from a previous run
REJECT_TIMESTAMP = "timestamp_mismatch"  # sequence is outstanding but the echoed send time differs


def name_hash(name: str) -> int:
    """64-bit hash of a distributor's name; tells its keepalives apart from its neighbours'."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def encode_keepalive(sequence: int, sent_ns: int, sender_hash: int) -> bytes:
    return _KEEPALIVE.pack(KEEPALIVE_MAGIC, KEEPALIVE_VERSION, sequence, sent_ns, sender_hash)


@dataclass(frozen=True)
class Keepalive:
    sequence: int
    sent_ns: int
    sender_hash: int


def decode_keepalive(payload: bytes) -> Keepalive | str:
    """The keepalive in `payload`, or the reject reason if it is not a well-formed one."""
    if len(payload) != KEEPALIVE_SIZE:
        return REJECT_LENGTH
    magic, version, sequence, sent_ns, sender_hash = _KEEPALIVE.unpack(payload)
    if magic != KEEPALIVE_MAGIC:
        return REJECT_MAGIC
    if version != KEEPALIVE_VERSION:
        return REJECT_VERSION
    return Keepalive(sequence, sent_ns, sender_hash)


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 1.0  # seconds between keepalives to one TM
    timeout: float = 1.0  # a keepalive not echoed within this is a failure
    rise: int = 2  # consecutive successes that bring a down TM up
    fall: int = 3  # consecutive failures that take an up TM down
    http: bool = False  # also require the TM's /healthz to answer 200
    all_down: str = "drop"  # what the distributor does with traffic when no TM is up
    # Seconds a TM that came back up shares its rows with the TMs that held them while it was down: they
    # get its packets it has no state for (second chance), so connections opened or moved there live on.
    return_grace: float = 0.0

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"health.interval must be > 0, got {self.interval}")
        if not self.timeout > 0:
            raise ValueError(f"health.timeout must be > 0, got {self.timeout}")
        if self.rise < 1 or self.fall < 1:
            raise ValueError(f"health.rise and health.fall must be >= 1, got {self.rise}/{self.fall}")
        if self.all_down not in ALL_DOWN_POLICIES:
            raise ValueError(f"health.all_down must be one of {', '.join(ALL_DOWN_POLICIES)}, got {self.all_down!r}")

    @property
    def detection_time(self) -> float:
        """Worst case from a TM's death to its removal, given `tick` runs at `next_deadline()`."""
        return self.interval * self.fall + self.timeout


@dataclass
class _Track:
    """Rise/fall hysteresis over one source of results (keepalives or /healthz)."""

    up: bool
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive

    def record(self, ok: bool, rise: int, fall: int) -> None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if not self.up and self.successes >= rise:
                self.up = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.up and self.failures >= fall:
                self.up = False


@dataclass
class _TmHealth:
    keepalive: _Track
    http: _Track
    next_probe: float
    next_http: float
    sent: int = 0
    replies: int = 0
    timeouts: int = 0
    http_failures: int = 0
    transitions: int = 0
    last_rtt: float | None = None
    outstanding: dict[int, tuple[float, int]] = field(default_factory=dict)  # sequence -> (deadline, sent_ns)


def _ns(now: float) -> int:
    return int(now * 1_000_000_000)


class HealthChecker:
    """Keepalive scheduling, reply matching and up/down hysteresis for a fleet of TMs."""

    def __init__(self, config: HealthConfig, tms: Iterable[str], now: float, *, sender: str = "distributor"):
        self.config = config
        self._sender_hash = name_hash(sender)
        self._sequence = 0
        self._probe_owner: dict[int, str] = {}  # outstanding sequence -> TM
        self._tms: dict[str, _TmHealth] = {}
        self._changes: list[tuple[str, bool]] = []
        self._rejected: Counter[str] = Counter()
        for tm in tms:
            self._tms[tm] = self._new_tm(up=True, now=now)
        # The last non-empty set of up TMs: what "keep-last" keeps serving when every TM is down.
        self._last_up: frozenset[str] = frozenset(self.up())

    def _new_tm(self, up: bool, now: float) -> _TmHealth:
        return _TmHealth(keepalive=_Track(up), http=_Track(up), next_probe=now, next_http=now)

    # -- inputs ---------------------------------------------------------------------------------------

    def due_probes(self, now: float) -> list[tuple[str, bytes]]:
        probes: list[tuple[str, bytes]] = []
        sent_ns = _ns(now)
        for tm, health in self._tms.items():
            if health.next_probe > now:
                continue
            self._sequence += 1
            health.outstanding[self._sequence] = (now + self.config.timeout, sent_ns)
            self._probe_owner[self._sequence] = tm
            health.sent += 1
            health.next_probe = self._next_slot(health.next_probe, now)
            probes.append((tm, encode_keepalive(self._sequence, sent_ns, self._sender_hash)))
        return probes

    def due_http(self, now: float) -> list[str]:
        """TMs whose /healthz the adapter should query now (empty unless `config.http`)."""
        if not self.config.http:
            return []
        due: list[str] = []
        for tm, health in self._tms.items():
            if health.next_http <= now:
                health.next_http = self._next_slot(health.next_http, now)
                due.append(tm)
        return due

    def _next_slot(self, scheduled: float, now: float) -> float:
        # Keep a steady cadence, but after a stall (a blocked loop) restart from now instead of
        # firing a burst of catch-up probes.
        following = scheduled + self.config.interval
        return following if following > now else now + self.config.interval

    def on_reply(self, payload: bytes, now: float) -> None:
        decoded = decode_keepalive(payload)
        if isinstance(decoded, str):
            self._rejected[decoded] += 1
            return
        if decoded.sender_hash != self._sender_hash:
            self._rejected[REJECT_FOREIGN] += 1
            return
        tm = self._probe_owner.get(decoded.sequence)
        if tm is None:
            late = _ns(now) - decoded.sent_ns > _ns(self.config.timeout) and decoded.sequence <= self._sequence
            self._rejected[REJECT_LATE if late else REJECT_UNKNOWN] += 1
            return
        health = self._tms[tm]
        deadline, sent_ns = health.outstanding[decoded.sequence]
        if sent_ns != decoded.sent_ns:
            self._rejected[REJECT_TIMESTAMP] += 1
            return
        if now > deadline:
            # tick() has not run yet, but the probe is already lost: count it the way tick() will.
            self._rejected[REJECT_LATE] += 1
            return
        del health.outstanding[decoded.sequence]
        del self._probe_owner[decoded.sequence]
        health.replies += 1
        health.last_rtt = max(0.0, now - sent_ns / 1_000_000_000)
        self._record(tm, health, health.keepalive, ok=True)

    def on_http(self, tm: str, ok: bool, now: float) -> None:
        health = self._tms.get(tm)
        if health is None or not self.config.http:
            return  # answer for a TM removed by a reload meanwhile, or http checks switched off
        if not ok:
            health.http_failures += 1
        self._record(tm, health, health.http, ok=ok)

    def tick(self, now: float) -> list[tuple[str, bool]]:
        """Expire unanswered keepalives; return every (tm, up) change since the last tick."""
        self._remember_up()
        for tm, health in self._tms.items():
            expired = [seq for seq, (deadline, _) in health.outstanding.items() if deadline <= now]
            for seq in expired:
                del health.outstanding[seq]
                del self._probe_owner[seq]
                health.timeouts += 1
                self._record(tm, health, health.keepalive, ok=False)
        self._remember_up()
        changes, self._changes = self._changes, []
        return changes

    def set_tms(self, tms: Iterable[str], now: float) -> None:
        """Adopt a reloaded fleet: survivors keep their state, newcomers start down, leavers are forgotten."""
        wanted = list(dict.fromkeys(tms))
        for tm in [tm for tm in self._tms if tm not in wanted]:
            for seq in self._tms.pop(tm).outstanding:
                del self._probe_owner[seq]
        for tm in wanted:
            if tm not in self._tms:
                self._tms[tm] = self._new_tm(up=False, now=now)
        self._changes = [(tm, up) for tm, up in self._changes if tm in self._tms]
        self._last_up = frozenset(tm for tm in self._last_up if tm in self._tms)
        self._remember_up()

    # -- outputs --------------------------------------------------------------------------------------

    def is_up(self, tm: str) -> bool:
        health = self._tms.get(tm)
        return health is not None and self._effective(health)

    def up(self) -> set[str]:
        return {tm for tm, health in self._tms.items() if self._effective(health)}

    def serving(self) -> set[str]:
        """The TMs the table should use, after applying the all-down policy.

        Empty means "no TM": the distributor drops (`drop`) or routes (`route`) what would have gone to one.
        `keep-last` keeps the TMs that were up last, betting that the checks, not the TMs, failed.
        """
        up = self.up()
        if up or self.config.all_down != "keep-last":
            return up
        return set(self._last_up)

    def all_down(self) -> bool:
        return bool(self._tms) and not self.up()

    def next_deadline(self) -> float:
        deadlines = [health.next_probe for health in self._tms.values()]
        if self.config.http:
            deadlines += [health.next_http for health in self._tms.values()]
        for health in self._tms.values():
            deadlines += [deadline for deadline, _ in health.outstanding.values()]
        return min(deadlines, default=float("inf"))

    def snapshot(self) -> dict:
        return {
            "config": asdict(self.config),
            "all_down": self.all_down(),
            "serving": sorted(self.serving()),
            "tms": {
                tm: {
                    "up": self._effective(health),
                    "keepalive_up": health.keepalive.up,
                    "http_up": health.http.up if self.config.http else None,
                    "consecutive_successes": health.keepalive.successes,
                    "consecutive_failures": health.keepalive.failures,
                    "probes_sent": health.sent,
                    "replies": health.replies,
                    "timeouts": health.timeouts,
                    "http_failures": health.http_failures,
                    "transitions": health.transitions,
                    "rtt_seconds": health.last_rtt,
                }
                for tm, health in sorted(self._tms.items())
            },
            "rejected": dict(sorted(self._rejected.items())),
        }

    # -- internals ------------------------------------------------------------------------------------

    def _effective(self, health: _TmHealth) -> bool:
        return health.keepalive.up and (health.http.up or not self.config.http)

    def _record(self, tm: str, health: _TmHealth, track: _Track, ok: bool) -> None:
        before = self._effective(health)
        track.record(ok, self.config.rise, self.config.fall)
        after = self._effective(health)
        if after != before:
            health.transitions += 1
            self._changes.append((tm, after))

    def _remember_up(self) -> None:
        # Only at tick boundaries: TMs that fall in the same tick (a cut underlay) are kept together.
        up = self.up()
        if up:
            self._last_up = frozenset(up)
