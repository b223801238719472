"""The sandbox's memory: every charge and refund it accepted and the key that made it.

A key is reserved while its first request is processed, so a concurrent repeat gets a
conflict instead of a second charge; once the charge or refund is recorded the key
stores the reply, which every repeat with the same body gets back (a replay is the first
answer, even after the object settled; lookups show the object as it is now). Charges
and refunds share one key space, as at a real provider.

Recorded objects are never mutated: a change stores a new dict, so a reply or a lookup
being serialised in another thread never sees half an update. One lock guards it all,
which is what makes a refund's check of the amount left and its record one step: the
sandbox serves hundreds of requests a second, not millions.

``on_settled(obj)`` is called, under the lock so events keep the ledger's order, for
every charge or refund recorded or changed in a final status (``succeeded``/``failed``);
it must only record and queue, never block or call back into the ledger.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from sandbox_provider.charges import (
    ChargeRequest,
    charge_outcome,
    charge_reply,
    make_charge,
    settled,
)
from sandbox_provider.refunds import (
    COUNTED,
    RefundRefused,
    RefundRequest,
    make_refund,
    refund_outcome,
    settled_refund,
)

NEW = "new"
REPLAY = "replay"
IN_PROGRESS = "in_progress"
REUSED = "reused"
FINAL = frozenset({"succeeded", "failed"})


@dataclass(eq=False)
class Reservation:
    """One idempotency key: its request's fingerprint and, once recorded, the reply."""

    fingerprint: str
    reply: tuple[int, dict] | None = None


class Ledger:
    def __init__(self, on_settled=None):
        self._lock = threading.Lock()
        self._on_settled = on_settled or (lambda obj: None)
        self._keys: dict[str, Reservation] = {}
        self._charges: dict[str, dict] = {}
        self._charge_by_key: dict[str, str] = {}
        self._refunds: dict[str, dict] = {}
        self._refund_by_key: dict[str, str] = {}

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
        """Forget a reservation whose request was lost or refused, so the key can be retried."""
        with self._lock:
            if self._keys.get(key) is reservation:
                del self._keys[key]

    def commit_charge(
        self, key: str, reservation: Reservation, request: ChargeRequest, settle_later: bool
    ) -> dict:
        """Record the charge for a reserved key; its reply is then ``reservation.reply``."""
        charge = make_charge(request, key, settle_later)
        reply = charge_reply(charge)
        with self._lock:
            self._charges[charge["id"]] = charge
            self._charge_by_key[key] = charge["id"]
            reservation.reply = reply
            self._announce(charge)
        return charge

    def commit_refund(
        self, key: str, reservation: Reservation, request: RefundRequest, settle_later: bool
    ) -> dict:
        """Check the charge can give ``request.amount`` back and record the refund, at once.

        Raises :class:`RefundRefused` (and records nothing) for an unknown charge, a charge
        that did not succeed, or an amount over what is left to refund.
        """
        with self._lock:
            charge = self._charges.get(request.charge)
            if charge is None:
                raise RefundRefused(404, "resource_missing", f"no such charge: {request.charge}")
            if charge["status"] != "succeeded":
                raise RefundRefused(
                    400, "charge_not_refundable", f"the charge is {charge['status']}"
                )
            left = charge["amount"] - charge["amount_refunded"]
            amount = left if request.amount is None else request.amount
            if not 0 < amount <= left:
                raise RefundRefused(
                    400,
                    "amount_too_large",
                    f"{charge['id']} has {left} left to refund, asked for {amount}",
                )
            refund = make_refund(request, charge, amount, key, settle_later)
            self._refunds[refund["id"]] = refund
            self._refund_by_key[key] = refund["id"]
            if refund["status"] in COUNTED:
                self._add_refunded(charge, amount)
            reservation.reply = (200, refund)
            self._announce(refund)
        return refund

    def settle_charge(self, charge_id: str, status=None, failure_code=None, failure_message=None):
        """Give a charge its final ``status``; ``None`` settles a pending one as its method says.

        Returns the charge as it now is, or ``None`` if there is no such charge.
        """
        with self._lock:
            charge = self._charges.get(charge_id)
            if charge is None:
                return None
            if status is None:
                if charge["status"] != "pending":
                    return charge  # the settle control got there first
                status, failure_code, failure_message = charge_outcome(charge)
            if status == charge["status"]:
                return charge
            charge = self._charges[charge_id] = settled(
                charge, status, failure_code, failure_message
            )
            self._announce(charge)
            return charge

    def settle_refund(self, refund_id: str, status=None, failure_reason=None):
        """Give a refund its final ``status``; ``None`` settles a pending one as its charge says.

        A failed refund stays failed (:class:`RefundRefused`): turning it back could take
        more than the charge has left. Returns the refund, or ``None`` if there is none.
        """
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None:
                return None
            charge = self._charges[refund["charge"]]
            if status is None:
                if refund["status"] != "pending":
                    return refund
                status, failure_reason = refund_outcome(charge)
            if status == refund["status"]:
                return refund
            if refund["status"] == "failed":
                raise RefundRefused(400, "refund_not_settleable", "a failed refund stays failed")
            if status == "failed":
                self._add_refunded(charge, -refund["amount"])
            refund = self._refunds[refund_id] = settled_refund(refund, status, failure_reason)
            self._announce(refund)
            return refund

    def _add_refunded(self, charge: dict, amount: int) -> None:
        self._charges[charge["id"]] = {
            **charge,
            "amount_refunded": charge["amount_refunded"] + amount,
        }

    def _announce(self, obj: dict) -> None:
        if obj["status"] in FINAL:
            self._on_settled(obj)

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

    def refund(self, refund_id: str) -> dict | None:
        with self._lock:
            return self._refunds.get(refund_id)

    def refunds_by_key(self, key: str) -> list[dict]:
        with self._lock:
            refund_id = self._refund_by_key.get(key)
            return [self._refunds[refund_id]] if refund_id else []

    def refunds(self) -> list[dict]:
        with self._lock:
            return list(self._refunds.values())

    def books(self) -> dict:
        """Every charge and refund, read under one lock so they balance."""
        with self._lock:
            return {"data": list(self._charges.values()), "refunds": list(self._refunds.values())}

    def summary(self) -> dict:
        """Counts for the control endpoint's state."""
        with self._lock:
            charged: Counter[str] = Counter()
            refunded: Counter[str] = Counter()
            for charge in self._charges.values():
                if charge["status"] == "succeeded":
                    charged[charge["currency"]] += charge["amount"]
            for refund in self._refunds.values():
                if refund["status"] == "succeeded":
                    refunded[refund["currency"]] += refund["amount"]
            in_flight = sum(1 for r in self._keys.values() if r.reply is None)
            return {
                "charges": len(self._charges),
                "refunds": len(self._refunds),
                "succeeded_total_minor": dict(charged),
                "refunded_total_minor": dict(refunded),
                "in_flight": in_flight,
            }

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._charges.clear()
            self._charge_by_key.clear()
            self._refunds.clear()
            self._refund_by_key.clear()
