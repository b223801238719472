"""The HTTP API of DESIGN.md section 6, status by status, through Flask's test client.

The app runs against a real sandbox provider process and a migrated SQLite file; faults
and unreachable addresses drive the error statuses. Every error must be
``application/problem+json`` matching the OpenAPI document's ``Problem`` schema.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

import database_config
import payment_handler
import settings
from log_context import current_log_context
from payment_store import SqlPaymentStore
from service import create_app
from settings import ConfigError, Settings
from tests.support.sandbox import SandboxProcess

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = json.loads((ROOT / "service" / "openapi.json").read_text())
KEYS = ("key-one-0123456789abcdef", "key-two-0123456789abcdef", "key-three-0123456789abcd")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens on loopback
UNREACHABLE_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:9/nothing"


def schema_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}
    )


PROBLEM_SCHEMA = schema_validator("Problem")
PAYMENT_SCHEMA = schema_validator("Payment")


def assert_problem(response, status: int, code: str | None = None) -> dict:
    """``response`` is a problem+json of ``status`` (and ``code``): never HTML or a trace."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    PROBLEM_SCHEMA.validate(body)
    assert body["status"] == status
    assert body["request_id"] == response.headers["X-Request-ID"]
    if code is not None:
        assert body["code"] == code
    text = response.get_data(as_text=True)
    assert "<html" not in text.lower() and "Traceback" not in text
    return body


def assert_payment(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    PAYMENT_SCHEMA.validate(body)
    return body


def retry_after(response) -> int:
    value = int(response.headers["Retry-After"])
    assert value >= 1
    return value


def new_key() -> str:
    return f"order-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess() as process:
        yield process


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('service-api') / 'payments.db'}"
    database_config.run_migrations(url)
    return url


@pytest.fixture
def make_app(sandbox, database_url):
    """Build the app over the sandbox and the test database, with fast provider timeouts."""

    def build(test_config=None, **overrides):
        config = Settings(
            database_url=database_url,
            payment_api_url=sandbox.url,
            api_keys=KEYS,
            payment_connect_timeout=0.5,
            payment_read_timeout=2.0,
            payment_deadline=3.0,
            payment_max_retries=0,
            payment_backoff_factor=0.01,
        ).with_overrides(**overrides)
        settings.set_settings(config)
        database_config.configure_engine(config)
        payment_handler.reset_payment_service()
        return create_app(test_config)

    yield build
    sandbox.reset()  # also frees requests a test left hanging
    database_config.dispose_engine()


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def pay(client, body=None, *, key: str | None = None, headers=None):
    body = {"amount": "25.99", "currency": "USD", **(body or {})}
    headers = {**AUTH, **(headers or {})}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/v1/payments", json=body, headers=headers)


# --------------------------------------------------------------------------- success


