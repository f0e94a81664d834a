"""`overlay keygen`: a node's key pair for authenticated overlays (overlay/auth.py, docs/clouds.md).

    overlay keygen --out /etc/overlay/dist1.key      # writes the private key (0600), prints the public key
    overlay keygen --public /etc/overlay/dist1.key   # prints the public key of an existing private key

The private key never leaves the node: its config names the file (`[auth] private_key_file`). The
public key goes into every peer's config (`public_key` of that node's `[[tm]]`, `[[edge]]` or
`[[distributor]]` entry).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from overlay import auth


def register(subparsers: argparse._SubParsersAction) -> None:
    keygen = subparsers.add_parser("keygen", help="make a node's key pair for the authenticated overlay")
    which = keygen.add_mutually_exclusive_group(required=True)
    which.add_argument("--out", metavar="FILE", help="write a new private key here (0600; refuses to overwrite)")
    which.add_argument("--public", metavar="FILE", help="print the public key of this private key file")
    keygen.set_defaults(func=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    if args.public:
        try:
            private = auth.decode_key(Path(args.public).read_text())
        except OSError as error:
            print(f"error: {args.public}: {error.strerror}", file=sys.stderr)
            return 1
        except ValueError as error:
            print(f"error: {args.public}: {error}", file=sys.stderr)
            return 1
        print(auth.encode_key(auth.public_key_of(private)))
        return 0
    private = auth.generate_private_key()
    try:
        # O_EXCL: never overwrite a key (a lost key means reconfiguring every peer); 0600 from the start.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        print(f"error: {args.out}: {error.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as file:
        file.write(auth.encode_key(private) + "\n")
    print(auth.encode_key(auth.public_key_of(private)))
    return 0
