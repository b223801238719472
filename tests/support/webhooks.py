"""Sign sandbox events the way the sandbox does (Standard Webhooks), for tests that post
events themselves: crafted, stale, tampered or replayed ones."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def signed(secret: str, event: dict, *, at: datetime | None = None) -> tuple[bytes, dict]:
    """``event`` as a delivery body and its Standard Webhooks headers, signed at ``at``."""
    at = at or datetime.now(UTC)
    body = json.dumps(event)
    headers = {
        "webhook-id": event["id"],
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event["id"], at, body),
        "Content-Type": "application/json",
    }
    return body.encode(), headers
