"""Provider events (DESIGN.md section 11): made when a charge or refund settles, signed,
POSTed to the configured URL and retried as a real provider does.

An event exists only if a webhook URL is configured when its charge or refund reaches
``succeeded`` or ``failed`` (at once, or when a pending one settles). Its body is
serialised once: every attempt and redelivery sends the same bytes under the same
``webhook-id`` (the event id), signed with the ``webhook-timestamp`` of that send, so a
receiver can verify each and deduplicate by id. Events and their attempts stay listed
so tests can compare them with what their receiver saw.

Deliveries run on their own scheduler thread, one at a time, in the order queued. A
failure (no 2xx answer within ``DELIVERY_TIMEOUT_S``, or no answer at all) is retried
``backoff_ms`` later, doubling per attempt up to ``MAX_BACKOFF_S``, ``max_attempts`` in
all. A redelivery asked for by the control is sent once, never retried.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from sandbox_provider.charges import is_int
from sandbox_provider.scheduler import Scheduler
from sandbox_provider.webhooks import (
    DELIVERY_TIMEOUT_S,
    WebhookError,
    WebhookSettings,
    post,
    retry_delay,
    signed_headers,
)

MAX_COPIES = 10


@dataclass(frozen=True)
class Redelivery:
    """Stored events to send again: ``ids`` (all when ``None``), each ``copies`` times,
    in a random order if ``shuffle``, stamped ``timestamp`` (unix seconds; now when
    ``None``: an old one makes a correctly signed but stale event)."""

    ids: tuple[str, ...] | None = None
    copies: int = 1
    shuffle: bool = False
    timestamp: int | None = None

    @classmethod
    def from_mapping(cls, data) -> Redelivery:
        if not isinstance(data, dict):
            raise WebhookError("a redelivery must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise WebhookError(f"unknown redelivery settings: {', '.join(unknown)}")
        ids = data.get("ids")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            raise WebhookError("ids must be a list of event ids or null")
        redelivery = cls(**{**data, "ids": None if ids is None else tuple(ids)})
        if not is_int(redelivery.copies) or not 1 <= redelivery.copies <= MAX_COPIES:
            raise WebhookError(f"copies must be a whole number from 1 to {MAX_COPIES}")
        if not isinstance(redelivery.shuffle, bool):
            raise WebhookError("shuffle must be true or false")
        if redelivery.timestamp is not None and (
            not is_int(redelivery.timestamp) or redelivery.timestamp < 0
        ):
            raise WebhookError("timestamp must be unix seconds or null")
        return redelivery


def make_event(obj: dict, now: float) -> dict:
    """The event announcing ``obj`` (a charge or refund) in its current status."""
    return {
        "id": f"evt_{secrets.token_hex(12)}",
        "type": f"{obj['object']}.{obj['status']}",
        "created": int(now),
        "data": {"object": obj},
    }


@dataclass(eq=False)
class EventRecord:
    """One event, its serialised body and what became of each send.

    ``status`` is ``pending`` (queued or between retries), ``delivered``, ``failed``
    (attempts spent, or no URL any more) or ``dropped`` (the delivery queue was full);
    redeliveries never change it.
    """

    event: dict
    body: str
    status: str = "pending"
    attempts: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"event": self.event, "status": self.status, "attempts": list(self.attempts)}


class EventHub:
    """Makes, stores and delivers events.

    ``settings`` are the webhook settings at start (a reset returns to them); ``post``
    sends one request (see :func:`post`); ``scheduler`` runs the sends; ``clock`` gives
    unix time; ``rng`` shuffles redeliveries.
    """

    def __init__(self, settings=None, *, post=post, scheduler=None, clock=time.time, rng=None):
        self._initial = settings or WebhookSettings()
        self._settings = self._initial
        self._post = post
        self._scheduler = scheduler or Scheduler("sandbox-webhooks")
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._records: dict[str, EventRecord] = {}

    def configure(self, settings: WebhookSettings) -> None:
        """Send from now on with ``settings``; queued sends and retries use them too."""
        with self._lock:
            self._settings = settings

    def settings(self) -> WebhookSettings:
        with self._lock:
            return self._settings

    def emit(self, obj: dict) -> None:
        """Make and queue the event for ``obj``, if a URL is configured. Never blocks."""
        with self._lock:
            if self._settings.url is None:
                return
            event = make_event(obj, self._clock())
            record = self._records[event["id"]] = EventRecord(event, json.dumps(event))
            self._queue(record, 0.0, attempt=1)

    def _queue(self, record: EventRecord, delay_s: float, *, attempt: int) -> None:
        send = partial(self._send, record, attempt=attempt)
        if not self._scheduler.schedule(delay_s, send):
            record.status = "dropped"

    def redeliver(self, redelivery: Redelivery) -> list[str]:
        """Queue the chosen events again; the ids in the order they will be sent.

        Raises ``KeyError`` naming an unknown event id.
        """
        with self._lock:
            ids = list(self._records) if redelivery.ids is None else list(redelivery.ids)
            for event_id in ids:
                if event_id not in self._records:
                    raise KeyError(event_id)
            order = [event_id for event_id in ids for _ in range(redelivery.copies)]
            if redelivery.shuffle:
                self._rng.shuffle(order)
            queued = []
            for event_id in order:
                send = partial(self._send, self._records[event_id], timestamp=redelivery.timestamp)
                if self._scheduler.schedule(0.0, send):
                    queued.append(event_id)
            return queued

    def _send(self, record: EventRecord, attempt: int | None = None, timestamp=None) -> None:
        """One send; ``attempt`` numbers a delivery's tries, ``None`` marks a redelivery."""
        with self._lock:
            settings = self._settings
            if self._records.get(record.event["id"]) is not record:
                return  # forgotten by a reset
        sent_at = self._clock()
        stamp = int(sent_at) if timestamp is None else timestamp
        status_code = error = None
        if settings.url is None:
            error = "no webhook url configured"
        else:
            headers = signed_headers(settings.secret, record.event["id"], stamp, record.body)
            try:
                status_code = self._post(
                    settings.url, record.body.encode(), headers, DELIVERY_TIMEOUT_S
                )
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        delivered = status_code is not None and 200 <= status_code < 300
        with self._lock:
            if self._records.get(record.event["id"]) is not record:
                return
            record.attempts.append(
                {
                    "attempt": attempt,
                    "redelivery": attempt is None,
                    "at": sent_at,
                    "webhook_timestamp": stamp,
                    "status_code": status_code,
                    "error": error,
                }
            )
            if attempt is None:
                return
            if delivered:
                record.status = "delivered"
            elif attempt >= settings.max_attempts or settings.url is None:
                record.status = "failed"
            else:
                delay_s = retry_delay(attempt, settings.backoff_ms / 1000)
                self._queue(record, delay_s, attempt=attempt + 1)

    def events(self) -> list[dict]:
        with self._lock:
            return [record.as_dict() for record in self._records.values()]

    def summary(self) -> dict:
        """Counts for the control endpoint's state."""
        with self._lock:
            pending = sum(1 for record in self._records.values() if record.status == "pending")
            return {"events": len(self._records), "events_pending": pending}

    def clear(self) -> None:
        """Forget every event, drop queued sends, return to the settings at start."""
        with self._lock:
            self._records.clear()
            self._settings = self._initial
            self._scheduler.clear()

    def close(self) -> None:
        self._scheduler.stop()
