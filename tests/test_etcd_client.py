"""overlay.etcd against a real etcd (tests/etcdserver.py): key-value calls, compare-and-swap, leases,
watches (past start revisions, bursts, compaction) and what happens when etcd dies or an endpoint is down.
Plus the watch stream's line splitting against a scripted server that cuts a message into one-byte chunks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from overlay.etcd import EtcdClient, EtcdCompacted, EtcdError, EtcdUnavailable, KeyValue, WatchEvent, prefix_range_end
from tests.etcdserver import EtcdServer, etcd_server_fixture, free_ports  # noqa: F401 (the etcd_server fixture)

# A real etcd with real lease waits: not part of the fast suite (`-m "not etcd"`); CI runs them.
pytestmark = pytest.mark.etcd


async def collect(stream: AsyncIterator[list[WatchEvent]], count: int, timeout: float = 5.0) -> list[WatchEvent]:
    """The next count events of a watch (failing after timeout), and no more than count."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            events.extend(await anext(stream))
    assert len(events) == count, events
    return events


def ttl_left(server: EtcdServer, lease: int) -> int:
    return int(server.post("/v3/lease/timetolive", {"ID": str(lease)})["TTL"])


def test_prefix_range_end_increments_the_last_byte() -> None:
    assert prefix_range_end(b"fleet/") == b"fleet0"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\x00"
    assert prefix_range_end(b"") == b"\x00"


