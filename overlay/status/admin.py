"""The admin token: where it comes from and how a request proves it knows it."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "OVERLAY_ADMIN_TOKEN"

# Admin actions in the URL -> the TM state they set.
TM_ACTIONS: dict[str, str] = {"drain": "draining", "enable": "enabled", "disable": "disabled"}


class AdminTokenError(ValueError):
    """A token source that is configured but unusable (missing or empty file)."""


def load_admin_token(path: str | None) -> str | None:
    """The admin token from `path` if given, else from $OVERLAY_ADMIN_TOKEN; None when neither is set.

    An explicitly configured file wins over the environment, so a stray variable in an operator's shell
    never changes which token a distributor accepts. A configured file that is missing or empty is an
    error, not "no admin API": silently disabling admin would make a drain fail at the worst moment.
    """
    if path is not None:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise AdminTokenError(f"admin token file {path}: {error.strerror or error}") from error
        except UnicodeDecodeError as error:
            raise AdminTokenError(f"admin token file {path}: not UTF-8 text (byte at offset {error.start})") from None
        if not token:
            raise AdminTokenError(f"admin token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_matches(authorization: str | None, token: str) -> bool:
    """True when an `Authorization` header carries `Bearer <token>`; constant time in the token's content."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())
