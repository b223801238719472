"""The transition table: every status change it allows, and every one it refuses."""

from __future__ import annotations

import itertools

import pytest

from payment_states import (
    RESUBMITTABLE,
    FailureCode,
    PaymentStatus,
    TransitionRefused,
    check_transition,
    is_resubmittable,
)

P, S, F, U = (
    PaymentStatus.PENDING,
    PaymentStatus.SUCCEEDED,
    PaymentStatus.FAILED,
    PaymentStatus.UNKNOWN,
)

ALLOWED = {
    (P, S, None),
    (P, F, None),
    (P, U, None),
    (U, S, None),
    (U, F, None),
    (U, P, None),
    *((F, P, code) for code in RESUBMITTABLE),
    (F, S, FailureCode.NOT_RECEIVED),
}
CODES = [None, "card_declined", "charge_failed", *sorted(RESUBMITTABLE)]


@pytest.mark.parametrize(
    ("source", "target", "code"),
    [
        (source, target, code)
        for source, target in itertools.product(PaymentStatus, repeat=2)
        for code in (CODES if source is F else [None])
    ],
)
def test_only_the_documented_transitions_are_allowed(source, target, code):
    if (source, target, code) in ALLOWED:
        check_transition(source, target, code)
    else:
        with pytest.raises(TransitionRefused):
            check_transition(source, target, code)


def test_succeeded_is_final():
    for target in PaymentStatus:
        with pytest.raises(TransitionRefused):
            check_transition(S, target, None)


@pytest.mark.parametrize(
    ("status", "code", "resubmittable"),
    [
        (U, None, True),
        (F, "provider_unavailable", True),
        (F, "not_received", True),
        (F, "card_declined", False),
        (F, "charge_failed", False),
        (S, None, False),
        (P, None, False),
    ],
)
def test_only_unknown_and_never_charged_failures_are_resubmitted(status, code, resubmittable):
    assert is_resubmittable(status, code) is resubmittable


def test_the_schema_allows_exactly_these_statuses():
    import database_config

    assert set(database_config.PAYMENT_STATUSES) == {s.value for s in PaymentStatus}
