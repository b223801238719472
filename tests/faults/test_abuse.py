"""Abuse of ``POST /v1/payments`` on the real gunicorn: fuzzing, oversized and slow bodies,
authentication, and secrets that must never reach a response or a log line.

One service for the module (a fresh database, the sandbox healthy); every test also
checks the service is still answering, and the last one greps everything it logged.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service import auth
from tests.faults.harness import (
    API_KEY,
    AUTH,
    PROVIDER_KEY,
    new_key,
    payment_by_key,
    running_service,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

THREADS = 4
CARD_NUMBERS = ("4111111111111111", "4242 4242 4242 4242", "5555-5555-5555-4444")
#: Every answer a payment request may get from a healthy provider.
CLIENT_ERRORS = {400, 401, 402, 404, 405, 409, 413, 415, 422}
SEEN_BODIES: list[str] = []  # every response body of the module, for the secret grep


@pytest.fixture(scope="module")
def service(provider_process):
    provider_process.reset()
    with running_service(provider_process, GUNICORN_THREADS=THREADS) as running:
        yield running
    provider_process.reset()


def address(service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def post_raw(service, body: bytes, headers=None, params=None) -> requests.Response:
    response = requests.post(
        f"{service.url}/v1/payments",
        data=body,
        headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
        params=params,
        timeout=30,
    )
    SEEN_BODIES.append(response.text)
    return response


def assert_no_server_error(response: requests.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["Content-Type"] in ("application/json", "application/problem+json")
    assert "Traceback" not in response.text and 'File "' not in response.text


def healthz_seconds(service, timeout: float = 10) -> float:
    started = time.monotonic()
    assert requests.get(service.url + "/healthz", timeout=timeout).status_code == 200
    return time.monotonic() - started


# --------------------------------------------------------------------------- fuzzing

TEXT = st.text(max_size=40) | st.sampled_from(CARD_NUMBERS)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
#: JSON number tokens written raw (json.dumps refuses ints over 4300 digits), with
#: exponents far beyond what Decimal's default context holds.
RAW_NUMBERS = st.from_regex(
    r"-?(0|[1-9][0-9]{0,5999})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,12})?", fullmatch=True
)
RAW = "__raw_number__"
FIELDS = {
    "amount": st.just(RAW)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str)
    | st.sampled_from(["25.99", "0.01", "1000000", "1000000.01", "-1", "0", "1e3", "NaN"])
    | JSON_VALUES,
    "currency": st.sampled_from(["USD", "JPY", "KWD", "usd", "XXX", "", "US"]) | JSON_VALUES,
    "payment_method": st.sampled_from(["card", "card_declined", "insufficient_funds"])
    | TEXT
    | JSON_VALUES,
    "transaction_id": TEXT | st.text(max_size=300) | JSON_VALUES,
    "description": TEXT | st.text(min_size=990, max_size=1010) | JSON_VALUES,
    "metadata": st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4) | JSON_VALUES,
    "unexpected": JSON_VALUES,
}
#: Bodies a real client might send, so a good share of the fuzzing reaches the provider.
PLAUSIBLE = st.fixed_dictionaries(
    {"amount": st.sampled_from(["25.99", "0.01", "1", "999999.99", 7, 12.5])},
    optional={
        "currency": st.sampled_from(["USD", "JPY", "KWD", "eur"]),
        "payment_method": st.sampled_from(["card", "card_declined", "insufficient_funds"]),
        "transaction_id": st.text(
            alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1
        ),
        "description": TEXT,
        "metadata": st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3),
    },
)
#: Header values a client can send: latin-1 (what requests sends), no control characters
#: and no leading blank (requests refuses both; gunicorn's own refusals of raw bytes are
#: test_malformed_http_is_answered_with_a_problem).
HEADER_TEXT = st.text(
    alphabet=st.characters(
        min_codepoint=0x21, max_codepoint=0xFF, blacklist_categories=("Cc", "Zs")
    ),
    min_size=1,
    max_size=300,
)


@st.composite
def payment_bodies(draw) -> bytes:
    """A JSON object of payment fields (some wrong, some missing, some extra) or any JSON."""
    body = draw(PLAUSIBLE | st.fixed_dictionaries({}, optional=FIELDS) | JSON_VALUES)
    text = json.dumps(body)
    if f'"{RAW}"' in text:
        text = text.replace(f'"{RAW}"', draw(RAW_NUMBERS), 1)
    if draw(st.integers(0, 9)) == 0:  # now and then something that is not JSON at all
        text = draw(st.sampled_from(["[" * 20_000, "{", '{"amount": 1,}', "\ufeff{}", "nul"]))
    return text.encode()


@hypothesis_settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=payment_bodies(), key=st.none() | HEADER_TEXT)
def test_fuzzed_payment_requests_never_fail_the_server(service, body, key):
    headers = {"Idempotency-Key": key} if key is not None else {}
    response = post_raw(service, body, headers)
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics
    assert_no_server_error(response)
    assert response.status_code in CLIENT_ERRORS | {201}
    if response.status_code == 201:
        payment = response.json()
        stored = payment_by_key(service.database_url, payment["idempotency_key"])
        assert (stored["id"], stored["amount_minor"]) == (payment["id"], payment["amount_minor"])


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "1" + "0" * 5000},
        {"amount": 10**300},
        {"amount": "1e400"},
        {"amount": "1E+999999999"},
        {"amount": "-0.00"},
        {"amount": "25.99", "metadata": {"nested": [[[[[[[[[[{"deep": "\u2603\x00"}]]]]]]]]]]}},
        {"amount": "25.99", "description": "\U0001f4b3 \u202e gnp.exe \u0301\u0301"},
        {"amount": "25.99", "currency": "\u0055\u0053\u0044\u0301"},
    ],
    ids=lambda body: json.dumps(body)[:40],
)
def test_hostile_values_are_answered_without_a_server_error(service, body):
    raw = json.dumps(body).replace('"' + "1" + "0" * 5000 + '"', "1" + "0" * 5000)
    assert_no_server_error(post_raw(service, raw.encode(), {"Idempotency-Key": new_key()}))


# --------------------------------------------- regressions: bugs this suite found


def test_amount_with_a_tiny_exponent_is_422(service):
    """Was a 500: Decimal scaling underflowed to 0 minor units, which the table refuses."""
    response = post_raw(service, b'{"amount": 1E-999999999}')
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("field", ["payment_method", "description"])
def test_nul_in_text_is_422(service, field):
    """Was a 500: PostgreSQL text cannot hold NUL."""
    response = post_raw(service, json.dumps({"amount": "1.00", field: "card\x00x"}).encode())
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("amount", ["\u0661\u0662\u0663", "1_000"])
def test_amount_must_be_plain_ascii_decimal(service, amount):
    """Was charged: Decimal() reads any Unicode digits and underscores."""
    response = post_raw(service, json.dumps({"amount": amount}).encode())
    assert response.status_code == 422, response.text


def test_chunked_body_over_64_kib_is_413(service):
    """Was charged: werkzeug cut a chunked body at 64 KiB and the JSON prefix was valid."""
    body = b'{"amount": "1.00"}' + b" " * (1 << 20)
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    response = post_raw(service, chunks, {"Idempotency-Key": new_key()})
    assert response.status_code == 413, response.text


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x7fb\r\n\r\n",
        b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["header-name", "header-value", "request-line"],
)
def test_malformed_http_is_answered_with_a_problem(service, raw):
    """Was gunicorn's HTML page: it answers these itself, before the app sees them."""
    with socket.create_connection(address(service), timeout=10) as sock:
        sock.sendall(raw)
        head = read_response(sock).split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 4")
    assert b"content-type: application/problem+json" in head


