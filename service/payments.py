"""``/v1/payments``: take a payment and look one up (Bearer key required).

The view only reads the request and renders the result: validation, idempotency,
replays and conflicts all live in ``payment_handler``; errors become problem+json in
``service.problems``.
"""

from __future__ import annotations

import json
from decimal import Decimal

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import (
    BadRequest,
    ClientDisconnected,
    NotFound,
    RequestEntityTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

import payment_handler
from payment_handler import InvalidPaymentRequest, PaymentResult
from payment_states import PaymentStatus
from service.auth import require_api_key

bp = Blueprint("payments", __name__, url_prefix="/v1/payments")
bp.before_request(require_api_key)

FIELDS = frozenset(
    {"amount", "currency", "payment_method", "transaction_id", "description", "metadata"}
)
#: The answer to a payment request by the payment's status; a failed payment is a problem
#: (402 declined, 503 not charged), never a payment body.
CREATED_STATUS = {
    PaymentStatus.SUCCEEDED: 201,
    PaymentStatus.PENDING: 202,
    PaymentStatus.UNKNOWN: 202,
}


@bp.post("")
def create_payment() -> Response:
    body = read_payment_request()
    result = payment_handler.process_payment(
        body["amount"],
        body.get("payment_method", "card"),
        body.get("transaction_id"),
        currency=body.get("currency"),
        description=body.get("description"),
        metadata=body.get("metadata"),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    return payment_response(result)


@bp.get("/<payment_id>")
def get_payment(payment_id: str) -> Response:
    result = payment_handler.get_payment(payment_id)
    if result is None:  # the id is not echoed: it may be anything a client typed
        raise NotFound("There is no payment with this id.")
    return payment_response(result, status=200)


def payment_json(result: PaymentResult) -> dict:
    """The JSON shape of a payment (amount as a decimal string: no float money)."""
    return {
        "id": result.id,
        "status": result.status.value,
        "amount": str(result.amount),
        "amount_minor": result.amount_minor,
        "amount_refunded": str(result.amount_refunded),
        "currency": result.currency,
        "payment_method": result.payment_method,
        "transaction_id": result.transaction_id,
        "idempotency_key": result.idempotency_key,
        "provider_charge_id": result.provider_charge_id,
        "attempts": result.attempts,
        "description": result.description,
        "metadata": result.metadata,
        "failure_code": result.failure_code,
        "failure_message": result.failure_message,
        "created_at": result.created_at.isoformat() if result.created_at else None,
        "updated_at": result.updated_at.isoformat() if result.updated_at else None,
    }


def payment_response(result: PaymentResult, status: int | None = None) -> Response:
    """A payment as JSON: 201 succeeded, 202 pending or unknown, unless ``status`` is given.

    A replay of an earlier request says so in ``Idempotent-Replayed``.
    """
    response = jsonify(payment_json(result))
    response.status_code = status or CREATED_STATUS[result.status]
    if response.status_code in (201, 202):
        response.headers["Location"] = url_for("payments.get_payment", payment_id=result.id)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def read_payment_request() -> dict:
    """The JSON object of a payment request: 415, 413, 400 or 422 when it is not one."""
    body = read_json_object("payment request", FIELDS)
    if "amount" not in body:
        raise InvalidPaymentRequest("amount is required.", code="invalid_amount")
    return body


def read_json_object(what: str, fields: frozenset[str]) -> dict:
    """The request's JSON object with only ``fields`` (``what`` names it in errors):
    415, 413, 400 or 422.

    Numbers are parsed as ``Decimal`` so an amount of 25.99 is exactly 25.99.
    """
    if request.mimetype != "application/json" and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(f"Send the {what} as 'Content-Type: application/json'.")
    raw = read_raw_body()
    try:
        body = json.loads(raw, parse_float=Decimal, parse_constant=_refuse_constant)
        # "\ud800" escapes decode to lone surrogates, which are not text (UnicodeEncodeError).
        json.dumps(body, ensure_ascii=False, default=str).encode()
        if isinstance(body, dict) and body.get("metadata") is not None:
            body["metadata"] = _plain_json(body["metadata"])
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidPaymentRequest("The request body must be a JSON object.", code="invalid_body")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidPaymentRequest(
            f"Unknown fields: {', '.join(unknown)[:200]}.", code="unknown_field"
        )
    return body


def read_raw_body() -> bytes:
    """The request body: 413 when it is over ``MAX_CONTENT_LENGTH``, 408 when it stalls.

    werkzeug answers 413 for a declared Content-Length over the limit, but a chunked body
    (no Content-Length) is only cut at the limit, silently: a valid JSON prefix padded
    past 64 KiB would be charged. So a chunked body is read up to one byte past the limit.
    A client that stops sending mid-body would hold this worker thread for as long as it
    keeps the connection open; the socket gets a read timeout for the body instead.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:  # gunicorn makes it blocking again for the next request
        sock.settimeout(current_app.config["BODY_READ_TIMEOUT"])
    try:
        if request.content_length is not None:
            return request.get_data(cache=False)
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raw = request.environ["wsgi.input"].read(limit + 1)
    except (OSError, ClientDisconnected) as exc:
        # werkzeug reports a timed-out read as a disconnect; the socket says which it was
        if not isinstance(exc, TimeoutError) and not isinstance(exc.__context__, TimeoutError):
            raise
        raise RequestTimeout(
            f"The request body did not arrive within {current_app.config['BODY_READ_TIMEOUT']}s."
        ) from None
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _plain_json(value):
    """Metadata is opaque JSON: its numbers go back to plain floats, as the store keeps them."""
    return json.loads(json.dumps(value, default=float))
