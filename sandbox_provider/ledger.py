"""The sandbox's memory: every charge it accepted and the idempotency key that made it.

A key is reserved while its first request is processed, so a concurrent repeat gets a
conflict instead of a second charge; once the charge is recorded the key stores the
reply, which every repeat with the same body gets back. One lock guards it all: the
sandbox serves hundreds of requests a second, not millions.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from sandbox_provider.charges import ChargeRequest, charge_reply, make_charge

NEW = "new"
REPLAY = "replay"
IN_PROGRESS = "in_progress"
REUSED = "reused"


@dataclass(eq=False)
class Reservation:
    """One idempotency key: its request's fingerprint and, once recorded, the reply."""

    fingerprint: str
    reply: tuple[int, dict] | None = None


class Ledger:
    def __init__(self):
        self._lock = threading.Lock()
        self._charges: dict[str, dict] = {}
        self._keys: dict[str, Reservation] = {}
        self._charge_by_key: dict[str, str] = {}

    def begin(self, key: str, fingerprint: str) -> tuple[str, Reservation]:
        """Reserve ``key`` (``NEW``) or say why not: ``REPLAY``, ``IN_PROGRESS``, ``REUSED``."""
        with self._lock:
            reservation = self._keys.get(key)
            if reservation is None:
                reservation = self._keys[key] = Reservation(fingerprint)
                return NEW, reservation
            if reservation.fingerprint != fingerprint:
                return REUSED, reservation
            if reservation.reply is None:
                return IN_PROGRESS, reservation
            return REPLAY, reservation

    def release(self, key: str, reservation: Reservation) -> None:
        """Forget a reservation whose request a fault lost, so the key can be retried."""
        with self._lock:
            if self._keys.get(key) is reservation:
                del self._keys[key]

    def commit(self, key: str, reservation: Reservation, request: ChargeRequest):
        """Record the charge for a reserved key; its reply is then ``reservation.reply``."""
        charge = make_charge(request, key)
        reply = charge_reply(charge)
        with self._lock:
            self._charges[charge["id"]] = charge
            self._charge_by_key[key] = charge["id"]
            reservation.reply = reply
        return charge

    def get(self, charge_id: str) -> dict | None:
        with self._lock:
            return self._charges.get(charge_id)

    def by_key(self, key: str) -> list[dict]:
        with self._lock:
            charge_id = self._charge_by_key.get(key)
            return [self._charges[charge_id]] if charge_id else []

    def charges(self) -> list[dict]:
        with self._lock:
            return list(self._charges.values())

    def summary(self) -> dict:
        """Counts for the control endpoint's state."""
        with self._lock:
            totals: Counter[str] = Counter()
            for charge in self._charges.values():
                if charge["status"] == "succeeded":
                    totals[charge["currency"]] += charge["amount"]
            in_flight = sum(1 for r in self._keys.values() if r.reply is None)
            return {
                "charges": len(self._charges),
                "succeeded_total_minor": dict(totals),
                "in_flight": in_flight,
            }

    def clear(self) -> None:
        with self._lock:
            self._charges.clear()
            self._keys.clear()
            self._charge_by_key.clear()