def test_succeeded_payment_is_201_with_exact_amount_and_location(client):
    response = client.post(
        "/v1/payments",
        data=b'{"amount": 25.99, "currency": "USD", "transaction_id": "%s"}' % new_key().encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    body = assert_payment(response, 201)
    assert body["status"] == "succeeded"
    assert (body["amount"], body["amount_minor"]) == ("25.99", 2599)
    assert body["provider_charge_id"].startswith("ch_")
    assert response.headers["Location"] == f"/v1/payments/{body['id']}"
    assert "Idempotent-Replayed" not in response.headers


def test_payment_can_be_read_back_by_id(client):
    created = assert_payment(pay(client, key=new_key()), 201)
    fetched = assert_payment(client.get(f"/v1/payments/{created['id']}", headers=AUTH), 200)
    assert fetched == created


def test_unknown_payment_id_is_404(client):
    assert_problem(client.get("/v1/payments/pay_" + "0" * 24, headers=AUTH), 404, "not_found")


@pytest.mark.parametrize(
    "payment_id",
    ["%00", "pay_%00", "x" * 65, "4111%201111%201111%201111", "pay_" + "A" * 24, "%E2%80%AE"],
    ids=["nul", "pay-nul", "long", "card-number", "upper-hex", "bidi"],
)
def test_an_id_we_could_not_have_made_is_404_without_a_query_or_an_echo(
    client, payment_id, monkeypatch
):
    from payment_store import SqlPaymentStore

    def no_query(self, payment_id):
        raise AssertionError("the store was asked")

    monkeypatch.setattr(SqlPaymentStore, "find_by_id", no_query)
    body = assert_problem(client.get(f"/v1/payments/{payment_id}", headers=AUTH), 404)
    assert "4111" not in body["detail"] and "%" not in body["detail"]


def test_same_key_and_body_replays_the_payment(client, sandbox):
    key = new_key()
    first = assert_payment(pay(client, key=key), 201)
    replay = pay(client, key=key)
    assert assert_payment(replay, 201) == first
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert [c["idempotency_key"] for c in sandbox.ledger()] == [key]


def test_transaction_id_is_the_key_without_the_header(client, sandbox):
    body = {"transaction_id": new_key()}
    first = assert_payment(pay(client, body), 201)
    replay = pay(client, body)
    assert assert_payment(replay, 201)["id"] == first["id"]
    assert first["idempotency_key"] == body["transaction_id"]
    assert len(sandbox.ledger()) == 1


def test_idempotency_key_header_wins_over_transaction_id(client, sandbox):
    key = new_key()
    first = assert_payment(pay(client, {"transaction_id": "invoice-1"}, key=key), 201)
    assert (first["idempotency_key"], first["transaction_id"]) == (key, "invoice-1")
    other = pay(client, {"transaction_id": "invoice-2"}, key=key)
    assert_problem(other, 422, "idempotency_key_reused")
    assert [c["idempotency_key"] for c in sandbox.ledger()] == [key]


def test_requests_without_any_key_are_separate_payments(client, sandbox):
    first = assert_payment(pay(client), 201)
    second = assert_payment(pay(client), 201)
    assert first["id"] != second["id"]
    assert len(sandbox.ledger()) == 2


def test_same_key_with_another_body_is_422(client, sandbox):
    key = new_key()
    first = assert_payment(pay(client, key=key), 201)
    body = assert_problem(pay(client, {"amount": "26.00"}, key=key), 422, "idempotency_key_reused")
    assert body["payment_id"] == first["id"]
    assert len(sandbox.ledger()) == 1


# --------------------------------------------------------------------------- library errors


def test_declined_payment_is_402_and_replays_as_402(client):
    key = new_key()
    first = assert_problem(pay(client, {"payment_method": "card_declined"}, key=key), 402)
    assert first["code"] == "card_declined"
    assert first["detail"] == "Your card was declined."
    replay = pay(client, {"payment_method": "card_declined"}, key=key)
    assert assert_problem(replay, 402)["payment_id"] == first["payment_id"]
    assert replay.headers["Idempotent-Replayed"] == "true"


def test_outcome_unknown_is_202_with_the_stored_payment(make_app, sandbox):
    client = make_app(payment_read_timeout=0.3, payment_deadline=1.0).test_client()
    sandbox.set_faults(hang=True)
    response = pay(client, key=new_key())
    body = assert_payment(response, 202)
    assert body["status"] == "unknown"
    assert response.headers["Location"] == f"/v1/payments/{body['id']}"


def test_same_key_while_in_flight_is_409_with_retry_after(client, sandbox):
    sandbox.set_faults(hang=True)
    key = new_key()
    first = threading.Thread(target=pay, args=(client,), kwargs={"key": key})
    first.start()
    try:
        sandbox.wait_for_state(lambda state: state["hung"] >= 1)
        response = pay(client, key=key)
        assert_problem(response, 409, "payment_in_progress")
        retry_after(response)
    finally:
        sandbox.set_faults()
        first.join(10)
    assert not first.is_alive()


def test_unreachable_provider_is_503_with_retry_after_and_no_internals(make_app):
    client = make_app(payment_api_url=UNREACHABLE).test_client()
    response = pay(client, key=new_key())
    body = assert_problem(response, 503, "provider_unavailable")
    retry_after(response)
    assert "127.0.0.1" not in body["detail"] and "nothing was charged" in body["detail"]
    assert body["payment_id"].startswith("pay_")


def test_open_breaker_is_503_with_retry_after_of_its_reset(make_app):
    client = make_app(
        payment_api_url=UNREACHABLE, payment_breaker_failures=1, payment_breaker_reset=30.0
    ).test_client()
    assert_problem(pay(client, key=new_key()), 503, "provider_unavailable")
    response = pay(client, key=new_key())
    assert_problem(response, 503, "breaker_open")
    assert 1 <= retry_after(response) <= 30


def test_unreachable_database_is_503_with_retry_after(make_app):
    client = make_app(database_url=UNREACHABLE_DATABASE, db_connect_timeout=1).test_client()
    response = pay(client, key=new_key())
    body = assert_problem(response, 503, "database_unavailable")
    retry_after(response)
    assert "127.0.0.1" not in body["detail"]


def test_provider_refusing_our_credentials_is_502(make_app):
    client = make_app(payment_api_key="sk_not_the_sandbox_key").test_client()
    body = assert_problem(pay(client, key=new_key()), 502, "provider_rejected_request")
    assert "nothing was charged" in body["detail"]


def test_unexpected_error_is_a_bare_500_problem(client, monkeypatch, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("internal detail sk_secret")

    monkeypatch.setattr(payment_handler, "process_payment", explode)
    body = assert_problem(pay(client), 500, "internal_error")
    assert "sk_secret" not in json.dumps(body)
    assert any(r.exc_info and "sk_secret" in str(r.exc_info[1]) for r in caplog.records)


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"currency": "USD"}, "invalid_amount"),
        ({"amount": "abc"}, "invalid_amount"),
        ({"amount": 0}, "invalid_amount"),
        ({"amount": "-5"}, "invalid_amount"),
        ({"amount": "1.001"}, "invalid_amount"),
        ({"amount": True}, "invalid_amount"),
        ({"amount": None}, "invalid_amount"),
        ({"amount": [1]}, "invalid_amount"),
        ({"amount": "2000000"}, "amount_too_large"),
        ({"amount": "5", "currency": "XXX"}, "invalid_currency"),
        ({"amount": "5", "currency": 840}, "invalid_currency"),
        ({"amount": "5", "payment_method": ""}, "invalid_payment_method"),
        ({"amount": "5", "transaction_id": 7}, "invalid_transaction_id"),
        ({"amount": "5", "metadata": [1, 2]}, "invalid_metadata"),
        ({"amount": "5", "ammount": "5"}, "unknown_field"),
        ([{"amount": "5"}], "invalid_body"),
    ],
)
def test_invalid_payment_request_is_422(client, body, code):
    response = client.post("/v1/payments", json=body, headers=AUTH)
    assert_problem(response, 422, code)


