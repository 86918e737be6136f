"""Per-session token buckets (SPEC §6, §10): ``limits.frame_*`` for every client frame,
``limits.send_*`` for ``send``/``direct``."""

from __future__ import annotations

import trio

#: rejected frames in a row after which the client counts as abusive and is closed (4429)
ABUSE_STRIKES = 10


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per frame."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate", "strikes")  # two per connection

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = trio.current_time()
        self.strikes = 0

    def take(self) -> bool:
        """Spend a token if there is one; count a strike when there is not."""
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.strikes = 0
            return True
        self.strikes += 1
        return False
