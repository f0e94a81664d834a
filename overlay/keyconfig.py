"""Keys in node configs: the `[auth]` table and the `public_key` / `public_keys` of each peer entry.

    [auth]
    mode = "authenticate"            # or "encrypt" (internet), "off" (the lab on one host)
    private_key_file = "dist1.key"   # or private_key_files = ["new.key", "old.key"] during a rotation

    [[tm]]                           # (and [[edge]], and a TM's [[distributor]])
    public_key = "base64..."         # or public_keys = ["new", "old"] during the peer's rotation

Private keys live in files (`overlay keygen` writes them 0600); a file that others may read is refused, as
ssh does, because anyone who can read it can join the overlay as that node. A config without `[auth]`
runs unauthenticated (`mode = "off"`), which `/status` and `overlay check` say loudly.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from overlay import auth
from overlay.configlib import Section


def parse_auth_section(section: Section, base: Path | None) -> tuple[str, tuple[bytes, ...]]:
    """(mode, private keys: the first seals) of `[auth]`; ("off", ()) when the table is absent."""
    if not section.keys():
        section.done()
        return "off", ()
    mode = section.str("mode", "authenticate", choices=auth.MODES)
    if section.has("private_key_file") and section.has("private_key_files"):
        raise section.error("private_key_files", "give either private_key_file or private_key_files, not both")
    if section.has("private_key_files"):
        key = "private_key_files"
        paths = section.each(key, lambda value, field: _string(value))
        fields = [f"{key}[{index}]" for index in range(len(paths))]
    else:
        key = "private_key_file"
        paths = [section.str(key)] if section.has(key) else []
        fields = [key]
    keys = [_read_private_key(section, field, path, base) for field, path in zip(fields, paths)]
    if mode != "off" and not keys:
        raise section.error(key, "authentication needs this node's private key (overlay keygen)")
    section.done()
    return mode, tuple(keys)


def parse_public_keys(section: Section, required: bool) -> tuple[bytes, ...]:
    """A peer entry's `public_key` or `public_keys` (the first is sealed to); required with auth on."""
    if section.has("public_key") and section.has("public_keys"):
        raise section.error("public_keys", "give either public_key or public_keys, not both")
    if section.has("public_keys"):
        keys = tuple(section.each("public_keys", lambda value, field: auth.decode_key(_string(value))))
        if not keys:
            raise section.error("public_keys", "needs at least one key")
        return keys
    if section.has("public_key"):
        return (section.convert("public_key", lambda value: auth.decode_key(_string(value))),)
    if required:
        raise section.error("public_key", "is required with [auth] on: this peer's key (overlay keygen prints it)")
    return ()


def _read_private_key(section: Section, field: str, path_text: str, base: Path | None) -> bytes:
    path = Path(path_text)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise section.error(field, f"cannot read {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise section.error(field, f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): chmod 600 it")
    try:
        return auth.decode_key(text)
    except ValueError as error:
        raise section.error(field, f"{path}: {error}") from None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return value