# --------------------------------------------------------------------------- size


def test_one_mebibyte_body_is_413_problem(service):
    body = json.dumps({"amount": "1.00", "description": "x" * (1 << 20)}).encode()
    response = post_raw(service, body)
    assert response.status_code == 413
    assert response.json()["code"] == "request_entity_too_large"


def test_chunked_one_mebibyte_of_junk_is_413_problem(service):
    body = b"x" * (1 << 20)
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    response = post_raw(service, chunks)
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"


def test_nesting_deeper_than_the_parser_allows_is_400(service):
    for body in (
        b"[" * 30_000 + b"]" * 30_000,
        b'{"amount": "1.00", "metadata": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ):
        response = post_raw(service, body)
        assert response.status_code == 400
        assert response.headers["Content-Type"] == "application/problem+json"


# --------------------------------------------------------------------------- slow clients


def request_head(length: int) -> bytes:
    return (
        f"POST /v1/payments HTTP/1.1\r\nHost: faults\r\nConnection: close\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {new_key()}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_body_at_one_byte_per_100_ms_is_served_while_other_threads_answer(service):
    body = b'{"amount": "2.50"}'
    with socket.create_connection(address(service), timeout=30) as sock:
        sock.sendall(request_head(len(body)))
        health = []
        for byte in body:
            sock.sendall(bytes([byte]))
            health.append(healthz_seconds(service, timeout=2))
            time.sleep(0.1)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert max(health) < 0.5, health


def test_stalled_body_holds_one_thread_until_the_client_goes(service):
    """A client that stops mid-body keeps its thread (gthread reads block, no timeout)."""
    stalled = [socket.create_connection(address(service)) for _ in range(THREADS - 1)]
    try:
        for sock in stalled:
            sock.sendall(request_head(100) + b'{"amo')
        time.sleep(0.3)  # give the worker time to hand each one to a thread
        assert healthz_seconds(service, timeout=5) < 1.0  # one thread is still free
    finally:
        for sock in stalled:
            sock.close()
    with ThreadPoolExecutor(THREADS) as pool:  # all threads are back
        assert max(pool.map(lambda _: healthz_seconds(service, timeout=5), range(THREADS))) < 1


def test_idle_connections_hold_a_thread_for_at_most_the_data_wait(service):
    """gunicorn's gthread gives a new connection a thread that waits 5 s for its first byte."""
    idle = [socket.create_connection(address(service)) for _ in range(THREADS)]
    try:
        waited = healthz_seconds(service, timeout=15)
    finally:
        for sock in idle:
            sock.close()
    assert waited < 7, f"/healthz waited {waited:.1f} s behind {THREADS} idle connections"


def test_stalled_uploads_get_408_and_cannot_starve_a_worker(service):
    """A client that stops mid-body is cut off after BODY_READ_TIMEOUT (2 s), not never."""
    stalled = [socket.create_connection(address(service)) for _ in range(THREADS)]
    try:
        for sock in stalled:
            sock.sendall(request_head(100) + b'{"amo')
        time.sleep(0.3)
        assert healthz_seconds(service, timeout=6) < 4
        for sock in stalled:
            sock.settimeout(5)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408")
            assert b"application/problem+json" in answer
    finally:
        for sock in stalled:
            sock.close()


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789abcdef"},
        {"Authorization": f"Bearer {API_KEY[:-1]}"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": f"Bearer {PROVIDER_KEY}"},  # the provider's secret is not ours
        {"X-API-Key": API_KEY},
    ],
    ids=["none", "wrong", "truncated", "basic", "no-scheme", "provider-key", "other-header"],
)
def test_payment_without_our_bearer_key_is_401(service, headers):
    before = service.sandbox.state()["requests"].get("POST /v1/charges", 0)
    response = requests.post(
        f"{service.url}/v1/payments",
        json={"amount": "1.00"},
        headers={**headers, "Idempotency-Key": new_key()},
        timeout=10,
    )
    SEEN_BODIES.append(response.text)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert service.sandbox.state()["requests"].get("POST /v1/charges", 0) == before


@pytest.mark.parametrize("name", ["api_key", "token", "access_token", "Key", "authorization"])
def test_key_in_the_query_string_is_refused_even_with_a_valid_header(service, name):
    response = post_raw(service, b'{"amount": "1.00"}', params={name: API_KEY})
    assert response.status_code == 401
    assert "URL" in response.json()["detail"]


def test_reading_a_payment_needs_the_key_too(service):
    created = post_raw(service, b'{"amount": "1.00"}', {"Idempotency-Key": new_key()})
    assert created.status_code == 201
    path = f"/v1/payments/{created.json()['id']}"
    assert requests.get(service.url + path, timeout=5).status_code == 401
    assert requests.get(service.url + path, headers=AUTH, timeout=5).status_code == 200


def test_every_configured_key_is_compared_in_constant_time(monkeypatch):
    """The one code path (``require_api_key`` -> ``key_matches``) compares with every key
    through ``hmac.compare_digest``, without stopping at a match.

    A wall-clock measurement over HTTP is dominated by scheduling noise on this machine,
    so the property is checked on the code path itself.
    """
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b)
    )
    keys = ("first-key-0123456789", "second-key-0123456789", "third-key-0123456789")
    for presented, expected in [(keys[0], True), (keys[2], True), ("x" * 20, False)]:
        calls.clear()
        assert auth.key_matches(presented, keys) is expected
        assert [b for _, b in calls] == [k.encode() for k in keys]
    source = auth.require_api_key.__code__
    assert "key_matches" in source.co_names and "compare_digest" not in source.co_names


