"""A token bucket: at most ``burst`` at once and ``rate`` per second on average (no I/O, no sleeping)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateBound:
    """``take()`` says whether one more may go now; what is refused is counted in ``dropped``
    until :meth:`report` hands the count out (at most once per ``report_every`` seconds), so a
    flood makes one log line per interval, not one per refusal."""

    def __init__(self, rate: float, burst: int, *, now: Callable[[], float] = time.monotonic,
                 report_every: float = 10.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate bound needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.now = now
        self.report_every = report_every
        self._tokens = float(burst)
        self._at = now()
        self.dropped = 0
        self._reported_at = self._at - report_every

    def take(self) -> bool:
        now = self.now()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        return False

    def report(self) -> int:
        """How many were refused since the last report, if a report is due now; else 0."""
        now = self.now()
        if not self.dropped or now - self._reported_at < self.report_every:
            return 0
        dropped, self.dropped = self.dropped, 0
        self._reported_at = now
        return dropped
