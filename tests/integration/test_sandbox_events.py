"""Signed, settle-later events from the sandbox provider (DESIGN.md sections 5a, 9, 11).

A loopback receiver in the test takes the sandbox's webhooks and checks each with
standardwebhooks' own verifier, as the service's endpoint will.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.sandbox import SandboxError, SandboxProcess

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
WAIT_S = 5.0


class Receiver:
    """A webhook endpoint on a free loopback port: records every request and answers
    the statuses in ``answers`` first, then 200."""

    def __init__(self, answers=()):
        self.received: list[tuple[dict, str]] = []
        self.answers = list(answers)
        self._condition = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                with receiver._condition:
                    receiver.received.append((dict(self.headers), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver._condition.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/webhooks"

    def wait_for(self, count: int, timeout: float = WAIT_S) -> list[tuple[dict, str]]:
        """The first ``count`` requests, once they have arrived."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"{len(self.received)} webhooks arrived, not {count}")
            return self.received[:count]

    def verified(self, count: int) -> list[dict]:
        """The first ``count`` event bodies, each checked against its signature."""
        return [Webhook(SECRET).verify(body, headers) for headers, body in self.wait_for(count)]

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver(sandbox):
    receiver = Receiver()
    sandbox.set_webhooks(receiver.url, SECRET)
    yield receiver
    receiver.close()


def new_key() -> str:
    return f"key_{uuid.uuid4().hex}"


def charge(sandbox, payment_method="card", amount=2599) -> requests.Response:
    key = new_key()
    body = {
        "amount": amount,
        "currency": "USD",
        "payment_method": payment_method,
        "transaction_id": key,
    }
    headers = {**sandbox.auth_headers, "Idempotency-Key": key}
    return requests.post(f"{sandbox.url}/v1/charges", json=body, headers=headers, timeout=5)


def refund(sandbox, charge_id, **fields) -> requests.Response:
    headers = {**sandbox.auth_headers, "Idempotency-Key": new_key()}
    return requests.post(
        f"{sandbox.url}/v1/refunds",
        json={"charge": charge_id, **fields},
        headers=headers,
        timeout=5,
    )


