"""overlay.configlib: lines of fields, typed getters that name field and line, strict unknown keys, and
the shared converters."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.configlib import (
    MAX_NESTING,
    ConfigError,
    KeyLocator,
    load_toml,
    parse_toml,
    to_address,
    to_endpoint,
    to_network,
)

TEXT = """\
# comment
top = 1
[a]
x = 1
"quoted key" = 2
dotted.inner = 3

[[tm]]
name = "one"
[tm.pool]
size = 1

[[tm]]
name = "two"
doc = \"\"\"
fake = 1
[fake]
\"\"\"
after = 4
[[tm.server]]
port = 80
[[tm.server]]
port = 81
"""

LINES = [
    ("top", 2),
    ("a", 3),
    ("a.x", 4),
    ("a.quoted key", 5),
    ("a.dotted.inner", 6),
    ("tm", 8),  # an array as a whole: its first element
    ("tm[0]", 8),
    ("tm[0].name", 9),
    ("tm[0].pool", 10),
    ("tm[0].pool.size", 11),
    ("tm[1]", 13),
    ("tm[1].name", 14),
    ("tm[1].after", 19),  # lines inside the multi-line string are not keys
    ("tm[1].server[0].port", 21),
    ("tm[1].server[1].port", 23),
    ("tm[1].missing", 13),  # a missing key: the table that should hold it
    ("a.list[3]", 3),
    ("nowhere", None),
]


@pytest.mark.parametrize(("field", "line"), LINES)
def test_key_locator(field: str, line: int | None) -> None:
    assert KeyLocator(TEXT).line(field) == line


def test_unknown_table_is_named_as_written_with_the_closest_known() -> None:
    section = parse_toml('[[s]]\nx = 1\n[s.tabel]\ny = 2\n', "t.toml")
    with pytest.raises(ConfigError) as caught:
        next(section.sections("s")).refuse_unknown(("x", "table"))
    assert (caught.value.field, caught.value.line) == ("s[0].tabel", 3)
    assert caught.value.message == "unknown table [s.tabel] (did you mean [s.table]?)"


def test_implicit_parent_tables_have_the_line_that_created_them() -> None:
    """`[desicion.overrides]` creates `desicion`: a typo in it is reported at that header."""
    locator = KeyLocator("x = 1\n[desicion.overrides]\ny = 2\n[a]\nb.c.d = 3\n")
    assert (locator.line("desicion"), locator.line("desicion.overrides"), locator.line("a.b"), locator.line("a.b.c")) == (2, 2, 5, 5)


def test_multiline_string_is_not_a_table() -> None:
    assert KeyLocator(TEXT).line("fake") is None


GETTER_CASES = [
    # description, toml, call(section), field, message fragment
    ("missing required", "[s]\n", lambda s: s.str("name"), "s.name", "is required"),
    ("string expected", "[s]\nname = 1\n", lambda s: s.str("name"), "s.name", "must be a string"),
    ("choice", '[s]\nmode = "x"\n', lambda s: s.str("mode", choices=("a", "b")), "s.mode", "must be one of a, b"),
    ("bool is not an int", "[s]\nn = true\n", lambda s: s.int("n"), "s.n", "must be an integer"),
    ("int minimum", "[s]\nn = -1\n", lambda s: s.int("n", minimum=0), "s.n", "must be >= 0"),
    ("int maximum", "[s]\nn = 9\n", lambda s: s.int("n", maximum=8), "s.n", "must be <= 8"),
    ("float minimum", "[s]\nf = 0.0\n", lambda s: s.float("f", minimum=0.5), "s.f", "must be >= 0.5"),
    ("nan is not a number", "[s]\nf = nan\n", lambda s: s.float("f"), "s.f", "must be a finite number, not nan"),
    ("inf is not a number", "[s]\nf = inf\n", lambda s: s.float("f", minimum=0.5), "s.f", "must be a finite number, not inf"),
    ("bool expected", '[s]\nb = "yes"\n', lambda s: s.bool("b"), "s.b", "must be true or false"),
    ("list expected", "[s]\nl = 1\n", lambda s: s.list("l"), "s.l", "must be a list"),
    ("each element converted", '[s]\nl = ["192.0.2.0/24", "nope"]\n', lambda s: s.each("l", to_network), "s.l[1]", "not a valid"),
    ("table expected", "[s]\nt = 1\n", lambda s: s.section("t"), "s.t", "must be a table"),
    ("array of tables expected", "[s]\nt = [1]\n", lambda s: list(s.sections("t")), "s.t", "array of tables"),
    ("unknown key", "[s]\nknown = 1\ntypo = 2\n", lambda s: (s.int("known"), s.done()), "s.typo", "unknown key"),
    ("unknown key, closest known named", "[s]\nknown = 1\nknwon = 2\n", lambda s: (s.int("known"), s.done()), "s.knwon",
     "unknown key (did you mean known?)"),
    ("required key given with a typo", "[s]\nnmae = 1\n", lambda s: s.str("name"), "s.nmae", "unknown key (did you mean name?)"),
]


@pytest.mark.parametrize(("text", "call", "field", "fragment"), [pytest.param(*c[1:], id=c[0]) for c in GETTER_CASES])
def test_getters_name_field_and_line(text: str, call, field: str, fragment: str) -> None:
    section = parse_toml(text, "t.toml").section("s")
    with pytest.raises(ConfigError) as caught:
        call(section)
    error = caught.value
    expected_line = next((n for n, line in enumerate(text.splitlines(), 1) if line.startswith(field.split(".")[1].split("[")[0] + " ")), 1)
    assert error.field == field and fragment in error.message
    assert error.line == expected_line


def test_defaults_and_values() -> None:
    section = parse_toml('[s]\nname = "x"\nn = 3\nf = 2\nb = false\n').section("s")
    assert (section.str("name"), section.int("n"), section.float("f"), section.bool("b")) == ("x", 3, 2.0, False)
    assert (section.str("other", "d"), section.int("m", None)) == ("d", None)
    section.done()


def test_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_toml('a = 1\nb = "unterminated\n', "bad.toml")
    assert caught.value.line == 2 and "invalid TOML" in caught.value.message


ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x03\x00\x3e\x00\x01\x00\x00\x00\x10\x6b\x00\x00"


# {description, file bytes, what the message must say, line}
UNREADABLE = [
    ("Latin-1 text", b'[node]\nname = "d\xe9p\xf4t"\n', "not UTF-8 text (byte 0xe9 at offset 16)", 2),
    ("a UTF-16 byte-order mark", b"\xff\xfe[\x00n\x00", "not UTF-8 text (byte 0xff at offset 0)", 1),
    ("random bytes", bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)", 2),  # 0x0a ends line 1
    ("an ELF header (valid UTF-8)", ELF, "a NUL byte at offset 7: a binary file, not text", 1),
]


@pytest.mark.parametrize(("data", "fragment", "line"), [pytest.param(*c[1:], id=c[0]) for c in UNREADABLE])
def test_a_file_that_is_not_text_is_a_clean_config_error(tmp_path, data: bytes, fragment: str, line: int) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        load_toml(path)
    assert (caught.value.source, caught.value.line) == (str(path), line)
    assert fragment in caught.value.message


# {description, text, field, line}: nesting beyond MAX_NESTING, written every way TOML allows. Brackets
# thousands deep stop tomllib itself (it recurses per level) before any field exists: only the line is known.
TOO_DEEP = [
    ("arrays 10,000 deep", "x = 1\na = " + "[" * 10000 + "]" * 10000 + "\n", "", 2),
    ("inline tables 10,000 deep", 'x = "[[[{{{"  # [[[\na = ' + "{ b = " * 10000 + "1" + " }" * 10000 + "\n", "", 2),
    ("inline tables 40 deep", "a = " + "{ b = " * 40 + "1" + " }" * 40 + "\n", "a" + ".b" * 32, 1),
    ("a table header of 10,000 names", "x = 1\n\n[" + ".".join(["t"] * 10000) + "]\ny = 1\n", ".".join(["t"] * 33), 3),
    ("a dotted key of 10,000 names", "[s]\n" + ".".join(["k"] * 10000) + " = 1\n", "s" + ".k" * 32, 2),
    ("one level too many", "a = " + "[" * 33 + "]" * 33 + "\n", "a" + "[0]" * 32, 1),
]


@pytest.mark.parametrize(("text", "field", "line"), [pytest.param(*c[1:], id=c[0]) for c in TOO_DEEP])
def test_nesting_is_bounded_with_a_short_error(text: str, field: str, line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_toml(text, "deep.toml")
    assert (caught.value.field, caught.value.line) == (field, line)
    assert caught.value.message == f"nested deeper than {MAX_NESTING} levels of tables and arrays"
    assert len(str(caught.value)) < 300


def test_nesting_up_to_the_bound_is_accepted() -> None:
    value = parse_toml("a = " + "[" * 32 + "]" * 32 + "\n").list("a")
    for _ in range(31):
        value = value[0]
    assert value == []


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_toml(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.1", (ipaddress.ip_address("192.0.2.1"), 4754)),
        ("192.0.2.1:5000", (ipaddress.ip_address("192.0.2.1"), 5000)),
        ("2001:db8::1", (ipaddress.ip_address("2001:db8::1"), 4754)),
        ("[2001:db8::1]:5000", (ipaddress.ip_address("2001:db8::1"), 5000)),
    ],
)
def test_to_endpoint(value: str, expected: object) -> None:
    assert to_endpoint(value, 4754) == expected


@pytest.mark.parametrize(
    ("convert", "value", "fragment"),
    [
        (lambda v: to_endpoint(v, 1), "192.0.2.1:0", "port must be 1-65535"),
        (lambda v: to_endpoint(v, 1), "[2001:db8::1", "missing ']'"),
        (lambda v: to_endpoint(v, 1), "[2001:db8::1]5000", "expected ':PORT'"),
        (lambda v: to_endpoint(v, 1), 4754, "must be 'ADDRESS'"),
        (to_network, "192.0.2.1/24", "host bits set (did you mean 192.0.2.0/24?)"),
        (to_network, "192.0.2.0/33", "not a valid"),
        (to_address, "192.0.2.256", "not a valid"),
    ],
)
def test_converter_refusals(convert, value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        convert(value)
    assert fragment in str(caught.value)
