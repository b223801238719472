"""Fault injection: what the sandbox does to the next create request instead of answering.

Faults apply to requests that would create a charge or a refund (a fresh idempotency
key, or a key whose earlier attempt a fault rejected), in the order they arrive, so a
script entry is spent by whichever comes first; replays and conflicts on a known key are
answered at once, as a real provider answers them from its idempotency store.

Some faults reject the request before anything happens (an error status, ``reset``,
``hang``): nothing is recorded and the same key can succeed later. Others lose the
answer after the charge or refund is recorded (``hang_after_commit``,
``reset_mid_response``, ``malformed_json``, ``html``, ``missing_status``): the money
moved, the client cannot tell, and only a replay or a lookup by key reveals it.

``trickle_ms`` records the object too, then sends the whole answer, status line
included, one byte every ``trickle_ms``: each read the client makes succeeds, so no
per-read timeout ever fires and only a wall-clock deadline ends the wait. Changing the
faults sends the rest of a trickling answer at once.

``settle_later_ms`` answers every new charge and refund ``pending`` and settles it that
many milliseconds later, announced by an event (DESIGN.md section 11). Payment methods
that always settle later use it too, or ``DEFAULT_SETTLE_LATER_MS`` when it is 0.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from numbers import Real

#: Script entries that lose the request before anything is recorded.
REJECTING_NAMES = frozenset({"reset", "hang"})
#: Script entries that record the charge or refund, then lose or mangle the answer.
COMMITTING_NAMES = frozenset({"reset_mid_response", "malformed_json", "html", "missing_status"})
SCRIPT_NAMES = REJECTING_NAMES | COMMITTING_NAMES
DEFAULT_ERROR_STATUS = 503
MAX_LATENCY_MS = 600_000
MAX_TRICKLE_MS = 60_000
MAX_SETTLE_LATER_MS = 600_000
DEFAULT_SETTLE_LATER_MS = 200


class FaultError(ValueError):
    """A fault setting the sandbox cannot apply."""


@dataclass(frozen=True)
class Faults:
    """One complete fault setting; every field at its default means a healthy provider."""

    latency_ms: float = 0
    hang: bool = False
    hang_after_commit: bool = False
    error_rate: float = 0.0
    error_status: int = DEFAULT_ERROR_STATUS
    retry_after: int | None = None
    trickle_ms: float = 0
    settle_later_ms: float = 0
    script: tuple[int | str, ...] = field(default=())

    @classmethod
    def from_mapping(cls, data) -> Faults:
        """Validate a JSON object; absent keys take their defaults, unknown keys are refused."""
        if not isinstance(data, dict):
            raise FaultError("faults must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise FaultError(f"unknown fault settings: {', '.join(unknown)}")
        faults = cls(**data)
        _check_number("latency_ms", faults.latency_ms, 0, MAX_LATENCY_MS)
        _check_number("error_rate", faults.error_rate, 0, 1)
        _check_number("trickle_ms", faults.trickle_ms, 0, MAX_TRICKLE_MS)
        _check_number("settle_later_ms", faults.settle_later_ms, 0, MAX_SETTLE_LATER_MS)
        for name in ("hang", "hang_after_commit"):
            if not isinstance(getattr(faults, name), bool):
                raise FaultError(f"{name} must be true or false")
        _check_status("error_status", faults.error_status)
        if faults.retry_after is not None and (
            not _is_int(faults.retry_after) or faults.retry_after < 0
        ):
            raise FaultError("retry_after must be a whole number of seconds or null")
        if not isinstance(faults.script, list | tuple):
            raise FaultError("script must be a list")
        for entry in faults.script:
            if isinstance(entry, str):
                if entry not in SCRIPT_NAMES:
                    raise FaultError(f"unknown script entry {entry!r}")
            else:
                _check_status("script entries", entry)
        return cls(**{**data, "script": tuple(faults.script)})

    def as_dict(self) -> dict:
        return {
            "latency_ms": self.latency_ms,
            "hang": self.hang,
            "hang_after_commit": self.hang_after_commit,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "retry_after": self.retry_after,
            "trickle_ms": self.trickle_ms,
            "settle_later_ms": self.settle_later_ms,
            "script": list(self.script),
        }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name, value, low, high) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not low <= value <= high:
        raise FaultError(f"{name} must be a number from {low} to {high}")


def _check_status(name, value) -> None:
    if not _is_int(value) or not 400 <= value <= 599:
        raise FaultError(f"{name} must be HTTP error statuses (400-599), got {value!r}")


@dataclass(frozen=True)
class Action:
    """What to do with one create request.

    ``kind`` is ``"ok"``, ``"status"`` (answer ``status``), ``"hang_after_commit"`` or a
    script name. ``trickle_s`` spaces the bytes of an ``"ok"`` answer. ``settle_s``,
    when set, records the object ``pending`` and settles it that much later.
    ``released`` is set when the request may stop hanging or trickling.
    """

    kind: str
    latency_s: float
    status: int | None = None
    retry_after: int | None = None
    trickle_s: float = 0.0
    settle_s: float = 0.0
    released: threading.Event | None = None

    @property
    def rejects(self) -> bool:
        """The request is lost before anything is recorded."""
        return self.kind == "status" or self.kind in REJECTING_NAMES


class FaultInjector:
    """The current faults, shared by every handler thread.

    Hanging requests wait on an event that is set whenever the faults change (or the
    server stops), so clearing a hang frees them at once without any polling.
    """

    def __init__(self, faults: Faults | None = None, rng: random.Random | None = None):
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._faults = Faults()
        self._script: deque = deque()
        self._released = threading.Event()
        self.replace(faults or Faults())

    def replace(self, faults: Faults) -> None:
        """Install ``faults`` and free every request hung under the previous ones."""
        with self._lock:
            self._faults = faults
            self._script = deque(faults.script)
            self._released.set()
            self._released = threading.Event()

    def release_all(self) -> None:
        """Free every hung request (the server is stopping)."""
        with self._lock:
            self._released.set()

    def current(self) -> dict:
        with self._lock:
            return {**self._faults.as_dict(), "script": list(self._script)}

    def next_action(self) -> Action:
        """Decide the fate of one create request; consumes one script entry if any."""
        with self._lock:
            faults = self._faults
            entry = self._script.popleft() if self._script else None
            released = self._released
        base = {
            "latency_s": faults.latency_ms / 1000,
            "retry_after": faults.retry_after,
            "settle_s": faults.settle_later_ms / 1000,
        }
        if isinstance(entry, int):
            return Action("status", status=entry, **base)
        if entry is not None:
            return Action(entry, released=released, **base)
        if faults.hang:
            return Action("hang", released=released, **base)
        if faults.hang_after_commit:
            return Action("hang_after_commit", released=released, **base)
        if faults.error_rate and self._rng.random() < faults.error_rate:
            return Action("status", status=faults.error_status, **base)
        if faults.trickle_ms:
            return Action("ok", trickle_s=faults.trickle_ms / 1000, released=released, **base)
        return Action("ok", **base)