def test_a_succeeded_charge_posts_a_signed_charge_succeeded_event(sandbox, receiver):
    made = charge(sandbox).json()
    [event] = receiver.verified(1)
    [(headers, _)] = receiver.wait_for(1)
    assert event["id"].startswith("evt_")
    assert headers["webhook-id"] == event["id"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["webhook-signature"].startswith("v1,")
    assert event["type"] == "charge.succeeded"
    assert abs(event["created"] - time.time()) < 60
    assert event["data"]["object"] == made
    assert event["data"]["object"]["idempotency_key"] == made["idempotency_key"]
    [record] = sandbox.wait_for_events(lambda events: events[0]["status"] == "delivered")
    assert record["event"] == event
    assert [a["status_code"] for a in record["attempts"]] == [200]


def test_a_declined_charge_posts_charge_failed(sandbox, receiver):
    assert charge(sandbox, payment_method="card_declined").status_code == 402
    [event] = receiver.verified(1)
    assert event["type"] == "charge.failed"
    assert event["data"]["object"]["failure_code"] == "card_declined"


@pytest.mark.parametrize(
    ("payment_method", "final"),
    [("pending_then_succeed", "succeeded"), ("pending_then_fail", "failed")],
)
def test_pending_charge_settles_later_with_a_signed_event(sandbox, receiver, payment_method, final):
    answer = charge(sandbox, payment_method=payment_method)
    assert answer.status_code == 200
    pending = answer.json()
    assert pending["status"] == "pending"
    assert sandbox.events() == []
    [event] = receiver.verified(1)
    assert event["type"] == f"charge.{final}"
    settled = event["data"]["object"]
    assert (settled["id"], settled["status"]) == (pending["id"], final)
    assert sandbox.ledger() == [settled]


def test_settle_later_fault_makes_every_charge_pending_first(sandbox, receiver):
    sandbox.set_faults(settle_later_ms=100)
    ok = charge(sandbox)
    declined = charge(sandbox, payment_method="card_declined")
    assert (ok.status_code, ok.json()["status"]) == (200, "pending")
    assert (declined.status_code, declined.json()["status"]) == (200, "pending")
    events = receiver.verified(2)
    by_charge = {event["data"]["object"]["id"]: event["type"] for event in events}
    assert by_charge == {
        ok.json()["id"]: "charge.succeeded",
        declined.json()["id"]: "charge.failed",
    }


def test_a_replay_of_a_pending_charge_is_its_first_answer(sandbox, receiver):
    answer = charge(sandbox, payment_method="pending_then_succeed")
    receiver.wait_for(1)
    replay = requests.post(
        f"{sandbox.url}/v1/charges",
        data=answer.request.body,
        headers=answer.request.headers,
        timeout=5,
    )
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == answer.json()
    [now] = requests.get(
        f"{sandbox.url}/v1/charges",
        params={"idempotency_key": answer.json()["idempotency_key"]},
        headers=sandbox.auth_headers,
        timeout=5,
    ).json()["data"]
    assert now["status"] == "succeeded"


def test_a_receiver_answering_500_gets_the_same_event_again(sandbox, receiver):
    receiver.answers = [500]
    charge(sandbox)
    first, second = receiver.verified(2)
    assert first == second
    (first_headers, _), (second_headers, _) = receiver.wait_for(2)
    assert first_headers["webhook-id"] == second_headers["webhook-id"] == first["id"]
    [record] = sandbox.wait_for_events(lambda events: events[0]["status"] == "delivered")
    assert [a["status_code"] for a in record["attempts"]] == [500, 200]
    assert [a["attempt"] for a in record["attempts"]] == [1, 2]
    assert record["attempts"][1]["at"] - record["attempts"][0]["at"] >= 0.15  # backoff


def test_delivery_gives_up_after_max_attempts(sandbox, receiver):
    sandbox.set_webhooks(receiver.url, SECRET, max_attempts=3, backoff_ms=10)
    receiver.answers = [503] * 10
    charge(sandbox)
    [record] = sandbox.wait_for_events(lambda events: events[0]["status"] == "failed")
    assert [a["status_code"] for a in record["attempts"]] == [503, 503, 503]
    assert len(receiver.received) == 3


def test_an_unreachable_url_is_retried_as_a_connection_error(sandbox):
    gone = Receiver()
    gone.close()
    sandbox.set_webhooks(gone.url, SECRET, max_attempts=2, backoff_ms=10)
    charge(sandbox)
    [record] = sandbox.wait_for_events(lambda events: events[0]["status"] == "failed")
    assert [a["status_code"] for a in record["attempts"]] == [None, None]
    assert all("Connection" in a["error"] for a in record["attempts"])


def test_redelivery_sends_duplicates_in_a_shuffled_order(sandbox, receiver):
    ids = [charge(sandbox).json()["id"] for _ in range(4)]
    receiver.wait_for(4)
    sandbox.wait_for_events(lambda events: all(e["status"] == "delivered" for e in events))
    event_ids = [record["event"]["id"] for record in sandbox.events()]
    sent = sandbox.redeliver(copies=2, shuffle=True)
    assert sorted(sent) == sorted(event_ids * 2)
    again = receiver.verified(12)[4:]
    assert [event["id"] for event in again] == sent
    assert {event["data"]["object"]["id"] for event in again} == set(ids)
    records = sandbox.wait_for_events(lambda events: sum(len(e["attempts"]) for e in events) == 12)
    assert all(record["status"] == "delivered" for record in records)
    assert sum(a["redelivery"] for r in records for a in r["attempts"]) == 8


def test_redelivery_with_a_stale_timestamp_is_signed_but_too_old(sandbox, receiver):
    charge(sandbox)
    [event] = receiver.verified(1)
    stale = int(time.time()) - 3600
    assert sandbox.redeliver([event["id"]], timestamp=stale) == [event["id"]]
    headers, body = receiver.wait_for(2)[1]
    assert headers["webhook-timestamp"] == str(stale)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(body, headers)
    # The signature is right for the stale time: only its age is wrong.
    signed_then = Webhook(SECRET).sign(event["id"], datetime.fromtimestamp(stale, UTC), body)
    assert headers["webhook-signature"] == signed_then
    assert json.loads(body) == event


def test_redelivery_of_an_unknown_event_is_404(sandbox, receiver):
    with pytest.raises(SandboxError, match="404"):
        sandbox.redeliver(["evt_missing"])


def test_settle_control_fails_a_succeeded_charge_and_announces_it(sandbox, receiver):
    made = charge(sandbox).json()
    assert sandbox.settle(made["id"], "failed")["status"] == "failed"
    succeeded, failed = receiver.verified(2)
    assert (succeeded["type"], failed["type"]) == ("charge.succeeded", "charge.failed")
    assert failed["data"]["object"]["failure_code"] == "charge_failed"
    assert sandbox.ledger() == [failed["data"]["object"]]
    assert sandbox.settle(made["id"], "failed")["status"] == "failed"  # no change, no event
    assert len(sandbox.events()) == 2


def test_settle_control_refuses_bad_bodies_and_unknown_charges(sandbox):
    made = charge(sandbox).json()
    with pytest.raises(SandboxError, match="400"):
        sandbox.settle(made["id"], "pending")
    with pytest.raises(SandboxError, match="400"):
        sandbox.settle(made["id"], "failed", colour="red")
    with pytest.raises(SandboxError, match="404"):
        sandbox.settle("ch_missing", "failed")


def test_refunds_post_refund_events(sandbox, receiver):
    paid = charge(sandbox).json()
    failing = charge(sandbox, payment_method="refund_fails").json()
    pending = charge(sandbox, payment_method="refund_pending").json()
    refund(sandbox, paid["id"], amount=100)
    refund(sandbox, failing["id"])
    assert refund(sandbox, pending["id"]).json()["status"] == "pending"
    events = receiver.verified(6)
    refund_events = {
        event["data"]["object"]["charge"]: event["type"]
        for event in events
        if event["type"].startswith("refund.")
    }
    assert refund_events == {
        paid["id"]: "refund.succeeded",
        failing["id"]: "refund.failed",
        pending["id"]: "refund.succeeded",
    }
    assert all("idempotency_key" in event["data"]["object"] for event in events)


def test_no_webhook_url_means_no_events(sandbox):
    charge(sandbox)
    assert sandbox.events() == []
    assert sandbox.state()["events"] == 0


@pytest.mark.parametrize(
    "settings",
    [
        {"url": "http://127.0.0.1:1/hook"},
        {"url": "ftp://127.0.0.1/hook", "secret": SECRET},
        {"url": "not a url", "secret": SECRET},
        {"url": "http://127.0.0.1:1/hook", "secret": "plain"},
        {"url": "http://127.0.0.1:1/hook", "secret": "whsec_"},
        {"url": "http://127.0.0.1:1/hook", "secret": SECRET, "max_attempts": 0},
        {"url": "http://127.0.0.1:1/hook", "secret": SECRET, "backoff_ms": -1},
        {"url": "http://127.0.0.1:1/hook", "secret": SECRET, "colour": "red"},
    ],
)
def test_invalid_webhook_settings_are_refused(sandbox, settings):
    with pytest.raises(SandboxError, match="400"):
        sandbox.control("POST", "/_sandbox/webhooks", settings)
    assert sandbox.control("GET", "/_sandbox/webhooks")["webhooks"]["url"] is None


def test_reset_forgets_events_and_the_webhook_url(sandbox, receiver):
    charge(sandbox)
    receiver.wait_for(1)
    state = sandbox.reset()
    assert state["events"] == 0
    assert sandbox.control("GET", "/_sandbox/webhooks")["webhooks"]["url"] is None


def test_webhook_flags_apply_from_start_and_survive_a_reset():
    receiver = Receiver(answers=[500])
    flags = (
        *("--webhook-url", receiver.url, "--webhook-secret", SECRET),
        *("--webhook-attempts", "2", "--webhook-backoff-ms", "10", "--settle-later-ms", "20"),
    )
    try:
        with SandboxProcess(extra_args=flags) as sandbox:
            assert sandbox.state()["faults"]["settle_later_ms"] == 20
            assert charge(sandbox).json()["status"] == "pending"
            first, second = receiver.verified(2)  # a 500, then the retry 10 ms later
            assert first == second and first["type"] == "charge.succeeded"
            sandbox.reset()
            webhooks = sandbox.control("GET", "/_sandbox/webhooks")["webhooks"]
            assert (webhooks["url"], webhooks["max_attempts"]) == (receiver.url, 2)
    finally:
        receiver.close()


def test_bad_webhook_flags_fail_at_start():
    with pytest.raises(SandboxError, match="needs a secret"):
        SandboxProcess(extra_args=("--webhook-url", "http://127.0.0.1:1/")).start()
