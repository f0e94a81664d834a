"""Issue 13's lab proof with real agents: a TM is SIGKILLed under long-lived TCP streams, and with
`[tm.replication]` on, its streams go on at their rows' second choice, which commits the state the dead TM
had replicated to it (overlay/tm/replication.py); then the TM is restarted (empty) and its rows move back
while the streams still run — `health.return_grace` shares them with the heirs (second chance), so the
streams live on. Negative control: replication off — the same streams break at the crash, and the heirs
count their packets as invalid.

The streams are established and left to run for several replication intervals before the kill: the
documented loss window is a connection younger than one interval (0.2 s by default).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from overlay.distributor.core import Distributor
from overlay.lab import topology
from overlay.lab.lab import Lab, unavailable_reason
from tests.tm.packets import SYN, tcp

from .conftest import lab_config_with_admin_token, lab_prefix, lab_running
from .test_lab_issue5 import DETECTION, RECOVERY, Issue5Lab, SlowStreams

pytestmark = pytest.mark.lab

LAB_UNAVAILABLE = unavailable_reason()
TOKEN = "replication-admin-token-0123456789ab"
VICTIM = "tm2"
STREAM_SECONDS = 14.0
REPLICATION = "\n[tm.replication]\nenabled = true\ninterval = 0.2\n"
BACKUPS = {"tm1": "tm2", "tm2": "tm3", "tm3": "tm1"}
REMOTES = tuple(f"198.51.100.{host}" for host in range(30, 60))


@pytest.fixture(scope="module", params=["replicated", "not replicated"])
def lab13(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issue5Lab]:
    if LAB_UNAVAILABLE:
        pytest.skip(f"lab cannot run: {LAB_UNAVAILABLE}")
    root = tmp_path_factory.mktemp("replication-lab")
    config_dir = lab_config_with_admin_token(root, TOKEN)
    if request.param == "replicated":
        for tm in topology.TMS:
            path = config_dir / f"{tm}.toml"
            path.write_text(path.read_text() + REPLICATION)
        # A TM back from a crash shares its rows with the TMs that held them meanwhile (second chance), and
        # each TM's xlate has a designated backup that holds its source-NAT bindings.
        distributor = config_dir / "distributor.toml"
        text = distributor.read_text().replace("[health]\n", "[health]\nreturn_grace = 30\n", 1)
        for tm, backup in BACKUPS.items():
            text = text.replace(f'name = "{tm}"\n', f'name = "{tm}"\nbackup = "{backup}"\n', 1)
        distributor.write_text(text)
    lab = Lab(lab_prefix("r" + request.param[0]), config_dir=config_dir, state_dir=root / "state")
    with lab_running(lab):
        for address in REMOTES:   # more remote hosts: source-NATed streams hash the remote
            result = lab.exec("remote", ["ip", "address", "add", f"{address}/24", "dev", "outside"])
            assert result.returncode == 0, result.stderr
        yield Issue5Lab(lab, config_dir / "distributor.toml", root / "admin.token")


def remotes_on(lab13: Issue5Lab, tm: str, count: int) -> list[str]:
    """Remote addresses whose connections from server1 (hash of the remote) land on `tm`."""
    core = Distributor(lab13.placement._config)
    server = topology.SERVERS_V4["server1"]
    chosen = [r for r in REMOTES if core.from_tun(tcp(server, 40000, r, 80, SYN)).tm == tm][:count]
    assert len(chosen) == count, f"not enough remote addresses land on {tm}"
    return chosen


def test_a_sigkilled_tms_streams_survive_only_with_replication(lab13: Issue5Lab) -> None:
    replicated = lab13.status(VICTIM)["replication"]["enabled"]
    on_victim = lab13.placement.sources_on(VICTIM, 6)
    elsewhere = [s for tm in topology.TMS if tm != VICTIM for s in lab13.placement.sources_on(tm, 1)]
    heirs = ({lab13.placement.landing(source, down=[VICTIM]) for source in on_victim} | {BACKUPS[VICTIM]}) - {VICTIM}
    streams = SlowStreams(lab13.lab, [(s, STREAM_SECONDS) for s in on_victim + elsewhere], stall_timeout=8.0)
    # Source-NATed streams: server1 → remote hosts whose rows are VICTIM's, leaving with its xlate address.
    outbound_remotes = remotes_on(lab13, VICTIM, 3)
    outbound = SlowStreams(lab13.lab, [(topology.SERVERS_V4["server1"], STREAM_SECONDS)] * 3, stall_timeout=8.0,
                           role="server1", destinations=outbound_remotes)
    try:
        streams.wait_flowing()
        outbound.wait_flowing()
        time.sleep(1.0)   # five replication intervals: every stream's state is at its standby
        before = {tm: lab13.status(tm) for tm in heirs}
        os.kill(lab13.pid(VICTIM), signal.SIGKILL)
        detected = lab13.wait_for(lambda status: status["tms"][VICTIM]["up"] is False, timeout=DETECTION + 5)
        returned = None
        if replicated:
            # It comes back, empty: its rows move back to it while the streams still run.
            time.sleep(1.0)
            lab13.start_tm(VICTIM)
            returned = lab13.wait_for(lambda status: status["tms"][VICTIM]["up"] is True, timeout=RECOVERY + 10)
            returned_at = time.monotonic()
            assert lab13.status()["tms"][VICTIM]["returning"]
    finally:
        results = streams.results()
        snat_results = outbound.results()
    if returned is not None:
        assert all(r.ended > returned_at for r in results), "the streams must still run when the TM returns"
    on_victim_results = [r for r in results if r.source in on_victim]
    elsewhere_results = [r for r in results if r.source not in on_victim]
    assert [r for r in elsewhere_results if not r.ok] == [], "streams through the other TMs never notice"
    committed = sum(lab13.status(tm)["replication"]["committed"] - before[tm]["replication"]["committed"] for tm in heirs)
    invalid = sum(lab13.status(tm)["counters"].get("invalid.no_state", 0) - before[tm]["counters"].get("invalid.no_state", 0)
                  for tm in heirs)
    broken = [r for r in on_victim_results if not r.ok]
    snat_broken = [r for r in snat_results if not r.ok]
    if replicated:
        assert snat_broken == [], f"source-NATed streams through {VICTIM} must go on: {snat_broken}"
    else:
        assert len(snat_broken) == len(snat_results), "negative control: their replies find no state"
    if replicated:
        assert broken == [], f"{VICTIM}'s streams must go on at their standby: {broken}"
        assert committed >= len(on_victim) and invalid == 0, (committed, invalid)
        # They stall for the detection time plus TCP's retransmission backoff (reported, not asserted).
    else:
        assert len(broken) == len(on_victim), "negative control: without replication the streams break"
        assert committed == 0 and invalid > 0
    if replicated:
        # Status shows, per TM, how long ago its last batch came: the heirs, whose new connections keep
        # changing state, replicate every interval (a TM without changes sends nothing: its age grows).
        lag = lab13.status()["replication"]
        assert set(lag) == set(topology.TMS), lag
        assert all(lag[tm]["last_batch_age_s"] < 5.0 for tm in heirs), lag
        # Back on it after the return: new connections are its own, the moved ones bounced to their heirs.
        bounced = lab13.status(VICTIM)["counters"].get("bounced.second_chance", 0)
        assert bounced > 0, "the returned TM hands the moved connections' packets back to their heirs"
    print(f"\n{'replication on' if replicated else 'replication off'}: {VICTIM} SIGKILLed, detected after "
          f"{detected:.2f}s; its {len(on_victim)} streams: {len(on_victim) - len(broken)} went on (longest gap "
          f"{max(r.max_gap for r in on_victim_results):.2f}s), committed at {sorted(heirs)}: {committed}, "
          f"invalid there: {invalid}; {len(elsewhere_results)} streams elsewhere all complete"
          + f"; {len(snat_results) - len(snat_broken)} of {len(snat_results)} source-NATed streams went on"
          + (f"; {VICTIM} restarted and back up after {returned:.2f}s, the streams went on through its return"
             if returned is not None else ""))
