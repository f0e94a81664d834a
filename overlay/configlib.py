"""Strict TOML config reading shared by every role: typed fields, unknown keys refused, errors with lines.

tomllib gives values but not positions, so `KeyLocator` scans the text once and remembers on which line
each dotted key was written; every `ConfigError` then names the field *and* the line a user must edit.
`Section` wraps one table of the parsed document and hands out typed values; calling `done()` refuses the
keys nobody asked for (a typo must never be silently ignored in a network config).
"""

from __future__ import annotations

import builtins
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(ValueError):
    """A config value a node refuses to run with. `field` is the dotted path, `line` 1-based or None."""

    def __init__(self, field: str, message: str, line: int | None = None, source: str | None = None):
        self.field = field
        self.message = message
        self.line = line
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """The form `overlay check --json` prints (docs/config.md, "Checking configs")."""
        return {"file": self.source, "line": self.line, "field": self.field or None, "message": self.message}


# The deepest tables and arrays accepted; a node config needs a handful (`[[tm.service]]`, address-entry
# tables in a list). Refused before anything recurses over the data, and with a short error instead of a
# RecursionError from tomllib, which recurses once per array level.
MAX_NESTING = 32
_TOO_DEEP = f"nested deeper than {MAX_NESTING} levels of tables and arrays"

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-.]+(?:\s*\.\s*(?:"[^"]*"|[A-Za-z0-9_\-]+))*)\s*=""")


def _split_dotted(key: str) -> list[str]:
    parts: list[str] = []
    for match in re.finditer(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_\-]+)', key):
        parts.append(next(group for group in match.groups() if group is not None))
    return parts


class KeyLocator:
    """Maps dotted field paths (`tm[1].weight`, `sets.virtual`) to the line that defines them."""

    def __init__(self, text: str):
        self._lines: dict[str, int] = {}
        array_counts: dict[str, int] = {}
        table = ""
        in_multiline = False
        for number, raw in enumerate(text.splitlines(), start=1):
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            if in_multiline:
                continue
            header = _HEADER.match(raw)
            if header:
                name = ".".join(_split_dotted(header.group(2)))
                if header.group(1) == "[[":
                    index = array_counts.get(name, -1) + 1
                    array_counts[name] = index
                    # Deeper array tables restart their counts under each new parent element.
                    for other in [k for k in array_counts if k.startswith(name + ".")]:
                        del array_counts[other]
                    table = f"{self._resolve(name, array_counts)}"
                    # The bare array name (`tm`) points at its first element, for errors about the whole array.
                    self._lines.setdefault(table.rsplit("[", 1)[0], number)
                else:
                    table = self._resolve(name, array_counts)
                self._define(table, number)
                continue
            key = _KEY.match(raw)
            if key:
                path = ".".join(_split_dotted(key.group(1)))
                self._define(f"{table}.{path}" if table else path, number)

    def _define(self, path: str, number: int) -> None:
        """`path` and the tables it implicitly creates (`desicion` of `[desicion.overrides]`): a typo in a
        parent's name must be reported at the line that wrote it."""
        parts = path.split(".")
        # Capped at the nesting accepted: a 10,000-name header must not cost 10,000 prefixes.
        for end in range(1, min(len(parts), MAX_NESTING + 1) + 1):
            self._lines.setdefault(".".join(parts[:end]), number)
        self._lines.setdefault(path, number)

    @staticmethod
    def _resolve(name: str, array_counts: dict[str, int]) -> str:
        """Turn `tm.pool` into `tm[2].pool` using the index of the enclosing array tables."""
        parts = name.split(".")
        resolved: list[str] = []
        for i, part in enumerate(parts):
            prefix = ".".join(parts[: i + 1])
            resolved.append(f"{part}[{array_counts[prefix]}]" if prefix in array_counts else part)
        return ".".join(resolved)

    def line(self, field: str) -> int | None:
        """The line of `field`, or of the nearest enclosing key or table that has one."""
        candidate = re.sub(r"\[\d+\]$", "", field) if field not in self._lines else field
        while candidate:
            if candidate in self._lines:
                return self._lines[candidate]
            stripped = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", candidate)
            if stripped == candidate:
                break
            candidate = stripped
        return self._lines.get(field)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


