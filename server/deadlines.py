"""Deadlines and timeouts, converted in one place.

gRPC Python reports a call without a deadline as a huge `time_remaining()` (the C core's
"infinite future", hundreds of years away), not as None. Passed on to `Event.wait` or added to a
clock, such a number overflows the platform's time_t ("OverflowError: timestamp out of range").
Every deadline the service keeps is therefore either None (no deadline) or a finite
`time.monotonic()` value, and every wait is bounded by `threading.TIMEOUT_MAX`.
"""

from __future__ import annotations

import math
import threading
import time

# A remaining time beyond this is no deadline at all: no translation waits a year, and every
# finite value below it converts to a monotonic deadline and a wait timeout without overflow.
NO_DEADLINE_BEYOND_S = 365 * 24 * 3600.0


def deadline_in(remaining: float | None, now: float | None = None) -> float | None:
    """The monotonic deadline `remaining` seconds from now; None for no deadline (None, NaN, or
    more than NO_DEADLINE_BEYOND_S). A negative remaining time is a deadline already past."""
    if remaining is None or math.isnan(remaining) or remaining > NO_DEADLINE_BEYOND_S:
        return None
    return (time.monotonic() if now is None else now) + max(remaining, 0.0)


def timeout_until(deadline: float | None, now: float | None = None) -> float | None:
    """Seconds from now to a monotonic deadline, for `wait(timeout)`: None waits without a
    limit, 0 for a deadline already past, never more than threading.TIMEOUT_MAX."""
    if deadline is None:
        return None
    left = deadline - (time.monotonic() if now is None else now)
    return min(max(left, 0.0), threading.TIMEOUT_MAX)
