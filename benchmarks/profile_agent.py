"""Run an agent with cProfile armed by signals, for benchmarks/run.py's `profile`:

    python -m benchmarks.profile_agent OUT.prof distributor --config FILE ...

Everything after OUT.prof is `python -m overlay`'s command line. SIGUSR1 starts profiling the main thread
(where the event loop and the packet path run), SIGUSR2 stops it and writes OUT.prof, so the profile holds
the steady state under a flood only, not start-up (imports, config, netlink) or shutdown.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, argv = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from overlay.cli import main as overlay_main

    return overlay_main(argv)


if __name__ == "__main__":
    sys.exit(main())
