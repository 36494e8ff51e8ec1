"""When to try a failed delivery again: exponential backoff with full jitter, for up to an hour."""

from __future__ import annotations

import random

RETRY_FOR_S = 3600.0
RETRY_BASE_S = 2.0
RETRY_CAP_S = 300.0
_MAX_EXPONENT = 30  # 2.0 * 2**30 is far past the cap; keeps the float finite for any attempt count

_default_rng = random.SystemRandom()


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempt``-th failure (1 = first): uniform in [0, min(cap, base * 2**(attempt-1))].

    "Full jitter" as AWS describes it: senders that failed together do not retry together.
    """
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    ceiling = min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** exponent)
    return (rng or _default_rng).uniform(0.0, ceiling)
