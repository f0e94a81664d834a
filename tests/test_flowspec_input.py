"""`overlay explain`'s input (issue 12): every flow spec mistake is a clean usage error that names the
token and the allowed range, never a traceback; hex is recognised as hex whatever its length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.cli import main
from overlay.flowspec import FlowSpecError, build_packet, looks_like_hex, parse_hex

CONFIG = str(Path(__file__).resolve().parents[1] / "config" / "distributor.toml")
TCP = "tcp 198.51.100.1:40000 > 203.0.113.80:80"
UDP6 = "udp [2001:db8:1::1]:5353 > [2001:db8:80::80]:53"
ERROR = "icmp 192.0.2.1 > 198.51.100.1 frag-needed"


def explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["explain", "--config", CONFIG, *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (f"{TCP} size 100000", ["size 100000", "0..65495"]),
        (f"{UDP6} size 65528", ["size 65528", "0..65527"]),
        ("icmp 192.0.2.1 > 198.51.100.1 unreachable quoting", ["quoting", "needs a flow spec"]),
        ("icmp 192.0.2.1 > 198.51.100.1 echo id 70000", ["id 70000", "0..65535"]),
        (f"{ERROR} mtu 99999 quoting {TCP}", ["mtu 99999", "0..65535"]),
        (f"{TCP} ttl 256", ["ttl 256", "0..255"]),
        (f"{TCP} size", ["size", "needs a value"]),
        (f"{TCP} flags", ["flags", "needs a value"]),
        (f"{TCP} size ²", ["size '²'", "0..65495"]),  # a Unicode digit: str.isdigit() says yes, int() says no
        pytest.param(f"{TCP} size {'9' * 5000}", ["size", "0..65495"], id="5000 digits"),  # past int()'s digit limit
        ("tcp 198.51.100.1:99999 > 203.0.113.80:80", ["198.51.100.1:99999", "0..65535"]),
        ("tcp 198.51.100.1:² > 203.0.113.80:80", ["198.51.100.1:²", "0..65535"]),
        ("udp 198.51.100.1:1 > 203.0.113.80:2 flags S", ["flags", "tcp"]),
        (f"{TCP} id 5", ["id", "icmp echo"]),
        (f"{TCP} mtu 1400", ["mtu", "icmp error"]),
        ("icmp 192.0.2.1 > 198.51.100.1 reply mtu 1400", ["mtu", "icmp error"]),
        (f"{ERROR} size 10 quoting {TCP}", ["size", "not of an icmp error"]),
        ("icmp 192.0.2.1 > 198.51.100.1 echo unreachable quoting " + TCP, ["echo", "icmp error"]),
    ],
)
def test_a_bad_flow_spec_is_a_usage_error_naming_token_and_range(
    capsys: pytest.CaptureFixture[str], spec: str, expected: list[str]
) -> None:
    code, out, err = explain(capsys, spec)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err


def test_the_largest_sizes_still_build() -> None:
    assert len(build_packet(f"{TCP} size 65495")) == 65535
    assert len(build_packet(f"{UDP6} size 65527")) == 40 + 65535


def test_quoting_nests_only_so_deep() -> None:
    spec = (f"{ERROR} quoting " * 200) + TCP
    with pytest.raises(FlowSpecError, match="quoting"):
        build_packet(spec)


WORDS = st.sampled_from([
    "tcp", "udp", "icmp", "icmpv6", ">", "198.51.100.1", "203.0.113.80", "198.51.100.1:1", "203.0.113.80:65535",
    "[2001:db8::1]:80", "2001:db8::2", "[2001:db8::1", "1.2.3.4:", ":80", "flags", "SA", "X", "size", "mtu", "id",
    "ttl", "frag", "echo", "reply", "unreachable", "frag-needed", "too-big", "time-exceeded", "quoting",
    "0", "1", "255", "256", "65535", "65536", "99999999999999999999", "-1", "²", "0x10", "",
])
NUMBERS = st.one_of(st.integers(0, 2**40).map(str), st.sampled_from(["-1", "²", "0x10", "1e3", "", "9" * 5000]))
ENDPOINTS = st.sampled_from(["198.51.100.1", "198.51.100.1:1", "[2001:db8::1]:80", "2001:db8::2", "203.0.113.80:65535"])
OPTIONS = st.one_of(
    st.tuples(st.sampled_from(["size", "mtu", "id", "ttl"]), NUMBERS).map(list),
    st.tuples(st.just("flags"), st.sampled_from(["S", "SA", "FPU", "X", ""])).map(list),
    st.sampled_from(["frag", "echo", "reply", "unreachable", "frag-needed", "too-big", "time-exceeded", "size"]).map(lambda w: [w]),
)


def _spec(words: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """proto SRC > DST, then options, then maybe 'quoting' and the words of another spec."""
    head = st.tuples(st.sampled_from(["tcp", "udp", "icmp", "icmpv6"]), ENDPOINTS, st.just(">"), ENDPOINTS).map(list)
    options = st.lists(OPTIONS, max_size=5).map(lambda chunks: [w for chunk in chunks for w in chunk])
    tail = st.one_of(st.just([]), words.map(lambda inner: ["quoting", *inner]))
    return st.tuples(head, options, tail).map(lambda parts: parts[0] + parts[1] + parts[2])


SPECS = st.recursive(st.just([]), _spec, max_leaves=4)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(WORDS, max_size=24), SPECS))
def test_random_token_sequences_raise_only_flow_spec_errors(words: list[str]) -> None:
    try:
        packet = build_packet(" ".join(words))
    except FlowSpecError:
        return
    assert packet[0] >> 4 in (4, 6)


@pytest.mark.parametrize("text", ["45", "4500 0014", "0x4500", "0X60", "ab cd ef"])
def test_any_all_hex_input_is_hex_whatever_its_length(text: str) -> None:
    assert looks_like_hex(text)


@pytest.mark.parametrize("text", [TCP, "0x", "", "cafe >"])
def test_flow_specs_are_not_hex(text: str) -> None:
    assert not looks_like_hex(text)


@pytest.mark.parametrize(("text", "reason"), [("45", "malformed:truncated-ipv4"), ("4500001400", "malformed:truncated-ipv4"),
                                              ("60" + "00" * 18, "malformed:truncated-ipv6"), ("10", "malformed:bad-ip-version")])
def test_short_hex_is_explained_as_the_too_short_packet_it_is(capsys: pytest.CaptureFixture[str], text: str, reason: str) -> None:
    code, out, err = explain(capsys, "--json", text)
    assert code == 0, err
    trace = json.loads(out)
    assert trace["length"] == len(bytes.fromhex(text))
    assert trace["action"] == "drop" and trace["reason"] == reason
    assert "too short" in trace["packet"] or reason.endswith("bad-ip-version")


def test_odd_hex_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = explain(capsys, "450")
    assert code == 2 and "odd number of hex digits" in err
    with pytest.raises(FlowSpecError):
        parse_hex("450")
