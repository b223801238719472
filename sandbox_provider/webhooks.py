"""Webhook settings and transport: where events go, how each send is signed and POSTed.

Signing follows Standard Webhooks (the ``standardwebhooks`` package, as receivers use):
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers over the exact
body bytes, with a ``whsec_<base64>`` secret. A send follows no redirect and reads a
bounded answer: a provider only wants the status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from numbers import Real
from urllib.parse import urlsplit

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from sandbox_provider.charges import is_int

DEFAULT_MAX_ATTEMPTS = 5
MAX_ATTEMPTS = 20
DEFAULT_BACKOFF_MS = 200
MAX_BACKOFF_S = 5.0
DELIVERY_TIMEOUT_S = 5.0
MAX_ANSWER = 64 * 1024
USER_AGENT = "PaymentSandbox-Webhooks/1.0"


class WebhookError(ValueError):
    """A webhook or redelivery setting the sandbox cannot apply."""


@dataclass(frozen=True)
class WebhookSettings:
    """Where events go: no ``url`` means no events are made."""

    url: str | None = None
    secret: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_ms: float = DEFAULT_BACKOFF_MS

    @classmethod
    def from_mapping(cls, data) -> WebhookSettings:
        """Validate a JSON object; absent keys take their defaults, unknown keys are refused."""
        if not isinstance(data, dict):
            raise WebhookError("webhook settings must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise WebhookError(f"unknown webhook settings: {', '.join(unknown)}")
        settings = cls(**data)
        if settings.url is not None:
            parts = urlsplit(settings.url) if isinstance(settings.url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise WebhookError("url must be an http(s) URL or null")
            if settings.secret is None:
                raise WebhookError("a url needs a secret (whsec_<base64>)")
        if settings.secret is not None:
            _check_secret(settings.secret)
        if not is_int(settings.max_attempts) or not 1 <= settings.max_attempts <= MAX_ATTEMPTS:
            raise WebhookError(f"max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}")
        backoff = settings.backoff_ms
        if isinstance(backoff, bool) or not isinstance(backoff, Real):
            raise WebhookError("backoff_ms must be a number")
        if not 0 <= backoff <= MAX_BACKOFF_S * 1000:
            raise WebhookError(f"backoff_ms must be from 0 to {MAX_BACKOFF_S * 1000:g}")
        return settings

    def as_dict(self) -> dict:
        return {
            "url": self.url,
            "secret": self.secret,
            "max_attempts": self.max_attempts,
            "backoff_ms": self.backoff_ms,
        }


def _check_secret(secret) -> None:
    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise WebhookError("secret must be whsec_<base64>")
    try:
        Webhook(secret)
    except (ValueError, EmptyWebhookSecretError):
        raise WebhookError("secret must be whsec_<base64> of at least one byte") from None


def signed_headers(secret: str, event_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for one send of ``body``."""
    signature = Webhook(secret).sign(event_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def retry_delay(attempt: int, backoff_s: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def post(url: str, body: bytes, headers: dict, timeout: float) -> int:
    """POST once, following no redirect; the status, or ``OSError`` when none came."""
    parts = urlsplit(url)
    connection_class = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        response.read(MAX_ANSWER)
        return response.status
    except HTTPException as exc:  # a garbled answer is no answer
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
