"""The pure (no I/O) helpers of the optional C extension `overlay._fastio`, for the sans-I/O cores.

`flow_run` is the C one where the extension was built, else the reference in overlay/runtime/offload.py
(the same results: tests/runtime/test_overlay_train.py). `nat_run` (a TM's translation of a run),
`distribute` and `deliver` (the distributor's fast paths for a batch) and `translate` (the TM's) have no
Python twins — their callers fall back to
their own per-packet paths, which the differential tests hold them to — so they are None without it. `OVERLAY_PURE_PYTHON=1` switches
the extension off here as in overlay/runtime/batchio.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from overlay.runtime.offload import flow_run as _reference_flow_run

flow_run: Callable[[list[bytes], int, int], int] = _reference_flow_run
nat_run: Callable[..., list[bytes]] | None = None
distribute: Callable[..., tuple[list[list[tuple[bytes, tuple[str, int]]]], list[tuple[int, int, int]], int]] | None = None
deliver: Callable[..., tuple[list[bytes], int]] | None = None
translate: Callable[..., tuple[list[tuple[bytes, tuple[str, int]]], int, int, str]] | None = None

if os.environ.get("OVERLAY_PURE_PYTHON") != "1":
    try:
        from overlay import _fastio  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        flow_run, nat_run = _fastio.flow_run, _fastio.nat_run
        distribute, deliver, translate = _fastio.distribute, _fastio.deliver, _fastio.translate
