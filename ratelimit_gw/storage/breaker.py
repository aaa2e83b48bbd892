"""A circuit breaker for storage calls (docs/failure-modes.md): fail fast while Redis is known to
be down.

After ``failure_threshold`` consecutive failures the breaker opens and every call fails at
once for ``cooldown_s``; then one trial call is let through (half-open): success closes the
breaker, failure opens it again. Callers never wait out a timeout per request during an
outage, and the gateway recovers by itself when storage comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 2.0,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._on_change = on_change
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        self.state = "closed"

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """May a call go to storage now?"""
        if self.state == "closed":
            return True
        if self.state == "open" and time.monotonic() - self._opened_at >= self._cooldown_s:
            self._set("half_open")
        if self.state == "half_open" and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_running = False
        if self.state != "closed":  # every storage call ends here: skip the call when closed
            self._set("closed")

    def record_abandoned(self) -> None:
        """A call let through ended with neither answer nor failure (its caller was
        cancelled): if it was the half-open trial, the next call becomes the trial."""
        self._trial_running = False

    def retry_after_s(self) -> float:
        """How long until the breaker lets a trial call through (0 unless open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._cooldown_s - (time.monotonic() - self._opened_at))

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_running = False
        if self.state == "half_open" or self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            self._set("open")
