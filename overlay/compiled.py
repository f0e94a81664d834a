"""The pure (no I/O) helpers of the optional C extension `overlay._fastio`, for the sans-I/O cores.

`flow_run` is the C one where the extension was built, else the reference in overlay/runtime/offload.py
(the same results: tests/runtime/test_overlay_train.py). `nat_run` has no Python twin — its caller falls
back to its own per-packet path — so it is None without the extension. `OVERLAY_PURE_PYTHON=1` switches
the extension off here as in overlay/runtime/batchio.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from overlay.runtime.offload import flow_run as _reference_flow_run

flow_run: Callable[[list[bytes], int, int], int] = _reference_flow_run
nat_run: Callable[..., list[bytes]] | None = None

if os.environ.get("OVERLAY_PURE_PYTHON") != "1":
    try:
        from overlay import _fastio  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        flow_run, nat_run = _fastio.flow_run, _fastio.nat_run
