"""A small asyncio etcd v3 client over aiohttp, speaking etcd's JSON gateway (issue 11: several distributors
share one fleet view — TM set, weights, admin states, health — in etcd).

Why the JSON gateway and not gRPC: etcd ≥ 3.4 serves `POST /v3/...` (grpc-gateway) on its client port, so
aiohttp — already the project's HTTP stack — is enough, and we carry no grpcio/aetcd dependency (large
wheels, their own event-loop integration). The price is the gateway's JSON dialect, handled here once:

- keys and values are base64; int64 fields (revisions, lease IDs, TTLs) are JSON *strings*;
- zero, false and empty fields are omitted: a PUT event has no `type`, a failed txn has no `succeeded`,
  a delete of nothing has no `deleted`, an empty value no `value`, an expired lease's keepalive no `TTL`;
- errors come back as a non-200 status with `{"code": <gRPC code>, "message": ...}` (3.4 also `"error"`);
- a watch is one long `POST /v3/watch` whose response is a stream of `{"result": {...}}` objects, one per
  line; a compacted start revision arrives as `canceled` + `compact_revision` on a stream that stays open.

Failover, and what is retried: endpoints (one per etcd member) are tried in turn starting with the last one
that answered. A request that never reached a member (connection refused, connect timeout) always moves on
to the next. One that may have reached it (timeout or connection lost after sending, "no leader") moves on
only for reads and idempotent lease calls; a put, delete, txn or lease grant raises `EtcdUnavailable`
instead, since its outcome is unknown and retrying a compare-and-swap elsewhere could report a false
failure. Either way the next call starts at the next member. Every request is bounded by `timeout` per
endpoint tried; a watch only by its setup (connect and the `created` reply) — then it runs until the stream
breaks or the caller cancels it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import aiohttp

# gRPC status codes that etcd returns in the gateway's error bodies.
_GRPC_DEADLINE_EXCEEDED = 4
_GRPC_NOT_FOUND = 5
_GRPC_UNAVAILABLE = 14

# Failures that prove the request never left this machine: safe to send to the next member. aiohttp ≥ 3.10
# tells a connect timeout apart (ConnectionTimeoutError); older versions see it as an ordinary timeout.
_NOT_SENT: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,) + tuple(
    t for t in (getattr(aiohttp, "ConnectionTimeoutError", None),) if isinstance(t, type))


class EtcdError(Exception):
    """etcd answered with an error (`code` is the gRPC status code when it sent one)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered, the connection was lost, a request timed out, or etcd has no leader."""


class EtcdCompacted(EtcdError):
    """A watch's start revision is older than etcd's compaction: re-read with `get_prefix` and watch again
    from its revision + 1. `revision` is the compaction revision etcd reported."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted up to revision {revision}")
        self.revision = revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for a delete
    mod_revision: int


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix": the prefix with its last byte incremented
    (trailing 0xff bytes dropped first); b"\\0" — "to the end of the keyspace" — when nothing is left."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _key(data: str | None) -> str:
    # surrogateescape: a key some other writer stored as non-UTF-8 bytes still round-trips through str.
    return _unb64(data).decode("utf-8", "surrogateescape")


def _int(obj: dict[str, Any], field: str) -> int:
    """An int64 field: a JSON string, absent when zero."""
    return int(obj.get(field, 0))


