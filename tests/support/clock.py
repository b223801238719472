"""A clock the test moves: the one fake time source of the suite."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that only moves when told; ``sleep`` moves it and is recorded.

    ``clock()`` reads it (pass ``clock`` where a ``time.monotonic`` is wanted and
    ``clock.sleep`` where a ``time.sleep`` is); ``advance`` moves it by hand.
    """

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
