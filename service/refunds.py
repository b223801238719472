"""Refunds over HTTP: ``POST /v1/payments/<id>/refunds`` and ``GET /v1/refunds/<id>``.

As for payments, the views only read the request and render the result; the ceiling,
idempotency and the money rule live in ``refunds``; errors become problem+json in
``service.problems``.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for
from werkzeug.exceptions import NotFound

import payment_handler
from payment_handler import RefundResult
from payment_states import RefundState
from service.auth import require_api_key
from service.payments import read_json_object

bp = Blueprint("refunds", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

FIELDS = frozenset({"amount", "reason", "metadata"})
#: The answer to a refund request by the refund's status; a failed refund is a problem.
CREATED_STATUS = {RefundState.SUCCEEDED: 201, RefundState.PENDING: 202, RefundState.UNKNOWN: 202}


@bp.post("/payments/<payment_id>/refunds")
def create_refund(payment_id: str) -> Response:
    body = read_json_object("refund request", FIELDS)
    result = payment_handler.refund_payment(
        payment_id,
        body.get("amount"),
        idempotency_key=request.headers.get("Idempotency-Key"),
        reason=body.get("reason"),
        metadata=body.get("metadata"),
    )
    return refund_response(result)


@bp.get("/refunds/<refund_id>")
def get_refund(refund_id: str) -> Response:
    result = payment_handler.get_refund(refund_id)
    if result is None:  # the id is not echoed: it may be anything a client typed
        raise NotFound("There is no refund with this id.")
    return refund_response(result, status=200)


def refund_json(result: RefundResult) -> dict:
    """The JSON shape of a refund (amount as a decimal string, like a payment's)."""
    return {
        "id": result.id,
        "payment_id": result.payment_id,
        "status": result.status.value,
        "amount": str(result.amount),
        "amount_minor": result.amount_minor,
        "currency": result.currency,
        "idempotency_key": result.idempotency_key,
        "provider_refund_id": result.provider_refund_id,
        "reason": result.reason,
        "metadata": result.metadata,
        "attempts": result.attempts,
        "failure_code": result.failure_code,
        "failure_message": result.failure_message,
        "created_at": result.created_at.isoformat() if result.created_at else None,
        "updated_at": result.updated_at.isoformat() if result.updated_at else None,
    }


def refund_response(result: RefundResult, status: int | None = None) -> Response:
    """A refund as JSON: 201 succeeded, 202 pending or unknown, unless ``status`` is given."""
    response = jsonify(refund_json(result))
    response.status_code = status or CREATED_STATUS[result.status]
    if response.status_code in (201, 202):
        response.headers["Location"] = url_for("refunds.get_refund", refund_id=result.id)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response
