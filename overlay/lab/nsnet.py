"""Talk to services inside a lab namespace from this process, without spawning `ip netns exec`.

setns(2) with CLONE_NEWNET switches only the calling thread, and a socket stays in the namespace it was
created in. So `in_namespace` runs a function in a fresh thread that first joins the namespace; the
thread ends with the call and this process's own threads never leave the host's namespace. It costs a
thread start instead of a Python interpreter start (~100 ms), which matters when polling health.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from overlay.lab.netns import NETNS_DIR

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_namespace(namespace: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` run in a thread inside network namespace `namespace`; its result or its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
            finally:
                os.close(fd)
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the caller's thread, re-raised there
            outcome["error"] = error

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _request(method: str, url: str, body: bytes | None, timeout: float, headers: dict[str, str]) -> tuple[int, bytes]:
    parts = urlsplit(url)
    port = parts.port or 80
    connection = http.client.HTTPConnection(parts.hostname or "", port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_request(
    namespace: str,
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request made from inside `namespace`: (status, body). Network errors raise OSError."""
    return in_namespace(namespace, _request, method, url, body, timeout, headers or {})


def http_json(namespace: str, url: str, *, timeout: float = 5.0) -> Any:
    """GET `url` from inside `namespace` and parse the JSON answer; non-200 raises OSError with the body."""
    status, body = http_request(namespace, url, timeout=timeout)
    if status != 200:
        raise OSError(f"GET {url} in {namespace}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)
