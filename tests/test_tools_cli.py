"""`overlay check`, `overlay explain` and `overlay replay`, driven exactly as a user would: through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import dpkt
import pytest

from overlay import gre
from overlay.cli import main
from overlay.flowspec import build_packet

CONFIG = str(Path(__file__).resolve().parents[1] / "config" / "distributor.toml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def explain_json(capsys: pytest.CaptureFixture[str], spec: str, *extra: str) -> dict:
    code, out, err = run(capsys, "explain", "--config", CONFIG, "--json", *extra, spec)
    assert code == 0, err
    return json.loads(out)


def test_check_accepts_the_reference_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", CONFIG)
    assert code == 0
    assert "ok (distributor dist1" in out
    assert "tm1" in out and "hash-src" in out


def test_check_rejects_a_bad_config_naming_field_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = Path(CONFIG).read_text().replace('virtual = ["203.0.113.80/32"', 'virtual = ["203.0.113.300/32"')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("virtual ="))
    code, _, err = run(capsys, "check", str(bad))
    assert code == 1
    assert f"bad.toml:{line}: sets.virtual[0]:" in err
    assert "not a valid" in err


def test_explain_client_to_vip_and_the_reply_meet_at_one_tm(capsys: pytest.CaptureFixture[str]) -> None:
    forward = explain_json(capsys, "tcp 198.51.100.123:40000 > 203.0.113.80:80")
    assert forward["action"] == "tm" and forward["reason"] == "hash-src"
    assert forward["cell"] == "unknown>virtual"
    assert forward["first_choice"] == forward["tm"] and forward["second_choice"] not in (None, forward["tm"])
    # The TM DNATs to server1; the reply comes from the node and must hash the same client.
    reply = explain_json(capsys, "tcp 203.0.113.10:80 > 198.51.100.123:40000 flags SA")
    assert reply["reason"] == "hash-dst" and reply["tm"] == forward["tm"]
    assert reply["hash_key"] == forward["hash_key"]
    # A router on the way complains about the translated packet: the error follows the flow's TM.
    error = explain_json(
        capsys, "icmp 192.0.2.1 > 198.51.100.123 frag-needed mtu 1400 quoting tcp 198.51.100.123:40000 > 203.0.113.10:80"
    )
    assert error["tm"] == forward["tm"] and error["flow"]["icmp_error"] is True


def test_explain_encapsulated_bytes_decapsulate_to_the_packet(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "udp [2001:db8:1::100]:5353 > [2001:db8:80::80]:53"
    trace = explain_json(capsys, spec)
    frame = gre.decapsulate(bytes.fromhex(trace["encapsulated"]))
    assert frame is not None and frame.protocol == gre.PROTO_IPV6
    assert frame.inner == build_packet(spec)


def test_explain_accepts_hex_and_gives_the_same_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "tcp 198.51.100.150:41000 > 203.0.113.80:80"
    by_spec = explain_json(capsys, spec)
    by_hex = explain_json(capsys, build_packet(spec).hex())
    assert (by_hex["action"], by_hex["tm"], by_hex["reason"]) == (by_spec["action"], by_spec["tm"], by_spec["reason"])


@pytest.mark.parametrize(
    "spec, action, tm, reason",
    [
        ("tcp 198.51.100.20:5555 > 203.0.113.202:8080", "tm", "tm2", "management"),
        ("tcp 198.51.100.20:80 > 203.0.113.103:20000 flags SA", "tm", "tm3", "owner"),
        ("tcp 198.51.100.20:80 > 203.0.113.50:20000", "forward", None, "route"),
        ("tcp 198.51.100.20:80 > 203.0.113.99:20000", "tm", None, "hash-src"),  # xlate prefix, no owner
    ],
)
def test_explain_other_cells(capsys: pytest.CaptureFixture[str], spec: str, action: str, tm: str | None, reason: str) -> None:
    trace = explain_json(capsys, spec)
    assert trace["action"] == action and trace["reason"] == reason
    if tm is not None:
        assert trace["tm"] == tm


def test_explain_from_a_tm_forwards_without_hashing(capsys: pytest.CaptureFixture[str]) -> None:
    trace = explain_json(capsys, "tcp 198.51.100.100:40000 > 203.0.113.10:80", "--from-peer", "192.0.2.71:4754")
    assert trace["action"] == "forward" and trace["reason"] == "from-tm"


def test_explain_with_a_tm_down_moves_only_its_rows(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "tcp 198.51.100.123:40000 > 203.0.113.80:80"
    before = explain_json(capsys, spec)
    other = next(name for name in ("tm1", "tm2", "tm3") if name != before["tm"])
    assert explain_json(capsys, spec, "--down", other)["tm"] == before["tm"]
    assert explain_json(capsys, spec, "--down", before["tm"])["tm"] == before["second_choice"]


def test_explain_malformed_packet_is_a_drop_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    truncated = build_packet("tcp 198.51.100.1:1 > 203.0.113.80:80")[:30]  # IPv4 header promises 40
    trace = explain_json(capsys, truncated.hex())
    assert trace["action"] == "drop" and trace["reason"] == "malformed:truncated-ipv4"


def test_explain_bad_spec_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "explain", "--config", CONFIG, "tcp 198.51.100.1 > 203.0.113.80:80")
    assert code == 2 and "ADDRESS:PORT" in err


def _write_pcap(path: Path, packets: list[bytes], ethernet: bool) -> None:
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=1 if ethernet else 101)
        for i, packet in enumerate(packets):
            frame = (b"\x02" * 6 + b"\x04" * 6 + (b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00") + packet) if ethernet else packet
            writer.writepkt(frame, 1000.0 + i)


def _write_pcapng(path: Path, packets: list[bytes]) -> None:
    with path.open("wb") as handle:
        writer = dpkt.pcapng.Writer(handle, linktype=101)
        for i, packet in enumerate(packets):
            writer.writepkt(packet, 1000.0 + i)


@pytest.mark.parametrize("form", ["pcap-ethernet", "pcap-raw", "pcapng-raw"])
def test_replay_writes_per_tm_pcaps_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str) -> None:
    packets = [build_packet(f"tcp 198.51.100.{100 + i}:{40000 + i} > 203.0.113.80:80") for i in range(60)]
    packets += [build_packet("tcp 198.51.100.20:80 > 203.0.113.50:1234")]  # routed
    packets += [b"\x45\x00\x00"]  # truncated
    source = tmp_path / "in.pcap"
    if form == "pcapng-raw":
        _write_pcapng(source, packets)
    else:
        _write_pcap(source, packets, ethernet=form == "pcap-ethernet")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "replay", "--config", CONFIG, "--pcap", str(source), "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout) == summary
    assert summary["packets"] == 62
    assert sum(summary["tm"].values()) == 60 and all(count > 0 for count in summary["tm"].values())
    assert summary["cells"]["unknown>virtual"] == 60 and summary["reasons"]["route"] == 1
    assert summary["actions"] == {"tm": 60, "forward": 1, "drop": 1}
    seen = set()
    for tm, count in summary["tm"].items():
        frames = list(dpkt.pcap.Reader((out / f"{tm}.pcap").open("rb")))
        assert len(frames) == count
        for _, frame in frames:
            outer = dpkt.ip.IP(frame)
            assert outer.p == 17 and outer.data.dport == 4754
            decapsulated = gre.decapsulate(bytes(outer.data.data))
            assert decapsulated is not None
            seen.add(decapsulated.inner)
    assert seen == set(packets[:60])
    assert [bytes(f) for _, f in dpkt.pcap.Reader((out / "drop.pcap").open("rb"))] == [packets[-1]]
    assert [bytes(f) for _, f in dpkt.pcap.Reader((out / "forward.pcap").open("rb"))] == [packets[60]]


def test_replay_refuses_a_file_that_is_not_a_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture at all")
    code, _, err = run(capsys, "replay", "--config", CONFIG, "--pcap", str(junk), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a pcap" in err
