"""Token buckets, one per key (a user id, a client IP): how often something may happen.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each event takes
one. `take` never waits: it answers 0 (allowed) or how many seconds until a token is back,
which becomes a `Retry-After`. Everything is in memory and O(1) per call: the buckets live
in an LRU-ordered dict bounded by `max_keys`, and the least recently used one is dropped
first (an idle bucket is full anyway, so forgetting it changes nothing).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_KEYS = 100_000
REPORT_EVERY = 10.0  # seconds: how often refusals of one key are worth a log line


@dataclass(frozen=True)
class Rate:
    """`per_second` sustained, `burst` at once."""

    per_second: float
    burst: int

    def __str__(self) -> str:
        return f"{self.per_second:g}/s, burst {self.burst}"


class RateLimiter:
    def __init__(self, rate: Rate | None, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate  # None: unlimited
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._reported: OrderedDict[str, float] = OrderedDict()  # key -> when a refusal was last logged
        self.refused = 0

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token for `key`: 0.0 if there was one, else the seconds until there is."""
        if self.rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        rate, burst = self.rate.per_second, float(self.rate.burst)
        tokens, when = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - when) * rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / rate if rate > 0 else float("inf")
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        if wait:
            self.refused += 1
        return wait

    def forget_idle(self, now: float | None = None) -> None:
        """Drop the buckets that have been full again for a while, and old report times:
        forgetting them changes no answer, and the memory follows the people working now."""
        now = time.monotonic() if now is None else now
        if self.rate is not None and self.rate.per_second > 0:
            refill = self.rate.burst / self.rate.per_second  # from empty to full
            while self._buckets and now - next(iter(self._buckets.values()))[1] >= refill:
                self._buckets.popitem(last=False)  # least recently used first
        while self._reported and now - next(iter(self._reported.values())) >= REPORT_EVERY:
            self._reported.popitem(last=False)

    def worth_reporting(self, key: str, now: float | None = None) -> bool:
        """Whether a refusal of `key` should be logged: once per REPORT_EVERY seconds at most,
        so that a client in a tight loop cannot flood the log."""
        now = time.monotonic() if now is None else now
        last = self._reported.pop(key, None)
        due = last is None or now - last >= REPORT_EVERY
        self._reported[key] = now if due else last
        if len(self._reported) > self._max_keys:
            self._reported.popitem(last=False)
        return due
