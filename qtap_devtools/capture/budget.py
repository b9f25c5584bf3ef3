"""The capture's byte budget: how much plaintext a second the agent takes in.

Past the message heads, the agent's work is per byte: reassembly, base64 twice
(the seed's transaction JSON is itself base64), the stream.  At 1 MiB responses
a busy server moves gigabytes a second, which would take a whole core of the
machine the agent is watching and still not keep up.  So the capture has a
budget, a token bucket over the bytes read from the ring: when it runs dry, the
probes shed (message heads kept, bodies cut and marked ``shed``) until a part
of it has refilled.  Small-message traffic is unaffected: while shedding, a call
that starts a message keeps its first 4 KiB, which is all of a small one.

Sans-IO: the caller says what time it is.
"""

from __future__ import annotations


class ByteBudget:
    def __init__(self, per_second: float, *, burst_seconds: float = 1.0, resume_fraction: float = 0.25,
                 now: float = 0.0) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.per_second = per_second
        # A burst this long at any rate passes whole: a single large download is
        # not what the budget is for.
        self.capacity = per_second * burst_seconds
        # Resuming at a quarter (not at the first byte back) makes shedding come
        # in stretches of ~a quarter second instead of flapping every read.
        self.resume_level = self.capacity * resume_fraction
        self.tokens = self.capacity
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.per_second)
            self._at = now

    def spend(self, nbytes: int, now: float) -> None:
        """``nbytes`` were captured; the level may go below zero (a debt to refill)."""
        self._refill(now)
        self.tokens -= nbytes

    def exhausted(self, now: float) -> bool:
        self._refill(now)
        return self.tokens <= 0

    def recovered(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.resume_level
