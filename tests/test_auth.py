"""overlay.auth: sealed datagrams between nodes — round trips, forgeries, replays, wrong keys, rotation."""

from __future__ import annotations

import pytest

from overlay import auth, gre
from overlay.auth import AuthConfig, Authenticator

KEYS = {name: auth.generate_private_key() for name in ("dist", "tm1", "tm2", "attacker")}
PUBLIC = {name: auth.public_key_of(key) for name, key in KEYS.items()}
PAYLOAD = gre.encapsulate(bytes.fromhex("4500001c000100004011f9c0c6336464cb007150") + bytes(8))
T0 = 1_700_000_000_000_000_000


def node(name: str, peers: tuple[str, ...], mode: str = "authenticate", start: int = T0,
         private: tuple[bytes, ...] | None = None, public: dict[str, tuple[bytes, ...]] | None = None,
         lane: int = 0) -> Authenticator:
    keys = {peer: (PUBLIC[peer],) for peer in peers} | (public or {})
    return Authenticator(AuthConfig(mode, private or (KEYS[name],), keys), start, lane)


@pytest.mark.parametrize("mode", ["authenticate", "encrypt"])
def test_a_sealed_datagram_opens_at_its_peer_only(mode: str) -> None:
    dist, tm1, tm2 = node("dist", ("tm1", "tm2"), mode), node("tm1", ("dist",), mode), node("tm2", ("dist",), mode)
    sealed = dist.seal(PAYLOAD, "tm1")
    assert len(sealed) == len(PAYLOAD) + auth.OVERHEAD
    assert (PAYLOAD in sealed) == (mode == "authenticate")
    assert tm1.open(sealed) == ("dist", PAYLOAD)
    assert tm2.open(sealed) == auth.UNKNOWN_KEY, "sealed to tm1's key: tm2 holds no such key"
    assert dist.open(tm1.seal(PAYLOAD, "dist")) == ("tm1", PAYLOAD)


@pytest.mark.parametrize("mode", ["authenticate", "encrypt"])
def test_every_changed_byte_is_refused(mode: str) -> None:
    dist, tm1 = node("dist", ("tm1",), mode), node("tm1", ("dist",), mode)
    sealed = dist.seal(PAYLOAD, "tm1")
    for at in range(len(sealed)):
        forged = bytearray(sealed)
        forged[at] ^= 0x01
        assert tm1.open(bytes(forged)) in (auth.BAD_TAG, auth.UNKNOWN_KEY, auth.MALFORMED, auth.UNAUTHENTICATED), at
    assert tm1.open(sealed) == ("dist", PAYLOAD), "forgeries never moved the replay window"


def test_plain_gre_and_short_datagrams_are_refused() -> None:
    tm1 = node("tm1", ("dist",))
    assert tm1.open(PAYLOAD) == auth.UNAUTHENTICATED
    assert tm1.open(b"") == auth.UNAUTHENTICATED
    assert tm1.open(bytes([auth.MARKER]) + bytes(20)) == auth.MALFORMED
    assert tm1.refused[auth.UNAUTHENTICATED] == 2 and tm1.refused[auth.MALFORMED] == 1


def test_a_replayed_datagram_is_refused_and_reordering_within_the_window_is_not() -> None:
    dist, tm1 = node("dist", ("tm1",)), node("tm1", ("dist",))
    sealed = [dist.seal(PAYLOAD, "tm1") for _ in range(5)]
    assert [tm1.open(d)[0] for d in (sealed[0], sealed[3], sealed[1], sealed[2], sealed[4])] == ["dist"] * 5
    assert tm1.open(sealed[2]) == auth.REPLAYED
    for _ in range(auth.WINDOW - 1):   # sealed[4] is now the oldest counter the window still holds
        tm1.open(dist.seal(PAYLOAD, "tm1"))
    assert tm1.open(sealed[4]) == auth.REPLAYED
    assert tm1.open(sealed[0]) == auth.TOO_OLD


def test_a_node_with_the_wrong_key_cannot_join() -> None:
    """The attacker knows everyone's public key and claims to be dist: its key id is unknown; with dist's
    key id copied into the header, the tag is wrong."""
    tm1 = node("tm1", ("dist",))
    impostor = node("attacker", ("tm1",))
    sealed = impostor.seal(PAYLOAD, "tm1")
    assert tm1.open(sealed) == auth.UNKNOWN_KEY
    claimed = sealed[:2] + auth.key_id(PUBLIC["dist"]).to_bytes(4, "big") + sealed[6:]
    assert tm1.open(claimed) == auth.BAD_TAG


def test_a_restarted_sender_is_accepted_at_once() -> None:
    first, later = node("dist", ("tm1",), start=T0), node("dist", ("tm1",), start=T0 + 10**9)
    tm1 = node("tm1", ("dist",))
    assert tm1.open(first.seal(PAYLOAD, "tm1"))[0] == "dist"
    assert tm1.open(later.seal(PAYLOAD, "tm1"))[0] == "dist", "a restart one second later starts above the window"