# --------------------------------------------------------------------------- secrets


def test_no_secret_or_card_number_reaches_a_response_or_a_log_line(service):
    """Send secrets and card numbers where they could leak, then grep everything."""
    post_raw(service, b'{"amount": "1.00"}', params={"api_key": API_KEY})
    post_raw(service, b'{"amount": "1.00"}', params={"token": PROVIDER_KEY})
    for card in CARD_NUMBERS:
        body = {"amount": "1.00", "description": f"card {card}", "metadata": {"pan": card}}
        post_raw(service, json.dumps(body).encode(), {"Idempotency-Key": new_key()})
        requests.get(f"{service.url}/v1/payments/{card.replace(' ', '')}", headers=AUTH, timeout=5)
        # A request that fails inside the store logs the statement and its parameters.
        body = {"amount": "1E-999999999", "description": f"card {card}"}
        post_raw(service, json.dumps(body).encode(), {"Idempotency-Key": new_key()})

    logged = service.stderr()
    for secret in (API_KEY, PROVIDER_KEY):
        assert secret not in logged
        assert not [body for body in SEEN_BODIES if secret in body]
    for card in CARD_NUMBERS:
        assert card not in logged and re.sub(r"[ -]", "", card) not in logged
    assert "[REDACTED]" in logged  # the scrubbing ran (query-string keys, card numbers)
