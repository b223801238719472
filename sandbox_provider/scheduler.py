"""Run callables later on one background thread: what a provider does after it answered.

The sandbox settles pending charges and retries webhooks this way. One thread per
scheduler keeps the thread count fixed however many charges are pending, and runs tasks
due at the same time in the order they were scheduled (so a shuffled redelivery arrives
in the order the control reported). The queue is bounded: a flood is refused, not
buffered without end.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import traceback

DEFAULT_MAX_TASKS = 10_000
STOP_TIMEOUT_S = 5.0


class Scheduler:
    """A timed task queue served by one daemon thread, started on construction.

    ``name`` names the thread; ``max_tasks`` bounds the queue; ``clock`` is the
    monotonic clock delays are measured on.
    """

    def __init__(self, name: str, *, max_tasks: int = DEFAULT_MAX_TASKS, clock=time.monotonic):
        self._clock = clock
        self._max_tasks = max_tasks
        self._condition = threading.Condition()
        self._tasks: list = []
        self._order = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, delay_s: float, task) -> bool:
        """Run ``task()`` in ``delay_s`` seconds; ``False`` (and nothing queued) when full."""
        with self._condition:
            if self._stopped or len(self._tasks) >= self._max_tasks:
                return False
            due = self._clock() + max(delay_s, 0.0)
            heapq.heappush(self._tasks, (due, next(self._order), task))
            self._condition.notify()
            return True

    def pending(self) -> int:
        with self._condition:
            return len(self._tasks)

    def clear(self) -> None:
        """Drop every queued task (a task already running finishes)."""
        with self._condition:
            self._tasks.clear()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Drop the queue and end the thread."""
        with self._condition:
            self._stopped = True
            self._tasks.clear()
            self._condition.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped:
                    wait_s = self._tasks[0][0] - self._clock() if self._tasks else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._condition.wait(wait_s)
                if self._stopped:
                    return
                _, _, task = heapq.heappop(self._tasks)
            try:
                task()
            except Exception:  # one broken task must not stop every later one
                traceback.print_exc()