def test_key_rotation_loses_nothing() -> None:
    """dist rotates its key: tm1 first accepts both public keys, then dist seals with the new one while
    still holding the old (tm1 seals to the old until its config names the new key first)."""
    new = auth.generate_private_key()
    new_public = auth.public_key_of(new)
    dist = node("dist", ("tm1",))
    tm1 = node("tm1", (), public={"dist": (PUBLIC["dist"], new_public)})
    assert tm1.open(dist.seal(PAYLOAD, "tm1"))[0] == "dist"
    rotated = node("dist", ("tm1",), private=(new, KEYS["dist"]), start=T0 + 10**6)
    assert tm1.open(rotated.seal(PAYLOAD, "tm1"))[0] == "dist", "the new key is accepted"
    assert rotated.open(tm1.seal(PAYLOAD, "dist"))[0] == "tm1", "tm1 still seals to the old key: accepted"
    tm1_updated = node("tm1", (), public={"dist": (new_public,)}, start=T0 + 10**6)  # a reload keeps counting
    assert rotated.open(tm1_updated.seal(PAYLOAD, "dist"))[0] == "tm1"
    assert tm1_updated.open(dist.seal(PAYLOAD, "tm1")) == auth.UNKNOWN_KEY, "once removed, the old key is refused"


def test_keys_round_trip_through_base64_and_bad_ones_are_named() -> None:
    assert auth.decode_key(auth.encode_key(KEYS["dist"])) == KEYS["dist"]
    with pytest.raises(ValueError, match="not base64"):
        auth.decode_key("not a key!")
    with pytest.raises(ValueError, match="32 bytes, this is 3"):
        auth.decode_key("AAAA")


def test_a_reload_keeps_counting_and_keeps_the_replay_windows() -> None:
    dist, tm1 = node("dist", ("tm1",)), node("tm1", ("dist",))
    old = dist.seal(PAYLOAD, "tm1")
    assert tm1.open(old)[0] == "dist"
    tm1 = tm1.reconfigure(tm1.config)
    assert tm1.open(old) == auth.REPLAYED, "a reload must not reopen a replay"
    dist = dist.reconfigure(dist.config)
    assert tm1.open(dist.seal(PAYLOAD, "tm1"))[0] == "dist", "nor reuse a counter"


@pytest.mark.parametrize("mode", ["authenticate", "encrypt"])
def test_workers_seal_with_one_key_in_lanes_of_their_own(mode: str) -> None:
    """`[node] workers`: every loop seals with the node's key, each from its own counter (its lane). The lane
    keeps their nonces apart — two loops that started in the same nanosecond must not seal alike (negative
    control: two loops in one lane do, which is a reused ChaCha20-Poly1305 nonce) — and gives each its own
    replay window at the receiver, so counters that interleave far apart are all accepted (negative control:
    in one lane the slower loop's are refused as too old), while a replay is refused in every lane."""
    tm1 = node("tm1", ("dist",), mode)
    loops = [node("dist", ("tm1",), mode, lane=lane) for lane in (0, 1)]
    sealed = [loop.seal(PAYLOAD, "tm1") for loop in loops]
    assert sealed[0][10:] != sealed[1][10:] and sealed[0][-16:] != sealed[1][-16:], "same counter, other nonce"
    same_lane = [node("dist", ("tm1",), mode) for _ in range(2)]
    assert same_lane[0].seal(PAYLOAD, "tm1") == same_lane[1].seal(PAYLOAD, "tm1"), "the control: one lane, one nonce"
    assert [tm1.open(datagram) for datagram in sealed] == [("dist", PAYLOAD)] * 2
    assert [tm1.open(datagram) for datagram in sealed] == [auth.REPLAYED] * 2

    fast = node("dist", ("tm1",), mode, start=T0 + 10 * auth.WINDOW, lane=3)
    slow = node("dist", ("tm1",), mode, start=T0, lane=4)
    for _ in range(50):
        assert tm1.open(fast.seal(PAYLOAD, "tm1")) == ("dist", PAYLOAD)
        assert tm1.open(slow.seal(PAYLOAD, "tm1")) == ("dist", PAYLOAD), "its own window"
    one_window = node("tm1", ("dist",), mode)
    fast0, slow0 = (node("dist", ("tm1",), mode, start=start) for start in (T0 + 10 * auth.WINDOW, T0))
    assert one_window.open(fast0.seal(PAYLOAD, "tm1")) == ("dist", PAYLOAD)
    assert one_window.open(slow0.seal(PAYLOAD, "tm1")) == auth.TOO_OLD, "the control: one window for both"


def test_a_lane_is_covered_by_the_tag_and_bounded() -> None:
    tm1 = node("tm1", ("dist",))
    sealed = bytearray(node("dist", ("tm1",), lane=5).seal(PAYLOAD, "tm1"))
    assert sealed[1] >> auth.LANE_SHIFT == 5
    sealed[1] ^= 1 << auth.LANE_SHIFT     # another lane: another nonce and other associated data
    assert tm1.open(bytes(sealed)) == auth.BAD_TAG
    for lane in (-1, auth.LANES):
        with pytest.raises(ValueError, match="lane"):
            node("dist", ("tm1",), lane=lane)
    reloaded = node("dist", ("tm1",), lane=7).reconfigure(AuthConfig("authenticate", (KEYS["dist"],), {"tm1": (PUBLIC["tm1"],)}))
    assert reloaded.lane == 7 and tm1.open(reloaded.seal(PAYLOAD, "tm1")) == ("dist", PAYLOAD)
