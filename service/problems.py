"""RFC 9457 problem details: the one place errors become HTTP responses.

Every error the API answers is ``application/problem+json`` with ``type``, ``title``,
``status`` and ``detail``, plus ``code`` (stable, machine-readable) and ``request_id``,
and ``payment_id`` (``refund_id``) when a payment (refund) is involved: werkzeug's own
4xx, ``PaymentError``s and unexpected exceptions alike, never an HTML page or a traceback.

The library's messages for 5xx payment errors name internal hosts, ports and pool sizes:
they are logged, and the client gets a fixed text saying what is safe to do next.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from payment_handler import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentError,
    PaymentInProgress,
    PaymentNotFound,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
from service import payments, refunds
from service.request_id import current_request_id

log = logging.getLogger(__name__)

PROBLEM_MIMETYPE = "application/problem+json"
#: Problem types are not meant to be dereferenced, hence a tag URI (RFC 9457 section 3.1.1).
DEFAULT_TYPE_BASE = "tag:payment-service,2025:problem:"
RETRY_SAFELY = (
    "Retry after Retry-After seconds with the same Idempotency-Key: it never happens twice."
)
INTERNAL_ERROR_DETAIL = (
    "The server failed to process the request; the error was logged. A payment request may "
    "be retried with the same Idempotency-Key: it is never charged twice."
)

#: Problem type slug and title per error class; the most specific class in the MRO wins.
PAYMENT_PROBLEMS: dict[type[PaymentError], tuple[str, str]] = {
    IdempotencyKeyReused: ("idempotency-key-reused", "Idempotency key reused"),
    InvalidPaymentRequest: ("invalid-payment-request", "Invalid payment request"),
    PaymentInProgress: ("payment-in-progress", "Payment in progress"),
    RefundDeclined: ("refund-declined", "Refund declined"),
    PaymentDeclined: ("payment-declined", "Payment declined"),
    RefundNotAllowed: ("refund-not-allowed", "Refund not allowed"),
    PaymentNotFound: ("payment-not-found", "Payment not found"),
    PaymentProviderError: ("provider-error", "Payment provider error"),
    PaymentServiceUnavailable: ("provider-unavailable", "Payment provider unavailable"),
    PaymentOutcomeUnknown: ("outcome-unknown", "Payment outcome unknown"),
    DatabaseUnavailable: ("store-unavailable", "Payment store unavailable"),
    PaymentError: ("payment-error", "Payment error"),
}
#: What a client is told instead of the library's message, for server-side failures.
PUBLIC_DETAILS: dict[type[PaymentError], str] = {
    PaymentServiceUnavailable: "The payment provider is unavailable and nothing was {done}. "
    + RETRY_SAFELY,
    DatabaseUnavailable: "The payment store is unavailable. " + RETRY_SAFELY,
    PaymentProviderError: "The payment provider refused the request and nothing was {done}; "
    "the error was logged for the operators.",
}


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(PaymentError, payment_error)
    app.register_error_handler(Exception, unexpected_error)


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    code: str | None = None,
    headers=None,
    **extensions,
) -> Response:
    """A problem+json response; ``None`` extension members are left out."""
    body = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": current_request_id(),
        **extensions,
    }
    body = {name: value for name, value in body.items() if value is not None}
    return current_app.response_class(
        current_app.json.dumps(body) + "\n",
        status=status,
        headers=headers,
        mimetype=PROBLEM_MIMETYPE,
    )


def http_error(exc: HTTPException) -> Response:
    """werkzeug's own errors (404, 405, 413, 415, 400 ...) as problems, headers kept."""
    if exc.code >= 500:
        return _internal_error()
    headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
    detail = exc.description
    if isinstance(exc, RequestEntityTooLarge):
        detail = f"Request bodies are limited to {current_app.config['MAX_CONTENT_LENGTH']} bytes."
    code = exc.name.lower().replace(" ", "_").replace("'", "")
    return problem(exc.code, detail, title=exc.name, code=code, headers=headers)


def payment_error(exc: PaymentError) -> Response:
    """A ``PaymentError`` as its ``http_status``; an unknown outcome is a 202 payment
    (or refund).

    An unknown outcome without a payment (refund) that is still ``pending``/``unknown``
    (not recorded, or settled otherwise meanwhile) is a 502 problem: an operator must look.
    """
    if isinstance(exc, PaymentOutcomeUnknown):
        if exc.refund is not None and exc.refund.status in refunds.CREATED_STATUS:
            return refunds.refund_response(exc.refund)
        if (
            exc.refund is None
            and exc.payment is not None
            and exc.payment.status in payments.CREATED_STATUS
        ):
            return payments.payment_response(exc.payment)
    slug, title = _lookup(PAYMENT_PROBLEMS, exc)
    status = exc.http_status if exc.http_status >= 400 else 502
    public = _lookup(PUBLIC_DETAILS, exc)
    if public is not None:
        public = public.format(done="refunded" if request.blueprint == "refunds" else "charged")
    if status >= 500:
        log.warning("payment request failed (%s): %s", exc.code, exc.message)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if getattr(exc.refund or exc.payment, "replayed", False):
        headers["Idempotent-Replayed"] = "true"
    return problem(
        status,
        public or exc.message,
        title=title,
        type_=current_app.config["PROBLEM_TYPE_BASE"] + slug,
        code=exc.code,
        headers=headers,
        payment_id=exc.payment_id,
        refund_id=exc.refund_id,
    )


def unexpected_error(exc: Exception) -> Response:
    """A bug: log the traceback, answer a bare 500."""
    log.error("unhandled error serving %s %s", request.method, request.path, exc_info=exc)
    return _internal_error()


def _internal_error() -> Response:
    return problem(500, INTERNAL_ERROR_DETAIL, code="internal_error")


def _lookup(table: dict, exc: PaymentError):
    return next((table[cls] for cls in type(exc).__mro__ if cls in table), None)
