"""Sandbox events: settings, signatures, retry timing, delivery and redelivery, offline.

The hub runs on a scheduler the test steps by hand and a ``post`` that answers from a
script, so every retry and redelivery is observed without a socket or a clock.
"""

from __future__ import annotations

import base64
import random
import time

import pytest
from standardwebhooks.webhooks import Webhook

from sandbox_provider.events import EventHub, Redelivery
from sandbox_provider.webhooks import (
    MAX_BACKOFF_S,
    WebhookError,
    WebhookSettings,
    retry_delay,
    signed_headers,
)

SECRET = "whsec_" + base64.b64encode(b"sandbox-unit-test-secret").decode()
URL = "http://127.0.0.1:9/hook"
CHARGE = {"id": "ch_1", "object": "charge", "status": "succeeded", "idempotency_key": "k"}


class SteppedScheduler:
    """Queues tasks; the test runs them one at a time and sees each delay."""

    def __init__(self, capacity=100):
        self.capacity = capacity
        self.tasks: list = []

    def schedule(self, delay_s, task) -> bool:
        if len(self.tasks) >= self.capacity:
            return False
        self.tasks.append((delay_s, task))
        return True

    def run_next(self) -> float:
        delay_s, task = self.tasks.pop(0)
        task()
        return delay_s

    def clear(self):
        self.tasks.clear()

    def stop(self):
        self.tasks.clear()