def _keyvalue(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(key=_key(kv.get("key")), value=_unb64(kv.get("value")), mod_revision=_int(kv, "mod_revision"),
                    create_revision=_int(kv, "create_revision"), version=_int(kv, "version"),
                    lease=_int(kv, "lease"))


def _prefix_range(prefix: str) -> dict[str, str]:
    raw = prefix.encode()
    # The empty prefix is the whole keyspace: key "\0", range_end "\0".
    return {"key": _b64(raw or b"\x00"), "range_end": _b64(prefix_range_end(raw))}


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error(status: int, body: Any) -> EtcdError:
    """The exception for a gateway error body (or an unparseable answer). Unary calls answer
    `{"code": N, "message": ...}` (3.4 adds `"error"`, the same text); streaming ones may send
    `{"error": {"grpc_code": N, "message": ...}}` instead."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("error") or body)
        raw = body.get("code", body.get("grpc_code"))
        code = int(raw) if isinstance(raw, int | str) and str(raw).isdigit() else None
    else:
        message, code = f"HTTP {status}: {str(body)[:200]}", None
    if code in (_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED):
        return EtcdUnavailable(message, code)
    return EtcdError(message, code)


class EtcdClient:
    """An etcd v3 client over the JSON gateway. One aiohttp session, created on first use; close it with
    `close()` or `async with EtcdClient(...) as etcd:`."""

    def __init__(self, endpoints: list[str], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.timeout = timeout
        self._current = 0  # index of the endpoint to try first: the last one that answered
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def endpoint(self) -> str:
        """The endpoint the next request tries first."""
        return self.endpoints[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _skip(self, index: int) -> None:
        """The endpoint at index failed: the next call starts at the one after it."""
        if self._current == index:
            self._current = (index + 1) % len(self.endpoints)

    async def _post(self, path: str, body: dict[str, Any], *, retry_sent: bool) -> dict[str, Any]:
        """POST body to path on the first endpoint that answers; the decoded JSON answer. retry_sent: the
        request is safe to repeat on another member after it may have reached one (reads, idempotent calls)."""
        http = self._http()
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.timeout / 2)
        failures: list[str] = []
        for index in self._order():
            url = self.endpoints[index] + path
            try:
                async with http.post(url, json=body, timeout=timeout) as response:
                    text = await response.text()
                    status = response.status
            except _NOT_SENT as exc:
                failures.append(f"{url}: {exc!r}")
                self._skip(index)
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._skip(index)
                failures.append(f"{url}: {exc!r}")
                if retry_sent:
                    continue
                raise EtcdUnavailable(f"etcd request outcome unknown: {failures[-1]}") from exc
            answer = _decode(text)
            if status == 200 and isinstance(answer, dict) and "error" not in answer:
                self._current = index
                return answer
            error = _error(status, answer)
            if isinstance(error, EtcdUnavailable):
                self._skip(index)
                failures.append(f"{url}: {error}")
                if retry_sent:
                    continue
            else:
                self._current = index  # the member answered; the request itself was refused
            raise error
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(failures))

    # --- key-value ---------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        answer = await self._post("/v3/kv/range", {"key": _b64(key)}, retry_sent=True)
        kvs = answer.get("kvs") or []
        return _keyvalue(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under prefix, sorted by key, and the revision they were read at (watch from it + 1 to
        miss nothing)."""
        answer = await self._post("/v3/kv/range", _prefix_range(prefix), retry_sent=True)
        kvs = sorted((_keyvalue(kv) for kv in answer.get("kvs") or []), key=lambda kv: kv.key)
        return kvs, _int(answer.get("header", {}), "revision")

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        """Store value at key (attached to lease when non-zero); the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._post("/v3/kv/put", body, retry_sent=False)
        return _int(answer.get("header", {}), "revision")

    async def delete(self, key: str) -> int:
        """Delete key; how many keys were deleted (0 or 1)."""
        answer = await self._post("/v3/kv/deleterange", {"key": _b64(key)}, retry_sent=False)
        return _int(answer, "deleted")

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under prefix; how many were deleted."""
        answer = await self._post("/v3/kv/deleterange", _prefix_range(prefix), retry_sent=False)
        return _int(answer, "deleted")

    async def txn_put_if(self, key: str, value: bytes | str, expected_mod_revision: int, lease: int = 0) -> bool:
        """Compare-and-swap: store value only if key's mod_revision is still expected_mod_revision (0: the key
        must not exist). False when another writer got there first."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        body = {
            "compare": [{"target": "MOD", "key": _b64(key), "mod_revision": str(expected_mod_revision),
                         "result": "EQUAL"}],
            "success": [{"request_put": put}],
        }
        answer = await self._post("/v3/kv/txn", body, retry_sent=False)
        return bool(answer.get("succeeded", False))

    # --- leases ------------------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ttl seconds; its ID. Keys put with it vanish when it expires or is revoked."""
        # LeaseGrantResponse has an `error` string of its own; _post raises on it like on any error body.
        answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)}, retry_sent=False)
        return _int(answer, "ID")

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh the lease; its remaining TTL in seconds, 0 when it has expired or was revoked."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)}, retry_sent=True)
        # A streaming endpoint: one {"result": ...} (or {"error": ...}, handled by _post) per request.
        return _int(answer.get("result", {}), "TTL")

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys. A lease that is already gone is not an error."""
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease_id)}, retry_sent=True)
        except EtcdError as exc:
            if exc.code != _GRPC_NOT_FOUND:
                raise

    # --- watch -------------------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Every change under prefix from start_revision on (which may be in the past), in revision order,
        one list per batch etcd sends. Runs until cancelled; raises EtcdCompacted when start_revision was
        compacted away, EtcdUnavailable when the stream ends or the connection drops (watch again from the
        last mod_revision + 1). Close it when leaving early: `async with contextlib.aclosing(...)`."""
        body = {"create_request": {**_prefix_range(prefix), "start_revision": str(start_revision)}}
        response, index = await self._open_watch(body)
        try:
            buffer = b""
            try:
                async for chunk in response.content.iter_any():
                    # A JSON object may be split over chunks, or several share one: one message per line.
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        events = self._watch_message(line)
                        if events:
                            yield events
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._skip(index)
                raise EtcdUnavailable(f"etcd watch connection lost: {exc!r}") from exc
            # A last message without its newline still counts; then the stream has ended all the same.
            events = self._watch_message(buffer)
            if events:
                yield events
            self._skip(index)
            raise EtcdUnavailable("etcd watch stream ended")
        finally:
            response.close()

    async def _open_watch(self, body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, int]:
        """Start the watch on the first endpoint that takes it and read up to etcd's `created` reply, all
        within `timeout` per endpoint; the open response and its endpoint's index. Creating a watch changes nothing: always retried."""
        http = self._http()
        # No total or read timeout: the stream lives as long as the watch. Setup is bounded below instead.
        stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout / 2)
        failures: list[str] = []
        for index in self._order():
            url = self.endpoints[index] + "/v3/watch"
            response: aiohttp.ClientResponse | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    response = await http.post(url, json=body, timeout=stream_timeout)
                    if response.status != 200:
                        raise _error(response.status, _decode(await response.text()))
                    line = await response.content.readline()
                self._watch_message(line, expect_created=True)
            except (aiohttp.ClientError, TimeoutError, EtcdUnavailable) as exc:
                if response is not None:
                    response.close()
                self._skip(index)
                failures.append(f"{url}: {exc!r}")
                continue
            except BaseException:
                if response is not None:
                    response.close()
                raise
            self._current = index
            return response, index
        raise EtcdUnavailable("no etcd endpoint took the watch: " + "; ".join(failures))

    @staticmethod
    def _watch_message(line: bytes, expect_created: bool = False) -> list[WatchEvent]:
        """The events in one line of the watch stream ([] for `created` and progress messages)."""
        line = line.strip()
        if not line:
            if expect_created:
                raise EtcdUnavailable("etcd watch stream ended before the watch was created")
            return []
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise EtcdError(f"etcd watch: not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict) or "result" not in message:
            raise _error(200, message)
        result = message["result"]
        compact_revision = _int(result, "compact_revision")
        if compact_revision:
            raise EtcdCompacted(compact_revision)
        if result.get("canceled"):
            raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason', 'no reason given')}")
        if expect_created and not result.get("created"):
            raise EtcdError(f"etcd watch: expected the created reply, got {line[:200]!r}")
        events = []
        for event in result.get("events") or []:
            kv = event.get("kv", {})
            events.append(WatchEvent(type="delete" if event.get("type") == "DELETE" else "put", key=_key(kv.get("key")),
                                     value=_unb64(kv.get("value")), mod_revision=_int(kv, "mod_revision")))
        return events