async def test_put_get_delete(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        assert await etcd.get("k") is None
        first = await etcd.put("k", "one")
        assert first > 1
        assert await etcd.get("k") == KeyValue("k", b"one", first, first, 1, 0)
        second = await etcd.put("k", b"\x00two\xff")
        assert second == first + 1
        assert await etcd.get("k") == KeyValue("k", b"\x00two\xff", second, first, 2, 0)
        await etcd.put("k", b"")  # an empty value: the gateway omits the field
        empty = await etcd.get("k")
        assert empty is not None and empty.value == b"" and empty.version == 3
        assert await etcd.delete("k") == 1
        assert await etcd.delete("k") == 0
        assert await etcd.get("k") is None


async def test_get_prefix_sorted_and_delete_prefix(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        for key in ("a/2", "a/10", "ab", "a/1", "b", "a\xff"):
            last = await etcd.put(key, key.upper())
        kvs, revision = await etcd.get_prefix("a/")
        assert [(kv.key, kv.value) for kv in kvs] == [("a/1", b"A/1"), ("a/10", b"A/10"), ("a/2", b"A/2")]
        assert revision == last
        everything, _ = await etcd.get_prefix("")
        assert [kv.key for kv in everything] == ["a/1", "a/10", "a/2", "ab", "a\xff", "b"]  # byte order: ÿ is c3 bf
        assert await etcd.delete_prefix("a/") == 3
        assert await etcd.delete_prefix("a/") == 0
        rest, after = await etcd.get_prefix("")
        assert [kv.key for kv in rest] == ["ab", "a\xff", "b"]
        assert after == last + 1  # one delete, one revision


async def test_txn_put_if_compares_mod_revision(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        assert await etcd.txn_put_if("owner", "d1", 0) is True
        assert await etcd.txn_put_if("owner", "d2", 0) is False  # exists now
        current = await etcd.get("owner")
        assert current is not None and current.value == b"d1"
        assert await etcd.txn_put_if("owner", "d2", current.mod_revision - 1) is False  # stale
        assert await etcd.txn_put_if("owner", "d2", current.mod_revision) is True
        now = await etcd.get("owner")
        assert now is not None and now.value == b"d2" and now.mod_revision > current.mod_revision


async def test_lease_revoke_deletes_its_keys(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        lease = await etcd.lease_grant(30)
        assert lease > 0
        await etcd.put("health/tm1", "up", lease=lease)
        assert await etcd.txn_put_if("health/tm2", "up", 0, lease=lease)
        await etcd.put("config/tm1", "w=1")
        kv = await etcd.get("health/tm1")
        assert kv is not None and kv.lease == lease
        assert await etcd.lease_keepalive(lease) == 30
        await etcd.lease_revoke(lease)
        kvs, _ = await etcd.get_prefix("health/")
        assert kvs == []
        assert await etcd.get("config/tm1") is not None
        assert await etcd.lease_keepalive(lease) == 0  # gone
        await etcd.lease_revoke(lease)  # already gone: not an error


async def test_lease_keepalive_extends(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        lease = await etcd.lease_grant(3)
        await asyncio.sleep(1.1)
        assert ttl_left(etcd_server, lease) <= 1  # 3 s granted, more than 1 s ago (whole seconds, rounded down)
        assert await etcd.lease_keepalive(lease) == 3
        assert ttl_left(etcd_server, lease) == 2  # back to 3 s (less the few ms since)


async def test_errors_that_are_not_unavailability(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        with pytest.raises(EtcdError, match="lease not found") as caught:
            await etcd.put("k", "v", lease=12345)
        assert caught.type is EtcdError and caught.value.code == 5


async def test_watch_from_a_past_revision_then_live(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        start = await etcd.put("fleet/tm1", "w=1")
        await etcd.put("other/x", "not watched")
        second = await etcd.put("fleet/tm2", "w=2")
        deleted = await etcd.put("fleet/tm1", "drain") + 1
        await etcd.delete("fleet/tm1")
        async with contextlib.aclosing(etcd.watch("fleet/", start)) as stream:
            past = await collect(stream, 4)
            assert past == [
                WatchEvent("put", "fleet/tm1", b"w=1", start),
                WatchEvent("put", "fleet/tm2", b"w=2", second),
                WatchEvent("put", "fleet/tm1", b"drain", deleted - 1),
                WatchEvent("delete", "fleet/tm1", b"", deleted),
            ]
            await etcd.put("other/y", "not watched")
            live = await etcd.put("fleet/tm3", "w=3")
            assert await collect(stream, 1) == [WatchEvent("put", "fleet/tm3", b"w=3", live)]


async def test_watch_a_burst_of_large_puts_arrives_in_order(etcd_server: EtcdServer) -> None:
    """100 concurrent 8 KiB puts, half before the watch starts (etcd sends those as one ~1 MiB catch-up
    batch: one JSON object over many read chunks), half while it runs (a batch each)."""
    async with EtcdClient([etcd_server.url]) as etcd:
        _, revision = await etcd.get_prefix("burst/")
        values = {f"burst/{i:03}": bytes([i]) * 8192 for i in range(100)}
        keys = list(values)
        revisions = await asyncio.gather(*(etcd.put(key, values[key]) for key in keys[:50]))
        batches: list[list[WatchEvent]] = []
        async with contextlib.aclosing(etcd.watch("burst/", revision + 1)) as stream, asyncio.timeout(5):
            batches.append(await anext(stream))  # the watch exists from here on (the first anext sends it)
            revisions += await asyncio.gather(*(etcd.put(key, values[key]) for key in keys[50:]))
            while sum(map(len, batches)) < 100:
                batches.append(await anext(stream))
        events = [event for batch in batches for event in batch]
        assert len(batches) > 1 and max(map(len, batches)) > 1, [len(batch) for batch in batches]
        assert [event.mod_revision for event in events] == sorted(revisions)
        by_revision = dict(zip(revisions, keys))
        assert [event.key for event in events] == [by_revision[r] for r in sorted(revisions)]
        assert all(event.type == "put" and event.value == values[event.key] for event in events)


async def test_watch_from_a_compacted_revision_raises(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url]) as etcd:
        first = await etcd.put("fleet/tm1", "1")
        await etcd.put("fleet/tm1", "2")
        last = await etcd.put("fleet/tm1", "3")
        etcd_server.compact(last)
        with pytest.raises(EtcdCompacted) as caught:
            async with asyncio.timeout(5):
                async for _ in etcd.watch("fleet/", first):
                    pass
        assert caught.value.revision == last
        # What the caller does next: re-read, watch from there.
        kvs, revision = await etcd.get_prefix("fleet/")
        assert [kv.value for kv in kvs] == [b"3"]
        async with contextlib.aclosing(etcd.watch("fleet/", revision + 1)) as stream:
            now = await etcd.put("fleet/tm1", "4")
            assert await collect(stream, 1) == [WatchEvent("put", "fleet/tm1", b"4", now)]


async def test_a_hung_etcd_times_out(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url], timeout=0.5) as etcd:
        await etcd.put("k", "v")
        etcd_server.pause()
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await etcd.get("k")
        assert 0.4 < time.monotonic() - began < 2.0
        etcd_server.resume()
        kv = await etcd.get("k")
        assert kv is not None and kv.value == b"v"


async def test_etcd_killed_fails_pending_request_and_watch_then_returns(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url], timeout=3.0) as etcd:
        revision = await etcd.put("fleet/tm1", "up")
        async with contextlib.aclosing(etcd.watch("fleet/", revision)) as stream:
            assert await collect(stream, 1) == [WatchEvent("put", "fleet/tm1", b"up", revision)]
            etcd_server.pause()  # the put below reaches etcd and waits for an answer
            pending = asyncio.create_task(etcd.put("fleet/tm2", "up"))
            await asyncio.sleep(0.2)
            assert not pending.done()
            began = time.monotonic()
            etcd_server.kill()
            with pytest.raises(EtcdUnavailable, match="outcome unknown"):
                await pending
            assert time.monotonic() - began < 1.0  # the dropped connection, not the 3 s timeout
            with pytest.raises(EtcdUnavailable):
                async with asyncio.timeout(2):
                    await anext(stream)
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            await etcd.get("fleet/tm1")
        etcd_server.start()  # back, same data
        kv = await etcd.get("fleet/tm1")
        assert kv is not None and kv.value == b"up"


async def test_fails_over_to_the_next_endpoint(etcd_server: EtcdServer) -> None:
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    async with EtcdClient([closed, etcd_server.url]) as etcd:
        assert etcd.endpoint == closed
        revision = await etcd.put("k", "v")  # a write: never sent to the closed port, so safe to move on
        assert etcd.endpoint == etcd_server.url
        kv = await etcd.get("k")
        assert kv is not None and kv.mod_revision == revision
    async with EtcdClient([closed, etcd_server.url]) as etcd:
        async with contextlib.aclosing(etcd.watch("k", revision)) as stream:
            assert await collect(stream, 1) == [WatchEvent("put", "k", b"v", revision)]
    etcd_server.kill()
    async with EtcdClient([closed, etcd_server.url], timeout=1.0) as etcd:
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable) as caught:
            await etcd.get("k")
        assert closed in str(caught.value) and etcd_server.url in str(caught.value)
        assert time.monotonic() - began < 1.0
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint took the watch"):
            async for _ in etcd.watch("k", 1):
                pass


async def test_a_hung_endpoint_moves_reads_on_and_fails_writes(etcd_server: EtcdServer) -> None:
    """A member that takes connections but never answers: a read goes on to the next endpoint; a write
    (its outcome unknown) raises, and the next call starts at the next endpoint."""
    with socket.socket() as hung_socket:
        hung_socket.bind(("127.0.0.1", 0))
        hung_socket.listen(16)  # never accepted: the kernel completes the handshake, nothing answers
        hung = f"http://127.0.0.1:{hung_socket.getsockname()[1]}"
        async with EtcdClient([etcd_server.url]) as direct:
            revision = await direct.put("k", "v")
        async with EtcdClient([hung, etcd_server.url], timeout=0.3) as etcd:
            began = time.monotonic()
            kv = await etcd.get("k")
            assert kv is not None and kv.mod_revision == revision
            assert 0.25 < time.monotonic() - began < 1.5
        async with EtcdClient([hung, etcd_server.url], timeout=0.3) as etcd:
            with pytest.raises(EtcdUnavailable, match="outcome unknown"):
                await etcd.put("k", "w")
            assert etcd.endpoint == etcd_server.url
            assert await etcd.put("k", "w") == revision + 1  # the first put never reached etcd


def watch_line(result: dict[str, object]) -> bytes:
    return json.dumps({"result": result}).encode() + b"\n"


async def test_watch_stream_split_into_one_byte_chunks_then_ended() -> None:
    """A scripted gateway: `created`, a progress message, two messages cut into single bytes and sent as
    separate chunks, then the end of the stream."""
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    events = [
        watch_line({"events": [{"kv": {"key": b64("p/a"), "mod_revision": "7", "value": b64("x" * 300)}}]}),
        watch_line({"events": [{"type": "DELETE", "kv": {"key": b64("p/a"), "mod_revision": "8"}},
                               {"kv": {"key": b64("p/b"), "mod_revision": "8", "value": b64("y")}}]}),
    ]
    requests: list[object] = []

    async def watch(request: web.Request) -> web.StreamResponse:
        requests.append(await request.json())
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(watch_line({"header": {"revision": "6"}, "created": True}))
        await response.write(watch_line({"header": {"revision": "6"}}))
        for byte in b"".join(events):
            await response.write(bytes([byte]))
            await asyncio.sleep(0)
        return response

    app = web.Application()
    app.router.add_post("/v3/watch", watch)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with EtcdClient([f"http://127.0.0.1:{port}"]) as etcd:
            stream = etcd.watch("p/", 7)
            assert await anext(stream) == [WatchEvent("put", "p/a", b"x" * 300, 7)]
            assert await anext(stream) == [WatchEvent("delete", "p/a", b"", 8), WatchEvent("put", "p/b", b"y", 8)]
            with pytest.raises(EtcdUnavailable, match="stream ended"):
                await anext(stream)
        assert requests == [{"create_request": {"key": b64("p/"), "range_end": b64("p0"), "start_revision": "7"}}]
    finally:
        await runner.cleanup()
