"""Inbound bearer keys (``API_KEYS``), checked in constant time.

A key is accepted only from ``Authorization: Bearer <key>``. A key in the query string
is refused even when the header is right: URLs end up in access logs, proxies and
browser histories, so such a key must be treated as leaked, not quietly used.
"""

from __future__ import annotations

import hmac
import logging

from flask import current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

log = logging.getLogger(__name__)

#: Query parameters that would carry a credential (compared case-insensitively).
QUERY_CREDENTIALS = frozenset(
    {"api_key", "apikey", "api-key", "key", "access_token", "token", "auth", "authorization"}
)


def require_api_key() -> None:
    """``before_request`` of protected blueprints: 401 unless a configured key is presented."""
    if any(name.lower() in QUERY_CREDENTIALS for name in request.args):
        log.warning("refused a request with a credential in its query string")
        _refuse("API keys are accepted only in the Authorization header, never in the URL.")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        _refuse("Send an API key as 'Authorization: Bearer <key>'.")
    if not key_matches(token, current_app.config["API_KEYS"]):
        _refuse("The API key is not valid.")


def key_matches(presented: str, keys) -> bool:
    """Compare ``presented`` with every key, without stopping at a match.

    ``hmac.compare_digest`` takes time independent of where the strings differ, and
    always comparing with all keys keeps the number of keys and the matching one's
    position out of the timing too.
    """
    presented_bytes = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented_bytes, key.encode())
    return matched


def _refuse(detail: str):
    raise Unauthorized(detail, www_authenticate=WWWAuthenticate("Bearer", {"realm": "payments"}))
