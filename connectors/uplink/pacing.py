"""Pacing of the uplink sender: reconnection backoff and the bandwidth cap."""

from __future__ import annotations

import random
import time

__all__ = ["TokenBucket", "backoff_delay"]


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before reconnection ``attempt`` (0 first): full jitter.

    Uniform between ``min_s`` and ``min(max_s, min_s * 2**attempt)``.
    """
    cap = min(max_s, min_s * 2.0 ** min(attempt, 64))
    return rng.uniform(min_s, cap)


class TokenBucket:
    """Bytes per second with a one-second burst; a large message borrows ahead."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = self.rate
        self.last = time.monotonic()

    def wait_s(self) -> float:
        """Seconds to wait before the next message may go (0 when tokens are left)."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def spend(self, nbytes: int) -> None:
        """Take ``nbytes`` tokens (the balance may go negative: borrowed ahead)."""
        self.tokens -= nbytes
