"""The one error hierarchy of the payment path (re-exported by ``payment_handler``).

It lives in its own module so that the store (``database_config``), the provider
adapters and the transport can raise it without importing ``payment_handler``. Errors are
translated into these at the boundaries only: a provider's answers in its adapter
(``providers/``), transport failures in ``payment_client``; and ``PaymentError`` to
problem+json in the HTTP app (``service/problems.py``).
"""

from __future__ import annotations

import requests


class PaymentError(Exception):
    """Root of every error ``process_payment`` and ``refund_payment`` raise.

    ``code`` is a stable machine-readable reason; ``payment`` is the stored
    ``PaymentResult`` and ``refund`` the stored ``RefundResult`` when there is one;
    ``http_status`` is what the HTTP API answers.
    """

    http_status = 500
    code = "payment_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        payment=None,
        refund=None,
        attempts=None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.payment = payment
        self.refund = refund
        self.attempts = list(attempts or [])

    @property
    def payment_id(self) -> str | None:
        return getattr(self.payment, "id", None) or getattr(self.refund, "payment_id", None)

    @property
    def refund_id(self) -> str | None:
        return getattr(self.refund, "id", None)

    def __str__(self) -> str:
        where = f"refund {self.refund_id}" if self.refund_id else f"payment {self.payment_id}"
        return f"[{where}] {self.message}" if self.payment_id else self.message


class InvalidPaymentRequest(PaymentError, ValueError):
    """Bad input: nothing was sent to the provider and nothing was stored."""

    http_status = 422
    code = "invalid_request"


class IdempotencyKeyReused(InvalidPaymentRequest):
    """The key was used before for a payment with a different amount, currency or body."""

    code = "idempotency_key_reused"


class PaymentInProgress(PaymentError):
    """Another call with the same key is still in flight; retry later with the same key."""

    http_status = 409
    code = "payment_in_progress"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class PaymentDeclined(PaymentError):
    """The provider refused the charge (for example ``card_declined``); stored as ``failed``."""

    http_status = 402
    code = "card_declined"


class RefundDeclined(PaymentDeclined):
    """The provider refused or failed the refund; stored as ``failed``, nothing refunded."""

    code = "refund_failed"


class PaymentNotFound(PaymentError, LookupError):
    """No payment has this id."""

    http_status = 404
    code = "payment_not_found"


class PaymentProviderError(PaymentError):
    """The provider rejected our request itself (400/401/403/404/422): a bug or bad credentials.

    Not retried. The charge did not happen; the payment is stored as ``failed``.
    """

    http_status = 502
    code = "provider_rejected_request"


class PaymentServiceUnavailable(PaymentError, requests.exceptions.ConnectionError):
    """The charge certainly did not happen; retrying later (same key) is safe.

    Raised for connection refused, connect timeout, breaker open, outbound pool busy and
    retries exhausted on retryable statuses. ``retry_after`` is in seconds.
    """

    http_status = 503
    code = "provider_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class PaymentOutcomeUnknown(PaymentError, requests.exceptions.ConnectionError):
    """The request may have reached the provider (e.g. read timeout after sending).

    Stored as ``unknown``; ``reconcile_payments`` settles it, and retrying with the same
    ``transaction_id`` is safe: the provider deduplicates by Idempotency-Key.
    """

    http_status = 202
    code = "outcome_unknown"


class RefundNotAllowed(PaymentError):
    """The refund cannot be made: the payment is not ``succeeded`` (``payment_not_refundable``,
    HTTP 409), or the amount is more than is left to refund (``amount_exceeds_refundable``,
    HTTP 422). Nothing was refunded."""

    http_status = 409
    code = "payment_not_refundable"

    def __init__(self, message: str, **kwargs):
        super().__init__(message, **kwargs)
        if self.code == "amount_exceeds_refundable":
            self.http_status = 422


class DatabaseUnavailable(PaymentError):
    """The payment store could not be reached, or its pool stayed exhausted.

    Raised before anything is charged (the pending row is written before the provider
    is called), so the caller may retry with the same key.
    """

    http_status = 503
    code = "database_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