# A missing required key is blamed on an unknown key only when the two are this close (difflib ratio):
# `sed`/`seed` scores 0.86 and `nmae`/`name` 0.75, two real keys such as `name`/`mode` 0.5.
_TYPO_CUTOFF = 0.7


def _unknown(path: str, key: str, value: Any, known: Collection[str]) -> str:
    """`unknown table [sest] (did you mean [sets]?)`, `unknown key (did you mean seed?)`; a table is named
    as its header is written (`[tm.conntrak]`, without the array indices of the field path)."""
    closest = difflib.get_close_matches(key, sorted(known), 1)
    header = re.sub(r"\[\d+\]", "", f"{path}." if path else "")
    if isinstance(value, dict):
        brackets = "[{}]"
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        brackets = "[[{}]]"
    else:
        return f"unknown key (did you mean {closest[0]}?)" if closest else "unknown key"
    what = "unknown table " + brackets.format(header + key)
    return f"{what} (did you mean {brackets.format(header + closest[0])}?)" if closest else what


class Section:
    """One TOML table: typed getters that raise `ConfigError` naming field and line."""

    def __init__(self, data: dict[builtins.str, Any], path: builtins.str, locator: KeyLocator, source: builtins.str | None):
        self._data = data
        self._path = path
        self._locator = locator
        self._source = source
        self._seen: set[builtins.str] = set()

    # -- plumbing ---------------------------------------------------------------------------------
    def field(self, key: builtins.str) -> builtins.str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: builtins.str, message: builtins.str) -> ConfigError:
        field = self.field(key) if key else self._path
        return ConfigError(field, message, self._locator.line(field), self._source)

    def has(self, key: builtins.str) -> builtins.bool:
        return key in self._data

    def keys(self) -> builtins.list[builtins.str]:
        return list(self._data)

    def _get(self, key: builtins.str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is REQUIRED:
            # `sed = ...` for `seed`: name the typo, not its consequence.
            typo = difflib.get_close_matches(key, [k for k in self._data if k not in self._seen], 1, _TYPO_CUTOFF)
            if typo:
                raise self.error(typo[0], f"unknown key (did you mean {key}?)")
            raise self.error(key, "is required")
        return default

    def done(self) -> None:
        """Refuse keys that no getter asked for: a typo must not silently change nothing."""
        self.refuse_unknown(self._seen)

    def refuse_unknown(self, known: Collection[builtins.str]) -> None:
        """Refuse every key outside `known`. Called before reading a table whose keys are known up front,
        so that a typo'd table (`[sest]`) is named instead of the errors its absence causes."""
        for key, value in self._data.items():
            if key not in known:
                raise self.error(key, _unknown(self._path, key, value, known))

    # -- typed getters ----------------------------------------------------------------------------
    def str(self, key: builtins.str, default: Any = REQUIRED, choices: tuple[builtins.str, ...] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {type(value).__name__}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def int(self, key: builtins.str, default: Any = REQUIRED, minimum: builtins.int | None = None, maximum: builtins.int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}; got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum}; got {value}")
        return value

    def float(self, key: builtins.str, default: Any = REQUIRED, minimum: builtins.float | None = None) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, not {type(value).__name__}")
        # TOML has nan and inf; both pass every `<` check, so they are refused here, at their own line.
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, not {value}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}; got {value}")
        return float(value)

    def bool(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {type(value).__name__}")
        return value

    def list(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {type(value).__name__}")
        return value

    def each(self, key: builtins.str, convert: Callable[[Any, builtins.str], T], default: Any = ()) -> builtins.list[T]:
        """Convert every list element; `convert(value, field)` raises ValueError with a message."""
        values = self.list(key, default=list(default) if default is not REQUIRED else REQUIRED)
        converted: builtins.list[T] = []
        for index, value in enumerate(values):
            field = f"{self.field(key)}[{index}]"
            try:
                converted.append(convert(value, field))
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError(field, str(exc), self._locator.line(field), self._source) from None
        return converted

    def convert(self, key: builtins.str, convert: Callable[[Any], T], default: Any = REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default and key not in self._data:
            return value
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def section(self, key: builtins.str, required: builtins.bool = False) -> Section:
        value = self._get(key, REQUIRED if required else {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, not {type(value).__name__}")
        return Section(value, self.field(key), self._locator, self._source)

    def sections(self, key: builtins.str, required: builtins.bool = False) -> Iterator[Section]:
        """An array of tables (`[[tm]]`), each as a Section with an indexed path (`tm[0]`)."""
        value = self._get(key, REQUIRED if required else [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error(key, "must be an array of tables ([[" + self.field(key) + "]])")
        for index, item in enumerate(value):
            yield Section(item, f"{self.field(key)}[{index}]", self._locator, self._source)


def parse_toml(text: str, source: str | None = None) -> Section:
    """Parse TOML text into the root `Section`; syntax errors become `ConfigError` with their line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError("", f"invalid TOML: {exc}", int(match.group(1)) if match else None, source) from None
    except RecursionError:
        # tomllib recurses once per array or inline-table level: only far deeper than MAX_NESTING.
        raise ConfigError("", _TOO_DEEP, _deep_bracket_line(text), source) from None
    locator = KeyLocator(text)
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigError(deep, _TOO_DEEP, locator.line(deep), source)
    return Section(data, "", locator, source)


def _too_deep(data: dict[str, Any]) -> str | None:
    """The field path of the first table or array nested deeper than MAX_NESTING, or None."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_NESTING:
            return path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        children = [(child, _child_path(path, key), depth + 1) for key, child in items if isinstance(child, (dict, list))]
        stack.extend(reversed(children))  # the first child on top: the first deep field in file order
    return None


def _child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


# Brackets outside strings and comments, for the line where arrays and inline tables got too deep.
_BRACKETS = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}]')


def _deep_bracket_line(text: str) -> int | None:
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif token in "]}":
            depth -= 1
    return None


def read_text(path: Path, what: str = "config") -> str:
    """A config file's text. Unreadable, non-UTF-8 and binary files are `ConfigError`s naming the file
    and where it stops being text: an operator who passes the wrong file must not get a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {what}: {exc.strerror}", None, str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        raise ConfigError("", message, data.count(b"\n", 0, exc.start) + 1, str(path)) from None
    nul = data.find(b"\0")
    if nul >= 0:
        message = f"a NUL byte at offset {nul}: a binary file, not text"
        raise ConfigError("", message, data.count(b"\n", 0, nul) + 1, str(path))
    return text


def load_toml(path: str | Path) -> Section:
    path = Path(path)
    return parse_toml(read_text(path), str(path))


# -- value converters shared by all roles ------------------------------------------------------------

def to_network(value: Any, field: str = "") -> IPNetwork:
    """A prefix such as `203.0.113.0/24` or `2001:db8::/64`; a bare address is a host prefix."""
    if not isinstance(value, str):
        raise ValueError(f"must be a prefix string, not {type(value).__name__}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(f"{value!r} has host bits set (did you mean {ipaddress.ip_network(value, strict=False)}?)")
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 prefix") from None


def to_address(value: Any, field: str = "") -> IPAddress:
    if not isinstance(value, str):
        raise ValueError(f"must be an address string, not {type(value).__name__}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 address") from None


def to_endpoint(value: Any, default_port: int) -> tuple[IPAddress, int]:
    """`192.0.2.1`, `192.0.2.1:4754`, `[2001:db8::1]:4754` or `2001:db8::1` → (address, port)."""
    if not isinstance(value, str):
        raise ValueError(f"must be 'ADDRESS' or 'ADDRESS:PORT', not {type(value).__name__}")
    host, port = value, default_port
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"{value!r}: missing ']'")
        host = value[1:end]
        rest = value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], value)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, value)
    address = to_address(host)
    return address, port


def refuse_other_family(section: Section, key: str, peer: IPAddress, own: IPAddress) -> None:
    """A node's tunnels run over UDP sockets bound to its `underlay.address`: a peer of the other address
    family is unreachable from them (and offline tools would build packets no socket can send)."""
    if peer.version != own.version:
        raise section.error(
            key, f"{peer} is IPv{peer.version}, but underlay.address {own} is IPv{own.version}: a node's tunnels use one address family"
        )


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(text)
