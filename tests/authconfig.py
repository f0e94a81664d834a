"""Copies of the reference configs with `[auth]` on: a key pair per node, each node's private key file,
every peer entry naming its peer's public key; and with an edge (a server in another cloud). Shared by
the in-memory and lab tests of authentication and edges."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from overlay import auth

REPO = Path(__file__).resolve().parents[1]
NODES = ("distributor", "tm1", "tm2", "tm3")
EDGE_SERVER_V4, EDGE_SERVER_V6 = "203.0.113.12", "2001:db8:2::12"


def with_edge(config_dir: Path, edge_underlay: str, distributor_underlay: str = "192.0.2.2:4754",
              source: Path = REPO / "config", edge_address: str | None = None) -> None:
    """`source`'s configs in `config_dir`, plus edge1.toml: an edge serving a third server (EDGE_SERVER_*)
    that every TM's web pools also balance to, and the distributor's [[edge]] for it (at `edge_underlay`:
    where the distributor would reach it; the edge's own address is `edge_address`, behind NAT)."""
    if config_dir != source:
        shutil.copytree(source, config_dir, dirs_exist_ok=True)
    distributor = config_dir / "distributor.toml"
    text = distributor.read_text()
    for old, new in (('node = ["203.0.113.10/31", "2001:db8:2::10/127"]', f'node = ["203.0.113.10/31", "{EDGE_SERVER_V4}/32", "2001:db8:2::10/127", "{EDGE_SERVER_V6}/128"]'),
                     ('nat_able = ["203.0.113.10/31", "2001:db8:2::10/127"]', f'nat_able = ["203.0.113.10/31", "{EDGE_SERVER_V4}/32", "2001:db8:2::10/127", "{EDGE_SERVER_V6}/128"]')):
        assert old in text, old
        text = text.replace(old, new)
    text += f'\n[[edge]]\nname = "edge1"\nunderlay = "{edge_underlay}"\nprefixes = ["{EDGE_SERVER_V4}/32", "{EDGE_SERVER_V6}/128"]\n'
    distributor.write_text(text)
    for tm in NODES[1:]:
        path = config_dir / f"{tm}.toml"
        text = path.read_text()
        for old, new in (('servers = ["203.0.113.10:80", "203.0.113.11:80"]', f'servers = ["203.0.113.10:80", "203.0.113.11:80", "{EDGE_SERVER_V4}:80"]'),
                         ('servers = ["[2001:db8:2::10]:80", "[2001:db8:2::11]:80"]', f'servers = ["[2001:db8:2::10]:80", "[2001:db8:2::11]:80", "[{EDGE_SERVER_V6}]:80"]'),
                         ('natable = ["203.0.113.10/31", "2001:db8:2::10/127"]', f'natable = ["203.0.113.10/31", "{EDGE_SERVER_V4}/32", "2001:db8:2::10/127", "{EDGE_SERVER_V6}/128"]')):
            assert old in text, (tm, old)
            text = text.replace(old, new)
        path.write_text(text)
    address = edge_address or edge_underlay.rsplit(":", 1)[0]
    (config_dir / "edge1.toml").write_text(f"""# An edge: a server in another cloud joins the overlay.
[node]
role = "edge"
name = "edge1"

[underlay]
address = "{address}"
announce_interval = 1

[tun]
name = "ovl-edge"

[status]
listen = "0.0.0.0:8080"

[[distributor]]
underlay = "{distributor_underlay}"

[edge]
prefixes = ["{EDGE_SERVER_V4}/32", "{EDGE_SERVER_V6}/128"]
""")


def with_auth(config_dir: Path, mode: str = "authenticate", source: Path = REPO / "config") -> dict[str, bytes]:
    """Write `source`'s node configs into `config_dir` with authentication on; returns each node's private
    key by config name ("distributor", "tm1", ..., "edge1" when `source` has an edge1.toml)."""
    if config_dir != source:
        shutil.copytree(source, config_dir, dirs_exist_ok=True)
    nodes = NODES + (("edge1",) if (config_dir / "edge1.toml").exists() else ())
    keys = {node: auth.generate_private_key() for node in nodes}
    public = {node: auth.encode_key(auth.public_key_of(key)) for node, key in keys.items()}
    for node, key in keys.items():
        key_file = config_dir / f"{node}.key"
        key_file.write_text(auth.encode_key(key) + "\n")
        key_file.chmod(0o600)
        path = config_dir / f"{node}.toml"
        text = path.read_text()
        if node == "distributor":
            for peer in nodes[1:]:
                table = "edge" if peer.startswith("edge") else "tm"
                text, found = re.subn(rf'(\[\[{table}\]\]\nname = "{peer}"\n)', rf'\1public_key = "{public[peer]}"\n', text)
                assert found == 1, peer
        else:
            text, found = re.subn(r'(\[\[distributor\]\]\n)', rf'\1name = "dist1"\npublic_key = "{public["distributor"]}"\n', text)
            assert found == 1, node
        path.write_text(text + f'\n[auth]\nmode = "{mode}"\nprivate_key_file = "{key_file.name}"\n')
    return keys
