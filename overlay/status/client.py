"""A small blocking HTTP client for the status service, for command-line tools (stdlib only, no event loop)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 5.0


class StatusClientError(Exception):
    """The service could not be reached, or answered something that is not JSON."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any] | None  # None when the body was not a JSON object (e.g. aiohttp's plain 404)


def base_url(url: str) -> str:
    """Accept `host:port` as well as a full URL; never a trailing slash."""
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/")


def request(url: str, method: str = "GET", token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """One request; HTTP error statuses are replies, not exceptions (a 503 /healthz or a 401 is data)."""
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StatusClientError(f"cannot reach {url}: {reason}") from error
    try:
        body = json.loads(raw)
    except ValueError:
        return Reply(status, None)
    return Reply(status, body if isinstance(body, dict) else None)


def get_json(url: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    reply = request(url, timeout=timeout)
    if reply.body is None:
        raise StatusClientError(f"{url}: HTTP {reply.status}, not a JSON object")
    return reply.body
