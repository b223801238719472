"""The sandbox provider, as a real process over real sockets (DESIGN.md sections 5 and 9)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.sandbox import ROOT, SandboxError, SandboxProcess


@pytest.fixture(scope="module")
def sandbox_process():
    with SandboxProcess() as sandbox:
        yield sandbox


@pytest.fixture
def sandbox(sandbox_process):
    sandbox_process.reset()
    yield sandbox_process
    sandbox_process.set_faults()  # frees anything a failed test left hanging


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def new_key() -> str:
    return f"key_{uuid.uuid4().hex}"


def body(key: str, **changes) -> dict:
    return {
        "amount": 2599,
        "currency": "USD",
        "payment_method": "card",
        "transaction_id": key,
        "description": "order 42",
        "metadata": {"order": "42"},
        **changes,
    }


def charge(sandbox, key, session=requests, timeout=5.0, **changes) -> requests.Response:
    headers = {**sandbox.auth_headers, "Idempotency-Key": key}
    return session.post(
        f"{sandbox.url}/v1/charges", json=body(key, **changes), headers=headers, timeout=timeout
    )


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_charge_succeeds_with_201_and_is_recorded(sandbox):
    key = new_key()
    response = charge(sandbox, key)
    assert response.status_code == 201
    created = response.json()
    assert created["id"].startswith("ch_")
    assert created["object"] == "charge"
    assert created["status"] == "succeeded"
    assert (created["amount"], created["currency"]) == (2599, "USD")
    assert created["amount_refunded"] == 0
    assert (created["idempotency_key"], created["transaction_id"]) == (key, key)
    assert created["failure_code"] is None and created["failure_message"] is None
    assert abs(created["created"] - time.time()) < 60
    assert "Idempotent-Replayed" not in response.headers
    assert sandbox.ledger() == [created]
    state = sandbox.state()
    assert state["charges"] == 1
    assert state["succeeded_total_minor"] == {"USD": 2599}
    assert state["requests"] == {"POST /v1/charges": 1}


def test_repeat_with_same_key_and_body_replays_the_stored_charge(sandbox):
    key = new_key()
    first = charge(sandbox, key)
    again = charge(sandbox, key)
    assert again.status_code == first.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(sandbox.ledger()) == 1


def test_same_key_with_another_body_is_422(sandbox):
    key = new_key()
    assert charge(sandbox, key).status_code == 201
    reused = charge(sandbox, key, amount=100)
    assert reused.status_code == 422
    assert error_code(reused) == "idempotency_key_reused"
    assert len(sandbox.ledger()) == 1


def test_same_key_while_first_request_in_flight_is_409(sandbox, pool):
    sandbox.set_faults(latency_ms=1000)
    key = new_key()
    first = pool.submit(charge, sandbox, key)
    sandbox.wait_for_state(lambda state: state["in_flight"] == 1)
    conflict = charge(sandbox, key)
    assert conflict.status_code == 409
    assert error_code(conflict) == "request_in_progress"
    assert conflict.headers["Retry-After"] == "1"
    created = first.result(timeout=10)
    assert created.status_code == 201
    assert charge(sandbox, key).json()["id"] == created.json()["id"]
    assert len(sandbox.ledger()) == 1


@pytest.mark.parametrize(
    ("payment_method", "code"),
    [
        ("card_declined", "card_declined"),
        ("tok_chargeDeclined", "card_declined"),
        ("insufficient_funds", "insufficient_funds"),
    ],
)
def test_declines_are_402_recorded_as_failed_and_replayed(sandbox, payment_method, code):
    key = new_key()
    declined = charge(sandbox, key, payment_method=payment_method)
    assert declined.status_code == 402
    assert error_code(declined) == code
    assert declined.json()["error"]["message"]
    replayed = charge(sandbox, key, payment_method=payment_method)
    assert replayed.status_code == 402
    assert replayed.headers["Idempotent-Replayed"] == "true"
    [recorded] = sandbox.ledger()
    assert (recorded["status"], recorded["failure_code"]) == ("failed", code)
    assert sandbox.state()["succeeded_total_minor"] == {}


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong_key", "Basic c2tfc2FuZGJveF9sb2NhbDo=", "Bearer"]
)
def test_charge_without_the_api_key_is_401(sandbox, authorization):
    headers = {"Idempotency-Key": new_key()}
    if authorization:
        headers["Authorization"] = authorization
    response = requests.post(
        f"{sandbox.url}/v1/charges", json=body("t"), headers=headers, timeout=5
    )
    assert response.status_code == 401
    assert error_code(response) == "invalid_api_key"
    assert sandbox.ledger() == []


def test_charge_without_idempotency_key_is_400(sandbox):
    response = requests.post(
        f"{sandbox.url}/v1/charges", json=body("t"), headers=sandbox.auth_headers, timeout=5
    )
    assert response.status_code == 400
    assert error_code(response) == "idempotency_key_required"
    assert sandbox.ledger() == []


def test_charge_that_is_not_json_is_415(sandbox):
    headers = {**sandbox.auth_headers, "Idempotency-Key": new_key()}
    response = requests.post(
        f"{sandbox.url}/v1/charges", data={"amount": "1"}, headers=headers, timeout=5
    )
    assert response.status_code == 415


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        {"amount": 0},
        {"amount": -5},
        {"amount": 25.99},
        {"amount": "2599"},
        {"amount": True},
        {"amount": None},
        {"currency": "XXX"},
        {"currency": ["USD"]},
        {"payment_method": ""},
        {"payment_method": 7},
        {"transaction_id": None},
        {"description": 5},
        {"metadata": "x"},
    ],
)
def test_invalid_charge_bodies_are_400_and_charge_nothing(sandbox, payload):
    data = payload if isinstance(payload, bytes) else json.dumps(body("t", **payload)).encode()
    headers = {
        **sandbox.auth_headers,
        "Idempotency-Key": new_key(),
        "Content-Type": "application/json",
    }
    response = requests.post(f"{sandbox.url}/v1/charges", data=data, headers=headers, timeout=5)
    assert response.status_code == 400
    assert error_code(response) == "invalid_request"
    assert response.json()["error"]["message"]
    assert sandbox.ledger() == []


def test_lookup_by_idempotency_key_and_by_id(sandbox):
    key = new_key()
    url = f"{sandbox.url}/v1/charges"
    lookup = {"idempotency_key": key}
    unseen = requests.get(url, params=lookup, headers=sandbox.auth_headers, timeout=5)
    assert (unseen.status_code, unseen.json()) == (200, {"data": []})

    created = charge(sandbox, key).json()
    seen = requests.get(url, params=lookup, headers=sandbox.auth_headers, timeout=5)
    assert seen.json() == {"data": [created]}
    by_id = requests.get(f"{url}/{created['id']}", headers=sandbox.auth_headers, timeout=5)
    assert by_id.json() == created
    missing = requests.get(f"{url}/ch_missing", headers=sandbox.auth_headers, timeout=5)
    assert missing.status_code == 404
    assert requests.get(url, params=lookup, timeout=5).status_code == 401


def test_lookup_by_key_includes_declined_charges(sandbox):
    key = new_key()
    charge(sandbox, key, payment_method="card_declined")
    found = requests.get(
        f"{sandbox.url}/v1/charges",
        params={"idempotency_key": key},
        headers=sandbox.auth_headers,
        timeout=5,
    ).json()["data"]
    assert [c["status"] for c in found] == ["failed"]


def test_latency_fault_delays_charges(sandbox):
    sandbox.set_faults(latency_ms=300)
    started = time.monotonic()
    response = charge(sandbox, new_key())
    elapsed = time.monotonic() - started
    assert response.status_code == 201
    assert 0.3 <= elapsed < 3.0


def test_script_503_503_then_success_with_retry_after(sandbox):
    sandbox.set_faults(script=[503, 503], retry_after=1)
    key = new_key()
    for _ in range(2):
        unavailable = charge(sandbox, key)
        assert unavailable.status_code == 503
        assert unavailable.headers["Retry-After"] == "1"
        assert error_code(unavailable) == "service_unavailable"
        assert sandbox.ledger() == []
    assert charge(sandbox, key).status_code == 201
    state = sandbox.state()
    assert state["charges"] == 1
    assert state["requests"]["POST /v1/charges"] == 3
    assert state["faults"]["script"] == []


def test_error_rate_fails_every_charge_with_the_chosen_status(sandbox):
    sandbox.set_faults(error_rate=1.0, error_status=429, retry_after=2)
    key = new_key()
    for _ in range(3):
        limited = charge(sandbox, key)
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "2"
        assert error_code(limited) == "rate_limited"
    assert sandbox.ledger() == []
    sandbox.set_faults()
    assert charge(sandbox, key).status_code == 201


def test_reset_fault_is_a_connection_error_and_charges_nothing(sandbox):
    sandbox.set_faults(script=["reset"])
    key = new_key()
    with pytest.raises(requests.ConnectionError):
        charge(sandbox, key)
    assert sandbox.ledger() == []
    assert charge(sandbox, key).status_code == 201


def test_reset_mid_response_loses_the_answer_but_not_the_charge(sandbox):
    sandbox.set_faults(script=["reset_mid_response"])
    key = new_key()
    with pytest.raises(requests.ConnectionError):
        charge(sandbox, key)
    [recorded] = sandbox.ledger()
    replayed = charge(sandbox, key)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["id"] == recorded["id"]


def test_malformed_json_fault_answers_200_with_truncated_json(sandbox):
    sandbox.set_faults(script=["malformed_json"])
    response = charge(sandbox, new_key())
    assert response.status_code == 200
    assert response.text == '{"id": '
    with pytest.raises(requests.JSONDecodeError):
        response.json()
    assert len(sandbox.ledger()) == 1


def test_html_fault_answers_200_with_an_html_page(sandbox):
    sandbox.set_faults(script=["html"])
    response = charge(sandbox, new_key())
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<html>")


def test_missing_status_fault_answers_a_charge_without_status(sandbox):
    sandbox.set_faults(script=["missing_status"])
    response = charge(sandbox, new_key())
    assert response.status_code == 200
    answered = response.json()
    assert "status" not in answered
    assert answered["id"] == sandbox.ledger()[0]["id"]


def test_hang_holds_charges_until_cleared_then_drops_them(sandbox, pool):
    sandbox.set_faults(hang=True)
    key = new_key()
    hung = pool.submit(charge, sandbox, key, timeout=10)
    sandbox.wait_for_state(lambda state: state["hung"] == 1)
    assert not hung.done()
    sandbox.set_faults()
    with pytest.raises(requests.ConnectionError):
        hung.result(timeout=10)
    assert sandbox.state()["hung"] == 0
    assert sandbox.ledger() == []
    assert charge(sandbox, key).status_code == 201


def test_hang_after_commit_records_the_charge_before_hanging(sandbox):
    sandbox.set_faults(hang_after_commit=True)
    key = new_key()
    with pytest.raises(requests.ReadTimeout):
        charge(sandbox, key, timeout=(3, 0.3))
    [recorded] = sandbox.ledger()
    assert recorded["status"] == "succeeded"
    assert sandbox.state()["hung"] == 1
    # The money moved: a retry with the same key is answered from the stored charge.
    replayed = charge(sandbox, key)
    assert replayed.status_code == 201
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["id"] == recorded["id"]
    sandbox.set_faults()
    sandbox.wait_for_state(lambda state: state["hung"] == 0)


def test_keep_alive_session_uses_one_connection_for_50_requests(sandbox):
    with requests.Session() as session:
        for _ in range(50):
            assert charge(sandbox, new_key(), session=session).status_code == 201
    state = sandbox.state()
    assert state["requests"] == {"POST /v1/charges": 50}
    assert state["connections_accepted"] == 1


def test_new_connection_per_request_is_counted(sandbox):
    for _ in range(3):
        charge(sandbox, new_key())
    assert sandbox.state()["connections_accepted"] == 3


def test_concurrent_keep_alive_clients_are_served_in_parallel(sandbox):
    sandbox.set_faults(latency_ms=20)
    clients, per_client = 20, 10

    def client():
        with requests.Session() as session:
            return [
                charge(sandbox, new_key(), session=session).status_code for _ in range(per_client)
            ]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as executor:
        futures = [executor.submit(client) for _ in range(clients)]
        statuses = [status for future in futures for status in future.result(timeout=30)]
    elapsed = time.monotonic() - started
    assert statuses == [201] * clients * per_client
    # Serially this takes 200 x 20 ms = 4 s; in parallel about a tenth of that.
    assert elapsed < 3.0
    state = sandbox.state()
    assert state["charges"] == clients * per_client
    assert state["connections_accepted"] == clients


def test_reset_clears_ledger_counters_and_faults(sandbox):
    charge(sandbox, new_key())
    sandbox.set_faults(latency_ms=5, script=[503])
    state = sandbox.reset()
    assert state["charges"] == 0
    assert state["requests"] == {}
    assert state["connections_accepted"] == 0
    assert state["faults"]["latency_ms"] == 0
    assert state["faults"]["script"] == []
    assert sandbox.ledger() == []


@pytest.mark.parametrize(
    "faults",
    [
        {"latency": 5},
        {"latency_ms": -1},
        {"error_rate": 1.5},
        {"error_status": 200},
        {"retry_after": "soon"},
        {"script": ["explode"]},
        {"script": [201]},
        {"script": "503"},
        {"hang": "yes"},
        {"settle_later_ms": -1},
        {"settle_later_ms": 600_001},
    ],
)
def test_invalid_faults_are_refused(sandbox, faults):
    with pytest.raises(SandboxError, match="400"):
        sandbox.set_faults(**faults)
    assert sandbox.state()["faults"]["script"] == []


def test_faults_from_flags_apply_from_start_and_sigterm_stops_cleanly():
    flags = ("--error-rate", "1", "--error-status", "502", "--retry-after", "3")
    sandbox = SandboxProcess(extra_args=flags).start()
    try:
        response = charge(sandbox, new_key())
        assert response.status_code == 502
        assert response.headers["Retry-After"] == "3"
        assert sandbox.state()["faults"]["error_status"] == 502
    finally:
        assert sandbox.stop() == 0


def test_bad_flag_fails_at_start_with_a_message():
    result = subprocess.run(
        [sys.executable, "-m", "sandbox_provider", "--port", "0", "--script", "explode"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert "unknown script entry" in result.stderr


def test_tls_is_trusted_through_the_ca_bundle_only(monkeypatch):
    with SandboxProcess(tls=True) as sandbox:
        assert sandbox.url.startswith("https://127.0.0.1:")
        assert sandbox.ca_bundle and Path(sandbox.ca_bundle).is_file()
        for url in (sandbox.url, sandbox.url.replace("127.0.0.1", "localhost")):
            lookup = requests.get(
                f"{url}/v1/charges/ch_none",
                headers=sandbox.auth_headers,
                verify=sandbox.ca_bundle,
                timeout=5,
            )
            assert lookup.status_code == 404
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(sandbox.url, verify=requests.certs.where(), timeout=5)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", sandbox.ca_bundle)
        with requests.Session() as session:
            assert charge(sandbox, new_key(), session=session).status_code == 201
        assert sandbox.state()["charges"] == 1


@pytest.mark.parametrize("trickle_ms", [-1, 60_001, "slow", True, None])
def test_invalid_trickle_is_refused(sandbox, trickle_ms):
    with pytest.raises(SandboxError, match="trickle_ms must be a number"):
        sandbox.set_faults(trickle_ms=trickle_ms)
    assert sandbox.state()["faults"]["trickle_ms"] == 0


def test_trickle_records_the_charge_then_answers_a_byte_at_a_time(sandbox, pool):
    assert sandbox.set_faults(trickle_ms=200)["trickle_ms"] == 200
    key = new_key()
    # Each read waits at most 1 s; a byte comes every 0.2 s, so none of them times out.
    answer = pool.submit(charge, sandbox, key, timeout=(3, 1))
    sandbox.wait_for_state(lambda state: state["charges"] == 1)
    [recorded] = sandbox.ledger()
    time.sleep(1.5)
    assert not answer.done()  # still arriving, longer than any single read may wait
    sandbox.set_faults()  # healed: the rest of the answer goes out at once
    response = answer.result(timeout=10)
    assert response.status_code == 201
    assert response.json() == recorded


def test_trickle_flag_applies_from_start():
    with SandboxProcess(extra_args=("--trickle-ms", "1")) as trickling:
        started = time.monotonic()
        assert charge(trickling, new_key()).status_code == 201
        assert time.monotonic() - started > 0.2  # a few hundred bytes, 1 ms apart
        assert trickling.state()["faults"]["trickle_ms"] == 1
