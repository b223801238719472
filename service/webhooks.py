"""``POST /v1/webhooks/<provider>``: provider events, authenticated by their signature.

No bearer key: the provider signs each delivery with ``PAYMENT_WEBHOOK_SECRET``, and the
signature is checked before the body is read (``provider_events.WebhookReceiver``). A
bad, missing or stale signature is a 400 with nothing stored; a verified event is
stored once and answered 200 at once (also when it was delivered before), then applied
in the background.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import BadRequest, NotFound

import payment_handler
from provider_events import EventResult, get_webhook_receiver
from providers import PROVIDER_NAMES
from providers.base import InvalidEvent
from service.payments import read_raw_body

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks")


@bp.post("/<provider>")
def receive_event(provider: str) -> Response:
    service = payment_handler.get_payment_service()
    if provider not in PROVIDER_NAMES or provider != service.settings.payment_provider:
        raise NotFound("This service takes no events from that provider.")
    try:
        result = get_webhook_receiver(service).receive(provider, read_raw_body(), request.headers)
    except InvalidEvent as exc:
        # The cause only: never the secret, the signature or the body.
        log.warning("refused a %s webhook delivery: %s", provider, exc)
        raise BadRequest(f"The event was refused: {exc}.") from None
    return jsonify({"received": True, "duplicate": result is EventResult.DUPLICATE})
