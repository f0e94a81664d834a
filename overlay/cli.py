"""The `overlay` command: one subcommand per job, each registered by the module that owns it.

Every command module exposes `register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning the process exit code. Keeping the wiring here and the work in
the owning module keeps this file a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from overlay import __version__

# Modules that contribute subcommands, in the order `overlay --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "overlay.tools_cli",
    "overlay.runtime.cli",
    "overlay.lab.cli",
    "overlay.status.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay",
        description="Scale stateful traffic managers side by side over a user-mode GRE-in-UDP overlay.",
    )
    parser.add_argument("--version", action="version", version=f"overlay {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
