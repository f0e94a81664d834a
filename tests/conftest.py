"""Suite-wide hypothesis settings.

The suite is deterministic: every run draws the same examples (derandomize, which also means no example
database), and no outcome depends on the wall clock — no per-example deadline and no "too slow" health
check, both of which fail a correct test on a loaded machine. A failure prints the blob that reproduces it.

The open-ended search for new inputs is the fuzz tests' job (tests/fuzz), bounded by OVERLAY_FUZZ_SECONDS.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "deterministic",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("deterministic")
