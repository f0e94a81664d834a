"""The `overlay` command: one subcommand per job, each registered by the module that owns it.

Every command module exposes `register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning the process exit code. Keeping the wiring here and the work in
the owning module keeps this file a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from overlay import __version__

# A writer killed by SIGPIPE exits with 128 + 13, which is what a shell reports for `cat big | head -1`.
# Python ignores SIGPIPE and raises BrokenPipeError instead; returning the same status keeps
# `set -o pipefail` scripts seeing overlay exactly like any other tool whose reader left early.
EXIT_BROKEN_PIPE = 128 + 13

# Modules that contribute subcommands, in the order `overlay --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "overlay.tools_cli",
    "overlay.keys_cli",
    "overlay.fleet_cli",
    "overlay.ecmp_cli",
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader gone early must show here, not in the interpreter's exit flush
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """stdout's reader left (`| head`). Point stdout at /dev/null so that the flush at interpreter exit
    has nowhere to fail (the recipe in the `signal` module's docs), and exit quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