def test_empty_idempotency_key_header_is_422(client):
    response = pay(client, headers={"Idempotency-Key": ""})
    assert_problem(response, 422, "invalid_idempotency_key")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"amount": ',
        b"",
        b'{"amount": NaN}',
        b"\xff\xfe{",
        b"[" * 30_000 + b"]" * 30_000,  # nested past the recursion limit
        b'{"amount": "5", "description": "\\ud800"}',
        b'{"amount": "5", "metadata": {"note": "\\udfff"}}',
    ],
)
def test_body_that_is_not_json_is_400(client, raw):
    response = client.post(
        "/v1/payments", data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_problem(response, 400, "bad_request")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_declared_json_is_415(client, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/v1/payments", data=b'{"amount": "5"}', headers=headers)
    assert_problem(response, 415, "unsupported_media_type")


def test_body_over_64_kib_is_413(client):
    body = json.dumps({"amount": "5", "description": "x" * (64 * 1024)}).encode()
    response = client.post(
        "/v1/payments", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_problem(response, 413, "request_entity_too_large")


def test_unknown_route_is_a_404_problem(client):
    assert_problem(client.get("/v2/nothing-here"), 404, "not_found")


def test_wrong_method_is_a_405_problem_with_allow(client):
    response = client.delete("/v1/payments", headers=AUTH)
    assert_problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-configured-key-at-all", f"Basic {KEYS[0]}", "Bearer ", KEYS[0]],
)
def test_payment_without_a_valid_bearer_key_is_401(client, sandbox, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = client.post("/v1/payments", json={"amount": "5"}, headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert sandbox.ledger() == []


def test_key_in_query_string_is_refused_even_with_a_valid_header(client, sandbox):
    response = client.post(f"/v1/payments?api_key={KEYS[0]}", json={"amount": "5"}, headers=AUTH)
    assert_problem(response, 401, "unauthorized")
    assert sandbox.ledger() == []


def test_reading_a_payment_needs_a_key(client):
    assert_problem(client.get("/v1/payments/pay_missing"), 401, "unauthorized")


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_is_accepted(client, key):
    response = client.get("/v1/payments/pay_missing", headers={"Authorization": f"Bearer {key}"})
    assert_problem(response, 404)


@pytest.mark.parametrize("presented", [KEYS[0], "wrong-key-0123456789abcdef"])
def test_presented_key_is_compared_with_every_key_in_constant_time(client, monkeypatch, presented):
    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    client.get("/v1/payments/pay_missing", headers={"Authorization": f"Bearer {presented}"})
    assert compared == [key.encode() for key in KEYS]  # no early exit on the first match


def test_app_refuses_to_start_without_api_keys(make_app):
    with pytest.raises(ConfigError, match="API_KEYS"):
        make_app(api_keys=())


# --------------------------------------------------------------------------- request ids


def test_sane_request_id_is_echoed(client):
    response = client.get("/v2/nothing", headers={"X-Request-ID": "req-1.A_b"})
    assert response.headers["X-Request-ID"] == "req-1.A_b"
    assert response.get_json()["request_id"] == "req-1.A_b"


@pytest.mark.parametrize("supplied", [None, "", "x" * 129, "has space", "semi;colon", "ü"])
def test_missing_or_odd_request_id_is_replaced_by_a_generated_one(client, supplied):
    headers = {"X-Request-ID": supplied} if supplied is not None else {}
    response = client.get("/healthz", headers=headers)
    generated = response.headers["X-Request-ID"]
    assert generated != supplied and len(generated) == 32 and int(generated, 16) >= 0


def test_request_id_is_bound_into_the_log_context(make_app):
    client = make_app(payment_api_url=UNREACHABLE).test_client()
    seen = []

    class ContextRecorder(logging.Handler):
        def emit(self, record):
            seen.append(current_log_context())

    recorder = ContextRecorder()
    logging.getLogger("service.problems").addHandler(recorder)
    try:
        response = pay(client, headers={"X-Request-ID": "trace-me-42"})
    finally:
        logging.getLogger("service.problems").removeHandler(recorder)
    assert response.status_code == 503
    assert seen and all(context["request_id"] == "trace-me-42" for context in seen)
    assert current_log_context() == {}


# --------------------------------------------------------------------------- health, metrics


def test_healthz_needs_nothing(make_app):
    client = make_app(database_url=UNREACHABLE_DATABASE, payment_api_url=UNREACHABLE).test_client()
    response = client.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_readyz_reports_database_and_breaker(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    schema_validator("Readiness").validate(body)
    assert body["checks"] == {"database": "ok", "payment_provider_breaker": "closed"}


def test_readyz_is_503_when_the_database_is_unreachable(make_app):
    client = make_app(database_url=UNREACHABLE_DATABASE, db_connect_timeout=1).test_client()
    body = assert_problem(client.get("/readyz"), 503, "database_unavailable")
    assert body["checks"]["database"] == "unavailable"


def test_readyz_stays_200_with_the_breaker_open(make_app):
    client = make_app(payment_api_url=UNREACHABLE, payment_breaker_failures=1).test_client()
    assert_problem(pay(client), 503, "provider_unavailable")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"]["payment_provider_breaker"] == "open"


def _sample(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_metrics_count_requests_by_url_rule_and_show_pool_and_breaker(client):
    by_id = 'http_requests_total{method="GET",route="/v1/payments/<payment_id>",status="404"}'
    before = _sample(client.get("/metrics").get_data(as_text=True), by_id)
    client.get("/v1/payments/pay_a", headers=AUTH)
    client.get("/v1/payments/pay_b", headers=AUTH)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert _sample(text, by_id) == before + 2
    latency = 'http_request_duration_seconds_count{method="GET",route="/v1/payments/<payment_id>"'
    assert latency in text
    assert "pay_a" not in text
    assert _sample(text, 'db_pool_connections{state="size"}') == 8
    assert 'db_pool_connections{state="checked_out"}' in text
    assert _sample(text, "payment_breaker_state ") == 0


# --------------------------------------------------------------------------- openapi, cli


def test_openapi_document_is_served_verbatim_and_valid(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.data == (ROOT / "service" / "openapi.json").read_bytes()
    validate_openapi(response.get_json())


def test_openapi_documents_every_route(client):
    documented = {
        (path, method.upper()) for path, item in OPENAPI["paths"].items() for method in item
    }
    served = {
        (rule.rule.replace("<", "{").replace(">", "}"), method)
        for rule in client.application.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented


@pytest.mark.usefixtures("restore_root_logging")
def test_cli_reconcile_settles_unknown_payments_and_prints_json(make_app, sandbox):
    app = make_app(payment_read_timeout=1.0, payment_deadline=2.0)  # lookups tolerate load
    sandbox.set_faults(hang=True)
    unknown = assert_payment(pay(app.test_client(), key=new_key()), 202)
    sandbox.set_faults()
    result = app.test_cli_runner().invoke(args=["payments", "reconcile", "--older-than", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examined"] >= 1 and report["errors"] == 0
    settled = SqlPaymentStore().find_by_id(unknown["id"])
    assert (settled.status, settled.failure_code) == ("failed", "not_received")
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(  # the cron job logs like the service: JSON, with the payment's id
        entry["message"] == "reconciled payment: unknown -> failed"
        and entry.get("payment_id") == unknown["id"]
        for entry in logged
    )


@pytest.mark.usefixtures("restore_root_logging")
def test_cli_migrate_upgrades_the_schema(make_app):
    result = make_app().test_cli_runner().invoke(args=["payments", "migrate"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "database schema is up to date\n"


# --------------------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
FIELD_VALUES = {
    "amount": st.decimals(min_value=-10, max_value=10**7, places=3).map(str)
    | st.integers(-5, 10**7)
    | JSON_VALUES,
    "currency": st.sampled_from(["USD", "JPY", "KWD", "usd", "XXX"]) | JSON_VALUES,
    "payment_method": st.sampled_from(["card", "card_declined"]) | JSON_VALUES,
    "transaction_id": st.text(min_size=1, max_size=300) | JSON_VALUES,
    "description": st.text(max_size=50) | JSON_VALUES,
    "metadata": st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3) | JSON_VALUES,
}
PAYMENT_BODIES = st.fixed_dictionaries({}, optional=FIELD_VALUES) | JSON_VALUES
FUZZ = hypothesis_settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_well_formed(response) -> None:
    assert response.status_code in {201, 202, 400, 402, 409, 422}, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert_problem(response, response.status_code)
    else:
        assert_payment(response, response.status_code)


@FUZZ
@given(body=PAYMENT_BODIES, key=st.none() | st.text(max_size=20))
def test_fuzzed_payment_bodies_never_cause_a_server_error(client, body, key):
    headers = {**AUTH, "Content-Type": "application/json"}
    if key is not None and key.isascii() and key.isprintable():
        headers["Idempotency-Key"] = key
    assert_well_formed(client.post("/v1/payments", data=json.dumps(body), headers=headers))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bodies_never_cause_a_server_error(client, raw):
    response = client.post(
        "/v1/payments", data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_well_formed(response)