class ScriptedPost:
    """Answers each send with the next status; an exception is raised, a callable called."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.sent: list[tuple[str, bytes, dict]] = []

    def __call__(self, url, body, headers, timeout):
        self.sent.append((url, body, headers))
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer


def make_hub(*answers, scheduler=None, **settings):
    post = ScriptedPost(*answers)
    scheduler = scheduler or SteppedScheduler()
    hub = EventHub(
        WebhookSettings(url=URL, secret=SECRET, **settings),
        post=post,
        scheduler=scheduler,
        rng=random.Random(7),
    )
    return hub, post, scheduler


def test_no_url_means_no_event():
    hub = EventHub(scheduler=SteppedScheduler())
    hub.emit(CHARGE)
    assert hub.events() == []


def test_an_event_is_signed_per_standard_webhooks():
    hub, post, scheduler = make_hub()
    hub.emit(CHARGE)
    assert scheduler.run_next() == 0
    [(url, body, headers)] = post.sent
    event = Webhook(SECRET).verify(body, headers)
    assert url == URL
    assert headers["webhook-id"] == event["id"]
    assert event["type"] == "charge.succeeded"
    assert event["data"] == {"object": CHARGE}
    [record] = hub.events()
    assert (record["event"], record["status"]) == (event, "delivered")


def test_a_failed_send_is_retried_with_backoff_until_delivered():
    hub, post, scheduler = make_hub(500, ConnectionRefusedError("refused"), 204)
    hub.emit(CHARGE)
    delays = [scheduler.run_next() for _ in range(3)]
    assert delays == [0, 0.2, 0.4]
    assert scheduler.tasks == []
    [record] = hub.events()
    assert record["status"] == "delivered"
    assert [a["status_code"] for a in record["attempts"]] == [500, None, 204]
    assert "ConnectionRefusedError" in record["attempts"][1]["error"]
    assert len({headers["webhook-id"] for _, _, headers in post.sent}) == 1


def test_delivery_fails_after_max_attempts():
    hub, _, scheduler = make_hub(*[503] * 5, max_attempts=2)
    hub.emit(CHARGE)
    scheduler.run_next()
    scheduler.run_next()
    assert scheduler.tasks == []
    assert hub.events()[0]["status"] == "failed"


@pytest.mark.parametrize(
    ("attempt", "backoff_s", "delay_s"),
    [(1, 0.2, 0.2), (2, 0.2, 0.4), (4, 0.2, 1.6), (10, 0.2, MAX_BACKOFF_S), (3, 0, 0)],
)
def test_retry_delay_doubles_up_to_the_cap(attempt, backoff_s, delay_s):
    assert retry_delay(attempt, backoff_s) == pytest.approx(delay_s)


def test_redelivery_sends_copies_shuffled_once_each_with_the_chosen_timestamp():
    hub, post, scheduler = make_hub()
    for index in range(3):
        hub.emit({**CHARGE, "id": f"ch_{index}"})
    while scheduler.tasks:
        scheduler.run_next()
    stale = int(time.time()) - 3600
    order = hub.redeliver(Redelivery(copies=2, shuffle=True, timestamp=stale))
    ids = [record["event"]["id"] for record in hub.events()]
    assert sorted(order) == sorted(ids * 2)
    assert order != [i for i in ids for _ in range(2)]  # seeded: this shuffle moves them
    post.answers = [500] * 6  # redeliveries are never retried
    while scheduler.tasks:
        scheduler.run_next()
    resent = post.sent[3:]
    assert [headers["webhook-id"] for _, _, headers in resent] == order
    assert {headers["webhook-timestamp"] for _, _, headers in resent} == {str(stale)}
    records = hub.events()
    assert all(record["status"] == "delivered" for record in records)
    assert sum(a["redelivery"] for r in records for a in r["attempts"]) == 6


def test_redelivery_of_an_unknown_event_is_a_key_error():
    hub, _, _ = make_hub()
    with pytest.raises(KeyError):
        hub.redeliver(Redelivery(ids=("evt_missing",)))


def test_a_full_delivery_queue_drops_the_event():
    hub, _, _ = make_hub(scheduler=SteppedScheduler(capacity=0))
    hub.emit(CHARGE)
    assert hub.events()[0]["status"] == "dropped"


def test_a_send_finishing_after_a_reset_records_nothing():
    hub, post, scheduler = make_hub()
    hub.emit(CHARGE)
    post.answers = [lambda: (hub.clear(), hub.emit(CHARGE), 500)[-1]]
    scheduler.run_next()
    assert len(post.sent) == 1
    [record] = hub.events()  # only the event made after the reset, untouched
    assert (record["status"], record["attempts"]) == ("pending", [])


def test_reset_returns_to_the_settings_at_start():
    hub, _, _ = make_hub()
    hub.configure(WebhookSettings())
    hub.clear()
    assert hub.settings().url == URL


def test_signed_headers_carry_the_given_timestamp():
    headers = signed_headers(SECRET, "evt_1", 1_700_000_000, "{}")
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")


@pytest.mark.parametrize(
    "settings",
    [
        [],
        {"url": URL},
        {"url": "ftp://host/x", "secret": SECRET},
        {"url": "http:///x", "secret": SECRET},
        {"url": 5, "secret": SECRET},
        {"url": URL, "secret": "plain"},
        {"url": URL, "secret": "whsec_"},
        {"url": URL, "secret": "whsec_a"},
        {"url": URL, "secret": SECRET, "max_attempts": 0},
        {"url": URL, "secret": SECRET, "max_attempts": True},
        {"url": URL, "secret": SECRET, "backoff_ms": -1},
        {"url": URL, "secret": SECRET, "backoff_ms": "1"},
        {"url": URL, "secret": SECRET, "extra": 1},
    ],
)
def test_invalid_webhook_settings_are_refused(settings):
    with pytest.raises(WebhookError):
        WebhookSettings.from_mapping(settings)


def test_no_url_is_valid_and_means_no_events():
    assert WebhookSettings.from_mapping({"url": None}) == WebhookSettings()


@pytest.mark.parametrize(
    "redelivery",
    [
        {"ids": "evt_1"},
        {"ids": [1]},
        {"copies": 0},
        {"copies": 11},
        {"shuffle": "yes"},
        {"timestamp": -1},
        {"timestamp": 1.5},
        {"when": 1},
    ],
)
def test_invalid_redeliveries_are_refused(redelivery):
    with pytest.raises(WebhookError):
        Redelivery.from_mapping(redelivery)
