"""Copies of the reference configs with `[auth]` on: a key pair per node, each node's private key file,
every peer entry naming its peer's public key. Shared by the in-memory and lab tests of authentication."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from overlay import auth

REPO = Path(__file__).resolve().parents[1]
NODES = ("distributor", "tm1", "tm2", "tm3")


def with_auth(config_dir: Path, mode: str = "authenticate", source: Path = REPO / "config") -> dict[str, bytes]:
    """Write `source`'s node configs into `config_dir` with authentication on; returns each node's private
    key by config name ("distributor", "tm1", ...)."""
    if config_dir != source:
        shutil.copytree(source, config_dir, dirs_exist_ok=True)
    keys = {node: auth.generate_private_key() for node in NODES}
    public = {node: auth.encode_key(auth.public_key_of(key)) for node, key in keys.items()}
    for node, key in keys.items():
        key_file = config_dir / f"{node}.key"
        key_file.write_text(auth.encode_key(key) + "\n")
        key_file.chmod(0o600)
        path = config_dir / f"{node}.toml"
        text = path.read_text()
        if node == "distributor":
            for tm in NODES[1:]:
                text, found = re.subn(rf'(\[\[tm\]\]\nname = "{tm}"\n)', rf'\1public_key = "{public[tm]}"\n', text)
                assert found == 1, tm
        else:
            text, found = re.subn(r'(\[\[distributor\]\]\n)', rf'\1name = "dist1"\npublic_key = "{public["distributor"]}"\n', text)
            assert found == 1, node
        path.write_text(text + f'\n[auth]\nmode = "{mode}"\nprivate_key_file = "{key_file.name}"\n')
    return keys
